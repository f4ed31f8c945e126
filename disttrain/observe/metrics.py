"""``Module.log`` records locally; the trainer reduces across ranks at fixed points only.

- Step values are this rank's own (the logger writes global rank 0's), or, with
  ``Trainer(sync_step_metrics=True)``, reduced in one collective per logging interval.
- Epoch values are accumulated per rank (means weighted by batch size, so they are exact over
  an unpadded evaluation shard) and reduced in one collective at the end of each validation
  loop and one at the end of each training epoch, which also carries the stop votes.
- A ``torchmetrics.Metric`` logged as the value is computed by its own ``compute()`` at that
  end (its state synced over every rank by torchmetrics, then reset): exact for any metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from disttrain.dist.collectives import Collectives

REDUCE_OPS = ("mean", "sum", "max", "min")


@dataclass
class _Accumulator:
    reduce: str
    total: Any = 0.0  # a float or a 0-d tensor: no device sync until the reduction
    weight: float = 0.0

    def add(self, value: Any, weight: float) -> None:
        if isinstance(value, torch.Tensor) and value.dtype is not _SUM_DTYPE:
            # a 16-bit sum overflows past 65504 (fp16) or drops small increments (bf16)
            value = value.to(_SUM_DTYPE)
        if self.reduce in ("mean", "sum"):
            self.total = self.total + (value * weight if self.reduce == "mean" else value)
            self.weight += weight
        elif self.weight == 0.0:
            self.total, self.weight = value, 1.0
        else:
            self.total = _pick(self.reduce, self.total, value)


_SUM_DTYPE = torch.float64  # every epoch accumulator, whatever dtype the value was logged in


def _pick(reduce: str, a: Any, b: Any) -> Any:
    """The larger (``max``) or smaller (``min``) of two numbers or tensors. Tensors stay on
    their device: Python's ``max`` on tensors asks ``bool(a < b)``, a device sync per log."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        device = (a if isinstance(a, torch.Tensor) else b).device
        a = torch.as_tensor(a, dtype=_SUM_DTYPE, device=device)
        b = torch.as_tensor(b, dtype=_SUM_DTYPE, device=device)
        return torch.maximum(a, b) if reduce == "max" else torch.minimum(a, b)
    return max(a, b) if reduce == "max" else min(a, b)


def is_metric_object(value: Any) -> bool:
    """A ``torchmetrics.Metric`` (told by its methods: torchmetrics stays optional)."""
    return all(callable(getattr(value, m, None)) for m in ("update", "compute", "reset", "sync"))


GLOBAL = "global"  # a value already computed over every rank (a torchmetrics Metric's)


class MetricStore:
    """What one rank logged: this step's values, the epoch's accumulators, and the
    ``torchmetrics`` objects logged this epoch (computed over every rank at its end)."""

    def __init__(self) -> None:
        self.step: dict[str, Any] = {}
        self.epoch: dict[str, _Accumulator] = {}
        self.metrics: dict[str, Any] = {}
        self.prog_bar: set[str] = set()

    def log(
        self,
        name: str,
        value: Any,
        on_step: bool,
        on_epoch: bool,
        reduce: str,
        batch_size: int,
        prog_bar: bool,
    ) -> None:
        if reduce not in REDUCE_OPS:
            raise ValueError(f"log('{name}'): reduce must be one of {REDUCE_OPS}, got {reduce!r}")
        if is_metric_object(value):
            self._log_metric_object(name, value, on_step, on_epoch, prog_bar)
            return
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"log('{name}'): a metric is one number, got shape {tuple(value.shape)}"
                )
            value = value.detach()
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"log('{name}'): value must be a number or a 1-element tensor")
        both = on_step and on_epoch
        if on_step:
            self.step[f"{name}_step" if both else name] = value
        if on_epoch:
            key = f"{name}_epoch" if both else name
            acc = self.epoch.get(key)
            if acc is None:
                acc = self.epoch[key] = _Accumulator(reduce)
            elif acc.reduce != reduce:
                raise ValueError(f"log('{name}'): logged with reduce={acc.reduce!r} and {reduce!r}")
            acc.add(value, float(batch_size))
        if prog_bar:
            self.prog_bar.add(f"{name}_step" if both else name)

    def _log_metric_object(
        self, name: str, metric: Any, on_step: bool, on_epoch: bool, prog_bar: bool
    ) -> None:
        """A ``torchmetrics.Metric``: its epoch value is its own ``compute()`` at the loop's
        end (it syncs its state over every rank: exact, whatever each rank held); its step
        value, the batch's value its last ``forward`` returned (this rank's)."""
        both = on_step and on_epoch
        if on_step:
            batch_value = getattr(metric, "_forward_cache", None)
            if not isinstance(batch_value, torch.Tensor) or batch_value.numel() != 1:
                raise ValueError(
                    f"log('{name}'): a step value of a {type(metric).__name__} is what calling "
                    "it on the batch returned; call metric(preds, target) before logging it "
                    "on_step, or log it with on_step=False"
                )
            self.step[f"{name}_step" if both else name] = batch_value.detach()
        if on_epoch:
            key = f"{name}_epoch" if both else name
            known = self.metrics.setdefault(key, metric)
            if known is not metric:
                raise ValueError(f"log('{name}'): two different metric objects under one name")
        if prog_bar:
            self.prog_bar.add(f"{name}_step" if both else name)

    def take_epoch(self) -> dict[str, tuple[str, float, float]]:
        """This rank's epoch accumulators as plain numbers, and a fresh start. A metric
        object is computed here, on every rank at once (its sync is a collective)."""
        packed = {k: (a.reduce, _number(a.total), a.weight) for k, a in self.epoch.items()}
        for key, metric in sorted(self.metrics.items()):  # the same order on every rank
            packed[key] = (GLOBAL, _number(metric.compute()), 1.0)
            metric.reset()
        self.epoch, self.metrics = {}, {}
        return packed

    def step_values(self) -> dict[str, float]:
        return {k: _number(v) for k, v in self.step.items()}


def reduce_epoch(per_rank: list[dict[str, tuple[str, float, float]]]) -> dict[str, float]:
    """Combine every rank's accumulators: exact weighted means, sums, maxima, minima."""
    merged: dict[str, _Accumulator] = {}
    for packed in per_rank:
        for key, (reduce, total, weight) in packed.items():
            if reduce == GLOBAL:  # the same on every rank: computed over all of them
                merged[key] = _Accumulator("max", total, 1.0)
                continue
            acc = merged.setdefault(key, _Accumulator(reduce))
            if weight == 0.0:
                continue
            if reduce in ("mean", "sum"):
                acc.total += total
                acc.weight += weight
            else:
                acc.add(total, 1.0)
    out = {}
    for key, acc in merged.items():
        if acc.reduce == "mean":
            out[key] = acc.total / acc.weight if acc.weight else math.nan
        else:
            out[key] = float(acc.total) if acc.weight else math.nan
    return out


def reduce_steps(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Mean over the ranks that logged each step value."""
    keys = {k for values in per_rank for k in values}
    return {k: sum(v[k] for v in per_rank if k in v) / sum(k in v for v in per_rank) for k in keys}


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = batch_size_of(item)
            if size:
                return size
    return 0


def _number(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class Reporter:
    """The trainer's metrics and logger: records what ``Module.log`` gets, reduces it at the
    fixed points, and hands the results to the logger and to ``callback_metrics``."""

    def __init__(self, logger: Any, every_n_steps: int, sync_steps: bool) -> None:
        self.logger = logger
        self.every_n_steps, self.sync_steps = every_n_steps, sync_steps
        self.train, self.eval = MetricStore(), MetricStore()
        self.evaluating = False
        self.callback_metrics: dict[str, float] = {}
        self.logged_metrics: dict[str, float] = {}
        self.batch: Any = None  # the current batch, for a default batch size
        # every how many ranks one counts: the tensor-parallel ranks of a data group see the
        # same batches, so only the first of each (ranks 0, tp, 2 tp, ...) enters a reduction
        self.replicas = 1

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
    ) -> None:
        store = self.eval if self.evaluating else self.train
        on_step = (not self.evaluating) if on_step is None else on_step
        on_epoch = self.evaluating if on_epoch is None else on_epoch
        if batch_size is None:
            batch_size = batch_size_of(self.batch) or 1
        store.log(name, value, on_step, on_epoch, reduce, batch_size, prog_bar)

    def discard(self, value: Any) -> None:
        """A value logged during the sanity check: not recorded; a metric object is reset, so
        the sanity batches it was updated with do not count in the first validation."""
        if is_metric_object(value):
            value.reset()

    def after_step(self, collectives: Collectives, global_step: int) -> None:
        """Every ``log_every_n_steps`` optimizer steps: the step values to the logger."""
        if global_step % self.every_n_steps or not (self.train.step or self.sync_steps):
            return
        values = self.train.step_values()
        if self.sync_steps:  # one collective per logging interval, on every rank
            values = reduce_steps(collectives.gather_object(values)[:: self.replicas])
        self._publish(values, global_step)

    def end_evaluation(self, collectives: Collectives, global_step: int) -> dict[str, float]:
        """The end of a validation/test loop: one collective reduces its epoch values."""
        gathered = collectives.gather_object(self.eval.take_epoch())
        reduced = reduce_epoch(gathered[:: self.replicas])
        self.eval.step.clear()
        self._publish(reduced, global_step)
        return reduced

    def end_epoch(
        self, collectives: Collectives, global_step: int, epoch: int, stop_vote: bool
    ) -> bool:
        """The end of a training epoch: one collective reduces the epoch's values and carries
        every rank's stop vote; returns whether any rank voted to stop."""
        gathered = collectives.gather_object((self.train.take_epoch(), bool(stop_vote)))
        reduced = reduce_epoch([packed for packed, _ in gathered[:: self.replicas]])
        self._publish({**reduced, "epoch": float(epoch)}, global_step)
        self.logger.save()
        return any(vote for _, vote in gathered)

    def progress_bar_metrics(self) -> dict[str, float]:
        keys = self.train.prog_bar | self.eval.prog_bar
        values = {k: v for k, v in self.callback_metrics.items() if k in keys}
        values.update({k: v for k, v in self.train.step_values().items() if k in keys})
        return values

    def skip_evaluation(self) -> None:
        """A sanity check's values are not logged."""
        self.eval.take_epoch()
        self.eval.step.clear()

    def _publish(self, values: dict[str, float], step: int) -> None:
        if not values:
            return
        self.callback_metrics.update(values)
        self.logged_metrics.update(values)
        self.logger.log_metrics(values, step)
