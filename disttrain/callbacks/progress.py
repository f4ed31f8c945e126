"""The progress bar: tqdm on a terminal, plain periodic log lines otherwise (CI, files).

Added by the trainer on the rank that writes run output (global rank 0) only, so the other
ranks pay nothing for it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from disttrain.api.hooks import Callback

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState

log = logging.getLogger("disttrain.progress")


class ProgressBar(Callback):
    def __init__(self, every_n_steps: int = 50, stream: Any = None) -> None:
        self.every_n_steps = every_n_steps
        self.stream = stream or sys.stderr
        self.bar = None
        self._start = 0.0
        self._start_step = 0

    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        if self.stream.isatty():
            total = trainer.num_training_batches
            self.bar = tqdm(
                total=None if total == float("inf") else total,
                desc=f"epoch {trainer.current_epoch}",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
                unit="batch",
            )

    def on_batch_end(self, trainer: TrainerState, module: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if not trainer.at_step_boundary or trainer.global_step % self.every_n_steps:
            return
        metrics = trainer.progress_bar_metrics()
        if self.bar is not None:
            self.bar.set_postfix({"step": trainer.global_step, **metrics}, refresh=False)
        else:
            log.info(
                "epoch %d  step %d  %.1f steps/s  %s",
                trainer.current_epoch,
                trainer.global_step,
                self._rate(trainer),
                _fmt(metrics),
            )

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        log.info(
            "epoch %d done  step %d  %.1f steps/s  %s",
            trainer.current_epoch,
            trainer.global_step,
            self._rate(trainer),
            _fmt(trainer.progress_bar_metrics()),
        )

    def on_train_end(self, trainer: TrainerState, module: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _rate(self, trainer: TrainerState) -> float:
        elapsed = time.perf_counter() - self._start
        return (trainer.global_step - self._start_step) / elapsed if elapsed > 0 else 0.0


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
