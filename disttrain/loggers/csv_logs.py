"""``CSVLogger``: ``metrics.csv`` and ``hparams.yaml`` in the run directory (the default)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import yaml

from disttrain.loggers.core import Logger
from disttrain.storage.atomic import atomic_write_text

log = logging.getLogger("disttrain.loggers")


class CSVLogger(Logger):
    """``SAVE_DIR/metrics.csv``: one row per logged step (columns grow as keys appear), after
    the rows of the history it joined (see ``Logger.resume_from``); and
    ``SAVE_DIR/hparams.yaml``. ``SAVE_DIR`` is the run directory unless ``save_dir`` is
    given. The file is rewritten atomically at each save; nothing is written before."""

    def __init__(self, save_dir: str | Path | None = None) -> None:
        super().__init__(save_dir)
        self.rows: list[dict[str, Any]] = []  # logged by this run
        self.columns: list[str] = ["step"]
        self.history: list[dict[str, Any]] | None = None  # the file's rows kept; None: unread

    @property
    def name(self) -> str:
        return "csv"

    @property
    def path(self) -> Path:
        if self.save_dir is None:
            raise RuntimeError("CSVLogger: no save_dir and no trainer has given a run directory")
        return self.save_dir / "metrics.csv"

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
