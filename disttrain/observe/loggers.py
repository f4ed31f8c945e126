"""Where metrics go: a CSV file (the default) or TensorBoard, written by global rank 0 only.

Every rank holds a logger so that code like the seed's ``on_after_backward`` example
(``self.logger.experiment.add_histogram(...)``) runs unchanged everywhere; on the other ranks
it is a ``NullLogger`` whose ``experiment`` accepts any call and does nothing.

A run directory keeps one history across resumes: ``fit`` tells the logger the step training
goes on after (``Logger.resume_from``), and the logger keeps what was logged up to it.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import yaml

from disttrain.observe.console import writes_run_output
from disttrain.storage.atomic import atomic_write_text

LOGGERS = ("csv", "tensorboard")
log = logging.getLogger("disttrain.loggers")


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

    def resume_from(self, step: int | None) -> None:
        """Join the run directory's history; ``fit`` calls it once, before training.

        ``step`` is the optimizer step training goes on after (the resumed checkpoint's
        ``global_step``): what was logged up to and including it is kept, anything later is
        replaced, because those steps are trained and logged again. ``step`` itself is kept:
        nothing logs at it after a resume (the first step trained is ``step + 1``), and it holds
        values logged around the checkpoint (an epoch-end checkpoint's validation and epoch
        row). ``None``, a fresh fit, starts a new history in place of the one there. Without
        this call (validate, test) what is logged is added after the history as it stands.
        """

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
    """``RUN_DIR/metrics.csv``: one row per logged step (columns grow as keys appear), after
    the rows of the history it joined (see ``Logger.resume_from``); and ``RUN_DIR/hparams.yaml``.
    The file is rewritten atomically at each save."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []  # logged by this run
        self.columns: list[str] = ["step"]
        self.history: list[dict[str, Any]] | None = None  # the file's rows kept; None: unread

    @property
    def experiment(self) -> CSVLogger:
        return self

    def resume_from(self, step: int | None) -> None:
        if step is None:
            self._join([], [])
        else:
            rows, columns = self._read()
            self._join([r for r in rows if r["step"] <= step], columns)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.history is None:  # validate/test: after the history as it stands
            self._join(*self._read())
        # only this run's rows merge by step: an evaluation of the last checkpoint gets a row
        # of its own rather than rewriting the values fit logged at that step
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(metrics)
        else:
            self.rows.append({"step": step, **metrics})
        self.columns += [k for k in metrics if k not in self.columns]

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        atomic_write_text(
            self.path.with_name("hparams.yaml"), yaml.safe_dump(params, sort_keys=False)
        )

    def save(self) -> None:
        if not self.rows:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows([*(self.history or []), *self.rows])
        atomic_write_text(self.path, out.getvalue())

    def _read(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The existing file's rows (empty cells left out, steps as ints) and columns."""
        try:
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [{k: v for k, v in row.items() if v and k} for row in reader]
                columns = list(reader.fieldnames or [])
        except FileNotFoundError:
            return [], []
        kept = []
        for row in rows:
            try:
                kept.append({**row, "step": int(row["step"])})
            except (KeyError, ValueError):  # a hand-edited or torn row: not worth a failed run
                log.warning("%s: dropping a row without a step number: %s", self.path, row)
        return kept, columns

    def _join(self, history: list[dict[str, Any]], columns: list[str]) -> None:
        self.history = history
        old = [c for c in columns if c and c != "step"]
        self.columns = ["step", *old, *[c for c in self.columns[1:] if c not in old]]


class TensorBoardLogger(Logger):
    """``RUN_DIR/tensorboard`` through ``torch.utils.tensorboard`` (``pip install tensorboard``).

    ``resume_from`` reopens the writer with ``purge_step``: TensorBoard then hides the events
    that earlier runs wrote after the resume step, as ``metrics.csv`` drops them.
    """

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "logger='tensorboard' needs the tensorboard package: "
                "pip install 'disttrain[tensorboard]'"
            ) from err
        self._open = SummaryWriter
        self.log_dir = str(Path(run_dir) / "tensorboard")
        self._earlier_events = any(Path(self.log_dir).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=self.log_dir)

    @property
    def experiment(self) -> Any:
        return self.writer

    def resume_from(self, step: int | None) -> None:
        # purge_step=N hides every event at step >= N; None (a fresh fit) hides them all
        if step is None and not self._earlier_events:
            return  # nothing earlier to hide: keep the one events file
        self.writer.close()
        purge = 0 if step is None else step + 1
        self.writer = self._open(log_dir=self.log_dir, purge_step=purge)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
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
