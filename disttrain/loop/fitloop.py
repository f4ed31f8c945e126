"""What one fit holds while it runs: built once at the start, read by every loop level (the
per-batch hooks looked up once, the clipping)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from disttrain.checkpoint.format import Progress
from disttrain.loop.outputs import detached
from disttrain.loop.stopping import Stopping
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import PER_MICRO_BATCH, PER_OPTIMIZER_STEP, Hook


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
    val_every: int | None  # val_check_interval in batches (None: at epochs' ends only)
    clip: Callable[[list[torch.Tensor]], Any] | None  # gradient clipping, if asked for
    optimizers: InitVar[list[torch.optim.Optimizer]]
    params: list[list[torch.Tensor]] = field(init=False)  # per optimizer, for clipping
    step_args: list[tuple[int, ...]] = field(init=False)  # (optimizer_idx,) with several

    def __post_init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in optimizers]
        several = len(optimizers) > 1
        self.step_args = [(i,) for i in range(len(optimizers))] if several else [()]


def batch_hooks(dispatcher: Dispatcher, convert: Callable[[Any], Any] | None) -> BatchHooks:
    """The per-batch hooks as the loop holds them; a hook nobody implements is a no-op. With
    ``convert`` (``*-true`` precision) the batch's floats are converted to the parameters'
    dtype after ``transfer_batch_to_device``."""
    per_batch = PER_MICRO_BATCH | PER_OPTIMIZER_STEP  # the table's, by name: BatchHooks' fields
    hooks = BatchHooks(**{hook.value: dispatcher.caller(hook) for hook in per_batch})
    if dispatcher.implemented(Hook.ON_TRAIN_BATCH_END):  # Lightning hands it detached outputs
        hooks = dataclasses.replace(hooks, on_train_batch_end=_detaching(hooks.on_train_batch_end))
    if convert is not None:
        transfer = hooks.transfer_batch_to_device
        moved = lambda *args: convert(transfer(*args))  # noqa: E731
        hooks = dataclasses.replace(hooks, transfer_batch_to_device=moved)
    return hooks


def _detaching(on_train_batch_end: Any) -> Any:
    """``on_train_batch_end`` handed what Lightning 2 hands it: ``{"loss": loss, ...}``
    detached (a loss tensor returned alone becomes that dict); a list with several
    optimizers."""

    def as_lightning(output: Any) -> Any:
        return detached({"loss": output} if isinstance(output, torch.Tensor) else output)

    def run(outputs: Any, batch: Any, batch_idx: int) -> Any:
        if isinstance(outputs, list):  # several optimizers: one output each
            return on_train_batch_end([as_lightning(o) for o in outputs], batch, batch_idx)
        return on_train_batch_end(as_lightning(outputs), batch, batch_idx)

    return run


def clipping(value: float | None, algorithm: str) -> Callable[[list[torch.Tensor]], Any] | None:
    """``gradient_clip_val`` by ``gradient_clip_algorithm``: the global L2 norm of each
    optimizer's parameters, or each gradient element; None when not clipping."""
    if not value:
        return None
    if algorithm == "value":
        return functools.partial(torch.nn.utils.clip_grad_value_, clip_value=value)
    return functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=value)
