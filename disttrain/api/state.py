"""``TrainerState``: what hooks and callbacks may read from the trainer, and ask of it.

This is the whole surface a module (``self.trainer``) and a callback (its first argument) are
given; ``disttrain.Trainer`` implements it. Everything here is the same on every rank unless
it says otherwise, so a decision taken from it is taken alike everywhere. The one thing a
hook may set is ``should_stop``. The methods are collectives: call them on every rank at the
same point (from a hook that runs on all ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from disttrain.dist.collectives import Collectives
from disttrain.storage.location import Location, Where


class MetricRecorder(Protocol):
    """Where ``Module.log`` puts a value (``disttrain.observe.metrics.Reporter``)."""

    def record(
        self,
        name: str,
        value: Any,
        *,
        on_step: bool | None,
        on_epoch: bool | None,
        reduce: str,
        batch_size: int | None,
        prog_bar: bool,
    ) -> None: ...

    def discard(self, value: Any) -> None:
        """A value logged during the sanity check: not recorded (a metric object is reset)."""
        ...


class TrainerState(Protocol):
    """The trainer as hooks and callbacks see it (see the module docstring)."""

    @property
    def current_epoch(self) -> int:
        """The epoch being trained, 0-based (after a resume, the checkpoint's)."""
        ...

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (all epochs)."""
        ...

    @property
    def global_rank(self) -> int:
        """This process's rank in the job (differs by rank)."""
        ...

    @property
    def local_rank(self) -> int:
        """This process's rank on its node (differs by rank)."""
        ...

    @property
    def node_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` or ``cpu`` (differs by rank)."""
        ...

    @property
    def backend(self) -> str:
        """``"nccl"``, ``"gloo"``, or ``"none"`` in one process and outside a run."""
        ...

    @property
    def seed(self) -> int | None:
        """The run's seed (the user's where they seeded first), None if nothing is seeded."""
        ...

    @property
    def config(self) -> Any:
        """The run's options (``disttrain.TrainerConfig``), read-only."""
        ...

    @property
    def collectives(self) -> Collectives:
        """The run's collectives (a null object in one process): for a callback's own
        gather or reduction, on every rank at the same point."""
        ...

    @property
    def sharded(self) -> bool:
        """Whether fit holds the module sharded (FSDP)."""
        ...

    @property
    def default_root_dir(self) -> str:
        """The run directory."""
        ...

    @property
    def sanity_checking(self) -> bool:
        """True while the sanity-check validation runs (its metrics are not logged)."""
        ...

    @property
    def at_step_boundary(self) -> bool:
        """During ``on_batch_end``: whether the optimizers stepped on this batch."""
        ...

    @property
    def num_training_batches(self) -> int | float:
        """Batches each rank trains per epoch (``inf`` for a stream without a length)."""
        ...

    @property
    def predict_batch_indices(self) -> list[int] | None:
        """During ``Trainer.predict``'s batch hooks: the dataset indices of the batch being
        predicted (differs by rank); None elsewhere."""
        ...

    @property
    def should_stop(self) -> bool:
        """Set it on any rank to stop every rank after the same optimizer step."""
        ...

    @should_stop.setter
    def should_stop(self, value: bool) -> None: ...

    @property
    def callback_metrics(self) -> dict[str, float]:
        """Metrics reduced over the ranks: what checkpoint monitors and early stopping read."""
        ...

    @property
    def logged_metrics(self) -> dict[str, float]: ...

    @property
    def logger(self) -> Any:
        """The run's logger (``disttrain.loggers``); a null logger on ranks that write
        nothing, so code that logs runs unchanged on every rank."""
        ...

    @property
    def reporter(self) -> MetricRecorder:
        """Where ``Module.log`` records values (local: no collective)."""
        ...

    @property
    def running_limited_hook(self) -> str | None:
        """The hook running now if it runs on some ranks only (``prepare_data``)."""
        ...

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    @property
    def checkpoint_dir(self) -> Location:
        """Where checkpoints go and where ``resume="auto"`` looks for them."""
        ...

    def progress_bar_metrics(self) -> dict[str, float]: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over every rank and return it. Collective."""
        ...

    def save_checkpoint(
        self, path: Where, after_write: Callable[[], Any] | None = None
    ) -> Location:
        """Write a checkpoint of the run as it stands; then ``after_write`` on global rank 0.
        Collective."""
        ...

    def export_weights(self, path: Where) -> Location:
        """The whole module's weights in one file for inference. Collective."""
        ...

    def manage_files(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on global rank 0 only; every rank gets its result. Collective."""
        ...
