"""``EarlyStopping``: an agreed stop when a monitored metric stops improving."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from disttrain.api.hooks import Callback
from disttrain.callbacks.monitor import MonitorWatch

log = logging.getLogger("disttrain.callbacks")

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState


class EarlyStopping(Callback):
    """Stop training when ``monitor`` (in ``trainer.callback_metrics``) stops improving.

    Checked after every validation, on each rank with the value that rank sees; the stop is
    agreed, so a stop decided on any one rank stops every rank after the same step. A key
    the run never logs is an error once an epoch with validation has ended, naming the keys
    that were logged. With ``check_finite`` (the default) a NaN or infinite value stops
    training at once, with a warning, instead of counting towards ``patience``.
    """

    def __init__(
        self,
        monitor: str,
        patience: int = 3,
        mode: str = "min",
        min_delta: float = 0.0,
        check_finite: bool = True,
        verbose: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self.check_finite, self.verbose = check_finite, verbose
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._watch = MonitorWatch("EarlyStopping", monitor)

    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        self._watch.check(trainer)

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        self._watch.epoch_ended()

    def on_train_end(self, trainer: TrainerState, module: Any) -> None:
        self._watch.check(trainer, at_end=True)

    def on_post_performance_check(self, trainer: TrainerState, module: Any) -> None:
        self._watch.validation_ended(trainer)
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.check_finite and not math.isfinite(value):
            log.warning(
                "EarlyStopping: %s is %s at epoch %d: stopping (check_finite=True)",
                self.monitor,
                value,
                trainer.current_epoch,
            )
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True
            return
        better = (
            value < self.best - self.min_delta
            if self.mode == "min"
            else value > self.best + self.min_delta
        )
        if better:
            if self.verbose:
                log.info("EarlyStopping: %s improved to %.6g", self.monitor, value)
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True
        if self.verbose:
            log.info(
                "EarlyStopping: %s did not improve on %.6g for %d check(s)%s",
                self.monitor,
                self.best,
                self.wait,
                ": stopping" if trainer.should_stop else "",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])
