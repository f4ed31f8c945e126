"""What ``configure_optimizers`` may return, normalised to optimizers and scheduler entries.

A scheduler returned plainly steps once per epoch (``interval="epoch"``, as in Lightning);
``{"scheduler": s, "interval": "step"}`` steps it after every optimizer step. A run that will
have one epoch (``max_epochs=1``, ``max_steps`` reached within the first epoch, a stream of
unknown length ended by ``max_steps``) would never change a per-epoch scheduler's learning
rate during training: the run's start names such a scheduler.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

log = logging.getLogger("disttrain.run")


@dataclass
class SchedulerEntry:
    scheduler: Any
    interval: str = "epoch"  # "epoch" or "step"
    frequency: int = 1
    name: str | None = None  # Lightning's config key; kept, not used


def normalise(returned: Any) -> tuple[list[torch.optim.Optimizer], list[SchedulerEntry]]:
    """Accept an optimizer, a list of them, ``(optimizers, schedulers)``, Lightning's dict
    ``{"optimizer": o, "lr_scheduler": s_or_config}`` or a list or tuple of such dicts."""
    if isinstance(returned, dict):
        returned = [returned]
    if (
        isinstance(returned, (list, tuple))
        and returned
        and all(isinstance(d, dict) for d in returned)
    ):
        return _from_dicts(returned)
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
            "configure_optimizers must return an optimizer, a list of optimizers, "
            "(optimizers, schedulers), or {'optimizer': o, 'lr_scheduler': s} (or a list of "
            f"those); got {returned!r}"
        )
    return optimizers, [_entry(s) for s in schedulers]


def _from_dicts(configs: Any) -> tuple[list[torch.optim.Optimizer], list[SchedulerEntry]]:
    optimizers, entries = [], []
    for config in configs:
        unknown = set(config) - {"optimizer", "lr_scheduler"}
        optimizer = config.get("optimizer")
        if unknown or not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "configure_optimizers: a dict must be {'optimizer': o, 'lr_scheduler': s} "
                f"with an optimizer (lr_scheduler optional); got {config!r}"
            )
        optimizers.append(optimizer)
        if config.get("lr_scheduler") is not None:
            entries.append(_entry(config["lr_scheduler"]))
    return optimizers, entries


_KEYS = [f.name for f in fields(SchedulerEntry)]


def _entry(scheduler: Any) -> SchedulerEntry:
    if isinstance(scheduler, dict):
        unknown = sorted(set(scheduler) - set(_KEYS))
        if unknown:
            raise ValueError(
                f"configure_optimizers: unknown scheduler key {', '.join(map(repr, unknown))}; "
                f"a scheduler config has {', '.join(_KEYS)} (a monitored metric is not "
                "supported)"
            )
        entry = SchedulerEntry(**scheduler)
    else:
        entry = SchedulerEntry(scheduler)
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


def warn_if_epoch_schedulers_never_step(
    entries: list[SchedulerEntry],
    max_epochs: int | float,
    max_steps: int | None,
    n_train: int | float,
    accumulate: int,
) -> None:
    """Name the per-epoch schedulers that step too rarely to change the learning rate while
    the run trains: every epoch that will run ends before their first step. ``max_epochs``
    is the run's epoch limit (``TrainerConfig.epoch_limit``: inf for none)."""
    epochs: int | float = max_epochs
    if max_steps is not None:
        if n_train == math.inf:  # a stream of unknown length: maybe one endless epoch
            epochs = min(epochs, 1)
        elif n_train > 0:
            epochs = min(epochs, math.ceil(max_steps / math.ceil(n_train / accumulate)))
    rare = [e for e in entries if e.interval == "epoch" and e.frequency >= epochs]
    if not rare:
        return
    names = ", ".join(type(e.scheduler).__name__ for e in rare)
    unknown = n_train == math.inf and max_epochs > 1
    log.warning(
        "%s steps once per epoch (a scheduler returned plainly has interval 'epoch'), but this "
        "run %s: its learning rate would never change during training. Return it from "
        'configure_optimizers as {"scheduler": s, "interval": "step"} to step it after every '
        "optimizer step.",
        names,
        "may have only one epoch (its training data has no length and max_steps ends it)"
        if unknown
        else f"has {int(epochs)} epoch{'s' if epochs != 1 else ''}",
    )


def step_schedulers(entries: list[SchedulerEntry], interval: str, count: int) -> None:
    """Step the schedulers of ``interval`` whose frequency divides ``count`` (1-based)."""
    for entry in entries:
        if entry.interval == interval and count % entry.frequency == 0:
            entry.scheduler.step()
