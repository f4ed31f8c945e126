"""What one fit holds while it runs: built once at the start, read by every loop level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from disttrain.checkpoint.format import Progress
from disttrain.loop.stopping import Stopping


@dataclass(frozen=True)
class BatchHooks:
    """The per-batch hooks, looked up once: each runs exactly as ``call(Hook.X, ...)`` would,
    without the dispatcher's lookup on every batch."""

    on_batch_start: Callable[..., Any]
    transfer_batch_to_device: Callable[..., Any]
    on_train_batch_start: Callable[..., Any]
    on_before_backward: Callable[..., Any]
    backward: Callable[..., Any]
    on_after_backward: Callable[..., Any]
    on_before_optimizer_step: Callable[..., Any]
    on_before_zero_grad: Callable[..., Any]
    on_train_batch_end: Callable[..., Any]  # detaches the step's outputs, if implemented
    on_batch_end: Callable[..., Any]


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
    unscale_first: bool  # on_before_optimizer_step runs: unscale (16-mixed) before it
    progress: Progress | None  # the checkpoint resumed from
    saved_rng: dict | None  # this rank's RNG state of that checkpoint, put back once
    optimizers: InitVar[list[torch.optim.Optimizer]]
    params: list[list[torch.Tensor]] = field(init=False)  # per optimizer, for clipping
    step_args: list[tuple[int, ...]] = field(init=False)  # (optimizer_idx,) with several

    def __post_init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in optimizers]
        several = len(optimizers) > 1
        self.step_args = [(i,) for i in range(len(optimizers))] if several else [()]
