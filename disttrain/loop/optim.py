"""What ``configure_optimizers`` may return, normalised to optimizers and scheduler entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SchedulerEntry:
    scheduler: Any
    interval: str = "epoch"  # "epoch" or "step"
    frequency: int = 1


def normalise(returned: Any) -> tuple[list[torch.optim.Optimizer], list[SchedulerEntry]]:
    """Accept an optimizer, a list of them, or ``(optimizers, schedulers)``."""
    schedulers: Any = []
    if (
        isinstance(returned, tuple)
        and len(returned) == 2
        and isinstance(returned[1], (list, tuple))
    ):
        returned, schedulers = returned
    optimizers = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(
            "configure_optimizers must return an optimizer, a list of optimizers, or "
            f"(optimizers, schedulers); got {returned!r}"
        )
    return optimizers, [_entry(s) for s in schedulers]


def _entry(scheduler: Any) -> SchedulerEntry:
    entry = (
        SchedulerEntry(**scheduler) if isinstance(scheduler, dict) else SchedulerEntry(scheduler)
    )
    if entry.interval not in ("epoch", "step") or entry.frequency < 1:
        raise ValueError(
            f"configure_optimizers: scheduler interval must be 'epoch' or 'step' and frequency "
            f">= 1, got interval={entry.interval!r} frequency={entry.frequency}"
        )
    if isinstance(entry.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            "configure_optimizers: ReduceLROnPlateau needs a monitored metric, which disttrain "
            "does not feed to schedulers; step it yourself in validation_epoch_end"
        )
    return entry


def step_schedulers(entries: list[SchedulerEntry], interval: str, count: int) -> None:
    """Step the schedulers of ``interval`` whose frequency divides ``count`` (1-based)."""
    for entry in entries:
        if entry.interval == interval and count % entry.frequency == 0:
            entry.scheduler.step()
