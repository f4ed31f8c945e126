"""``TensorBoardLogger``: event files under ``RUN_DIR/tensorboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from disttrain.loggers.core import Logger


class TensorBoardLogger(Logger):
    """``SAVE_DIR/tensorboard`` through ``torch.utils.tensorboard`` (``pip install
    'disttrain[tensorboard]'``); ``experiment`` is the ``SummaryWriter``, opened on first
    use (never on a rank that does not write).

    ``resume_from`` opens the writer with ``purge_step``: TensorBoard then hides the events
    that earlier runs wrote after the resume step, as ``metrics.csv`` drops them.
    """

    def __init__(self, save_dir: str | Path | None = None) -> None:
        super().__init__(save_dir)
        self._writer: Any = None
        self._purge_step: int | None = None  # for the next writer opened
        self._earlier: bool | None = None  # events from earlier runs, before this one wrote

    @property
    def name(self) -> str:
        return "tensorboard"

    @property
    def log_dir(self) -> Path | None:
        return None if self.save_dir is None else self.save_dir / "tensorboard"

    @property
    def experiment(self) -> Any:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "logger='tensorboard' needs the tensorboard package: "
                    "pip install 'disttrain[tensorboard]'"
                ) from err
            self._earlier_events()
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def resume_from(self, step: int | None) -> None:
        # purge_step=N hides every event at step >= N; None (a fresh fit) hides them all
        if step is None and not self._earlier_events():
            return  # nothing earlier to hide: keep the one events file
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = 0 if step is None else step + 1

    def _earlier_events(self) -> bool:
        if self._earlier is None:
            found = self.log_dir is not None and any(self.log_dir.glob("events.out.tfevents.*"))
            self._earlier = found
        return self._earlier

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        writer = self.experiment
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        text = "```\n" + yaml.safe_dump(params, sort_keys=False) + "```"
        self.experiment.add_text("config", text)

    def save(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str = "success") -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
