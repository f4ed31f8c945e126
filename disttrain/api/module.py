"""``disttrain.Module``: the model hooks plus the step methods a trainer drives."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from disttrain.api.hooks import ModelHooks

if TYPE_CHECKING:
    from disttrain.api.state import TrainerState

M = TypeVar("M", bound="Module")
# how a checkpoint becomes a module: disttrain.checkpoint.inference (a layer above this one,
# which reads checkpoints) hands it over when disttrain is imported
_checkpoint_loader: Callable[..., Any] | None = None


def use_checkpoint_loader(loader: Callable[..., Any]) -> None:
    """Set what ``Module.load_from_checkpoint`` calls: ``loader(cls, path, map_location,
    overrides)`` returns the module (``disttrain.checkpoint.inference.load_module``)."""
    global _checkpoint_loader
    _checkpoint_loader = loader


class HParams(dict):
    """The ``__init__`` arguments ``save_hyperparameters`` recorded, by key or attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no hyperparameter {name!r} (saved: {list(self)})") from None


class Module(ModelHooks, torch.nn.Module):
    """A ``torch.nn.Module`` with Lightning 0.8's hooks and step methods.

    Implement ``training_step`` and ``configure_optimizers`` and the dataloaders you use; add
    ``validation_step``/``test_step`` to evaluate, ``predict_step`` to predict. Every step
    method runs on every rank, on that rank's shard of the data; under DDP ``training_step``
    runs inside DDP's forward, so the gradient all-reduce happens in ``backward``. Evaluation
    and predict steps run on the unwrapped module (no DDP collective), each sample exactly
    once across ranks.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: TrainerState | None = None
        # torch's seed while the model is built: the start-up one (drawn from the OS) means
        # its initial weights differ in every run (Trainer.fit warns)
        self._seed_at_build = torch.initial_seed()
        self.hparams = HParams()

    # -- hyperparameters and inference ------------------------------------------------------
    def save_hyperparameters(self, *, ignore: Iterable[str] = ()) -> None:
        """Record the arguments of the ``__init__`` calling it as ``self.hparams``, as
        Lightning does: call it in ``__init__`` after ``super().__init__()``. Checkpoints store
        them, and ``load_from_checkpoint`` builds the module from them. Each must be plain data
        (numbers, strings, booleans, None, lists, tuples, dicts of them): a checkpoint holds
        nothing else. Name the others in ``ignore`` (and pass them to
        ``load_from_checkpoint``)."""
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # pragma: no cover (CPython always has frames)
            raise RuntimeError("save_hyperparameters: no caller frame to read arguments from")
        info = inspect.getargvalues(caller)
        values = {name: info.locals[name] for name in info.args[1:]}  # not self
        if info.keywords is not None:
            values.update(info.locals[info.keywords])
        skipped = set(ignore)
        values = {k: v for k, v in values.items() if k not in skipped}
        for name, value in values.items():
            if not _plain(value):
                raise TypeError(
                    f"save_hyperparameters: {name!r} is {type(value).__name__} {value!r}, not "
                    f"plain data; a checkpoint holds only plain data, so pass "
                    f"ignore=[{name!r}] (and give it to load_from_checkpoint as {name}=...)"
                )
        self.hparams = HParams(values)

    @classmethod
    def load_from_checkpoint(
        cls: type[M], path: str | os.PathLike, map_location: Any = None, **overrides: Any
    ) -> M:
        """The module for inference, without a trainer: built from the hyperparameters the
        checkpoint holds (``save_hyperparameters``), with ``overrides`` winning, then given its
        weights; returned in eval mode. ``path`` is a checkpoint file, a sharded (FSDP)
        checkpoint directory (read in this one process), or a file ``export_weights`` wrote
        (weights only: give the ``__init__`` arguments as ``overrides``). ``map_location`` is
        ``torch.load``'s; a device also moves the module there."""
        if _checkpoint_loader is None:  # pragma: no cover (import disttrain sets it)
            raise RuntimeError("load_from_checkpoint: import disttrain first")
        return _checkpoint_loader(cls, path, map_location, overrides)

    # -- what the trainer calls -------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int, *optimizer_idx: int) -> Any:
        """Return the loss (a scalar tensor) or a dict with a ``"loss"`` entry.

        With several optimizers it receives a third argument, ``optimizer_idx``, and runs once
        per optimizer. Runs on every rank under autocast when ``precision`` asks for it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """Evaluate one validation batch on this rank's shard; the return value is collected
        into ``validation_epoch_end``'s ``outputs``. Runs under ``torch.no_grad``."""
        raise NotImplementedError

    def validation_epoch_end(self, outputs: list[Any]) -> None:
        """Receives this rank's ``validation_step`` outputs at the end of a validation loop."""

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """As ``validation_step``, for ``Trainer.test`` and ``test_dataloader``."""
        raise NotImplementedError

    def test_epoch_end(self, outputs: list[Any]) -> None:
        """Receives this rank's ``test_step`` outputs at the end of ``Trainer.test``."""

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Predict one batch of this rank's shard and return the prediction (tensors, or
        containers of them). Runs on every rank in eval mode under ``torch.inference_mode``,
        on the unwrapped module; must not call collectives (ranks may hold different numbers
        of batches). The default returns ``self(batch)``."""
        return self(batch)

    def training_epoch_end(self, outputs: list[Any]) -> None:
        """Receives this rank's ``training_step`` outputs (detached) at the end of an epoch;
        with several optimizers each entry is a list with one output per optimizer."""

    def configure_optimizers(self) -> Any:
        """Return an optimizer, a list of them, or ``(optimizers, schedulers)``.

        A scheduler is an ``LRScheduler`` (stepped every epoch) or a dict
        ``{"scheduler": s, "interval": "epoch" | "step", "frequency": n}``. Called on every
        rank after ``on_fit_start``, before the DDP wrap.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement configure_optimizers")

    def configure_callbacks(self) -> Any:
        """Callbacks this module brings (a callback or a list of them), as in Lightning: called
        on every rank when fit, validate, test or predict starts, before ``prepare_data``. Each
        replaces the trainer's callback of its class; checkpoint callbacks run last."""
        return []

    def train_dataloader(self) -> Any:
        """The training ``DataLoader``; its sampler is replaced by a ``DistributedSampler``
        (shuffling if the loader shuffled), so return the loader you would use on one process."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_dataloader")

    def val_dataloader(self) -> Any:
        """The validation ``DataLoader`` (optional); it is sharded without padding."""
        return None

    def test_dataloader(self) -> Any:
        """The test ``DataLoader`` (optional); it is sharded without padding."""
        return None

    def predict_dataloader(self) -> Any:
        """The ``DataLoader`` of ``Trainer.predict`` (a map-style dataset with a batch size,
        not shuffled); it is sharded without padding, each rank a block of the dataset."""
        return None

    # -- metrics -------------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        *,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce: str = "mean",
        batch_size: int | None = None,
        prog_bar: bool = False,
        sync_dist: bool | None = None,
    ) -> None:
        """Record a metric; the trainer reduces it across ranks at fixed points.

        Call it from any hook or step method that runs on every rank. ``on_step`` (default in
        training) sends this step's value (global rank 0's) to the logger every
        ``log_every_n_steps``; ``on_epoch`` (default in validation/test) accumulates the
        epoch's value, reduced over all ranks with ``reduce`` (``mean`` weighted by
        ``batch_size``, by default the batch's length; ``sum``, ``max``, ``min``) in one
        collective at the end of the loop. Reduced values appear in
        ``trainer.callback_metrics`` and the logger. Logging is local: it costs no collective.
        ``value`` may be a ``torchmetrics.Metric`` (updated by the step): its epoch value is its
        own ``compute()`` at the loop's end, synced over every rank by torchmetrics, then it
        is reset; its step value is what its last call on a batch returned.
        ``sync_dist`` (Lightning's) is accepted: epoch values are always reduced over every
        rank, exactly; a step value is global rank 0's, or the ranks' mean with the trainer's
        ``sync_step_metrics=True`` (one collective per ``log_every_n_steps``).
        """
        trainer = self._trainer
        if trainer is None:
            raise RuntimeError(f"log('{name}'): the module is not attached to a running Trainer")
        if trainer.running_limited_hook is not None:
            raise RuntimeError(
                f"log('{name}') called in {trainer.running_limited_hook}, which runs on some "
                "ranks only: the reduction needs every rank, so log from a hook that runs on all "
                "ranks (e.g. setup) instead"
            )
        if trainer.sanity_checking:
            trainer.reporter.discard(value)
            return
        trainer.reporter.record(
            name,
            value,
            on_step=on_step,
            on_epoch=on_epoch,
            reduce=reduce,
            batch_size=batch_size,
            prog_bar=prog_bar,
        )

    def log_dict(self, metrics: dict[str, Any], **options: Any) -> None:
        """``log`` each entry of ``metrics`` with the same options."""
        for name, value in metrics.items():
            self.log(name, value, **options)

    @property
    def logger(self) -> Any:
        """The trainer's logger; ``logger.experiment`` is its writer (the ``SummaryWriter`` for
        TensorBoard). On ranks other than global 0 it accepts every call and does nothing."""
        return self._trainer.logger if self._trainer is not None else None

    # -- what the module may read -----------------------------------------------------------
    @property
    def trainer(self) -> TrainerState | None:
        """The trainer running this module (what hooks may read of it:
        ``disttrain.api.state.TrainerState``), or None before fit/validate/test."""
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: TrainerState | None) -> None:
        self._trainer = trainer

    @property
    def device(self) -> torch.device:
        if self._trainer is not None:
            return self._trainer.device
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def global_rank(self) -> int:
        return self._trainer.global_rank if self._trainer else 0

    @property
    def local_rank(self) -> int:
        return self._trainer.local_rank if self._trainer else 0

    @property
    def world_size(self) -> int:
        return self._trainer.world_size if self._trainer else 1

    @property
    def current_epoch(self) -> int:
        return self._trainer.current_epoch if self._trainer else 0

    @property
    def global_step(self) -> int:
        return self._trainer.global_step if self._trainer else 0


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
