"""``EarlyStopping``: an agreed stop when a monitored metric stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from disttrain.callbacks.base import Callback

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.loop.trainer import Trainer


class EarlyStopping(Callback):
    """Stop training when ``monitor`` (in ``trainer.callback_metrics``) stops improving.

    Checked after every validation, on each rank with the value that rank sees; the stop is
    agreed, so a stop decided on any one rank stops every rank after the same step.
    """

    def __init__(
        self, monitor: str, patience: int = 3, mode: str = "min", min_delta: float = 0.0
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_post_performance_check(self, trainer: Trainer, module: Any) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        )
        if better:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])
