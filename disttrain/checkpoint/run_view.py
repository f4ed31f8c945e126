"""``CheckpointedRun``: what the checkpoint code reads from a run, and the two counters it
sets when a checkpoint is put back. ``disttrain.loop.run.Run`` implements it; the checkpoint
code never sees the trainer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from disttrain.api.module import Module
from disttrain.checkpoint.background import CheckpointWrites
from disttrain.config.options import TrainerConfig
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv
from disttrain.ranks.dispatch import Dispatcher
from disttrain.storage.location import Location


class Scheduled(Protocol):
    """A scheduler entry (``disttrain.loop.optim.SchedulerEntry``): its scheduler."""

    scheduler: Any


class CheckpointedRun(Protocol):
    config: TrainerConfig
    resolved_config: Mapping[str, Any] | None
    env: DistEnv
    collectives: Collectives
    checkpoint_writes: CheckpointWrites  # async_checkpointing's writes in flight
    dispatcher: Dispatcher | None
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None
    data_position: Callable[[], dict] | None  # a stream's position per loader worker
    # the non-finite losses this rank knows of, (rank, step, loss): nothing of them is saved
    # (agreed=True: only what every rank knows alike)
    nonfinite_losses: Callable[..., list[tuple[int, int, float]]] | None
    current_epoch: int
    global_step: int

    @property
    def callbacks(self) -> Sequence[Any]: ...

    @property
    def schedulers(self) -> Sequence[Scheduled]: ...

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def data_world_size(self) -> int: ...

    @property
    def sharded(self) -> bool: ...

    @property
    def running_module(self) -> Module: ...

    @property
    def checkpoint_callback(self) -> Any: ...

    @property
    def checkpoint_dir(self) -> Location: ...

    def running(self, what: str) -> Dispatcher: ...
