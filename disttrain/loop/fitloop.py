"""What one fit holds while it runs: built once at the start, read by every loop level."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from disttrain.checkpoint.format import Progress
from disttrain.loop.stopping import Stopping
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Hook


@dataclass(frozen=True)
class BatchHooks:
    """The per-batch hooks, looked up once: each runs exactly as ``call(Hook.X, ...)`` would,
    without the dispatcher's lookup on every batch."""

    on_batch_start: Callable[..., Any]
    transfer_batch_to_device: Callable[..., Any]
    backward: Callable[..., Any]
    on_after_backward: Callable[..., Any]
    on_before_zero_grad: Callable[..., Any]
    on_batch_end: Callable[..., Any]

    @classmethod
    def looked_up(cls, dispatcher: Dispatcher, convert: Callable[[Any], Any] | None) -> BatchHooks:
        """The hooks from ``dispatcher``; with ``convert`` (``*-true`` precision) the batch's
        floats are converted to the parameters' dtype after ``transfer_batch_to_device``."""
        hooks = cls(*map(dispatcher.caller, _BATCH_HOOKS))
        if convert is None:
            return hooks
        transfer = hooks.transfer_batch_to_device
        moved = lambda *args: convert(transfer(*args))  # noqa: E731
        return dataclasses.replace(hooks, transfer_batch_to_device=moved)


_BATCH_HOOKS = (
    Hook.ON_BATCH_START,
    Hook.TRANSFER_BATCH_TO_DEVICE,
    Hook.BACKWARD,
    Hook.ON_AFTER_BACKWARD,
    Hook.ON_BEFORE_ZERO_GRAD,
    Hook.ON_BATCH_END,
)


@dataclass
class FitLoop:
    """One fit's loop plumbing, built once at its start: how the step is called, the per-batch
    hooks, the stop decisions, the data and its limits, where a resumed run goes on. (What
    the loop changes, and the optimizers, live in the run: ``disttrain.loop.run.Run``.)"""

    call: Callable[..., Any]  # the dispatcher's call(Hook.X, ...)
    forward: Callable[..., Any]  # the training step as the loop calls it (compiled, timed)
    hooks: BatchHooks
    stopping: Stopping
    train_data: Any
    val_data: Any
    n_train: int | float
    n_val: int | float
    keep_outputs: bool  # training_epoch_end is overridden: keep the steps' outputs
    progress: Progress | None  # the checkpoint resumed from
    saved_rng: dict | None  # this rank's RNG state of that checkpoint, put back once
    val_every: int | None  # val_check_interval in batches (None: at epochs' ends only)
    clip: Callable[[list[torch.Tensor]], Any] | None  # gradient clipping, if asked for
    optimizers: InitVar[list[torch.optim.Optimizer]]
    params: list[list[torch.Tensor]] = field(init=False)  # per optimizer, for clipping
    step_args: list[tuple[int, ...]] = field(init=False)  # (optimizer_idx,) with several

    def __post_init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in optimizers]
        several = len(optimizers) > 1
        self.step_args = [(i,) for i in range(len(optimizers))] if several else [()]
