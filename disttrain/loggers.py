"""Where metrics go: a CSV file (the default) or TensorBoard, written by global rank 0 only.

Every rank holds a logger so that code like the seed's ``on_after_backward`` example
(``self.logger.experiment.add_histogram(...)``) runs unchanged everywhere; on the other ranks
it is a ``NullLogger`` whose ``experiment`` accepts any call and does nothing.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from disttrain.files import atomic_write_text
from disttrain.log import writes_run_output

LOGGERS = ("csv", "tensorboard")


class Logger:
    """What the trainer needs of a logger."""

    @property
    def experiment(self) -> Any:
        """The underlying writer (the ``SummaryWriter`` for TensorBoard)."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Make what was logged so far durable."""

    def finalize(self) -> None:
        """Flush and close; called after ``on_train_end`` (and at the end of validate/test)."""
        self.save()


class _Absorb:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class NullLogger(Logger):
    experiment = _Absorb()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass


class CSVLogger(Logger):
    """``RUN_DIR/metrics.csv``: one row per logged step (columns grow as keys appear), and
    ``RUN_DIR/hparams.yaml``. The file is rewritten atomically at each save."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = ["step"]

    @property
    def experiment(self) -> CSVLogger:
        return self

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(metrics)
        else:
            self.rows.append({"step": step, **metrics})
        self.columns += [k for k in metrics if k not in self.columns]

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        import yaml

        atomic_write_text(
            self.path.with_name("hparams.yaml"), yaml.safe_dump(params, sort_keys=False)
        )

    def save(self) -> None:
        if not self.rows:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())


class TensorBoardLogger(Logger):
    """``RUN_DIR/tensorboard`` through ``torch.utils.tensorboard`` (``pip install tensorboard``)."""

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "logger='tensorboard' needs the tensorboard package: "
                "pip install 'disttrain[tensorboard]'"
            ) from err
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    @property
    def experiment(self) -> Any:
        return self.writer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(params, sort_keys=False) + "```")

    def save(self) -> None:
        self.writer.flush()

    def finalize(self) -> None:
        self.writer.close()


def make_logger(kind: str | None, run_dir: str | Path, rank: int) -> Logger:
    """The logger a rank uses: the real one on the rank that writes, a null one elsewhere."""
    if kind is None or not writes_run_output(rank):
        return NullLogger()
    if kind == "csv":
        return CSVLogger(run_dir)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    raise ValueError(f"logger must be one of {LOGGERS} or None, got {kind!r}")
