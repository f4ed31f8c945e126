"""The callbacks disttrain ships: ``ModelCheckpoint`` and ``EarlyStopping``.

Both run on every rank and take their decisions identically everywhere: a checkpoint is saved
collectively (global rank 0 writes), files are created and deleted by global rank 0 alone, and
an early stop is an agreed decision (any rank's vote stops every rank after the same step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from disttrain.callback import Callback
from disttrain.checkpoint import LAST_NAME, file_name, remove
from disttrain.files import atomic_link

LAST = LAST_NAME


class ModelCheckpoint(Callback):
    """Save checkpoints every N optimizer steps and/or every N epochs; keep the last K, and
    optionally the best K by a monitored metric; keep ``last.ckpt`` naming the newest.

    ``monitor`` names a key of ``trainer.callback_metrics`` (what ``validation_epoch_end``
    returned); its value is averaged over the ranks before it is compared, so every rank
    keeps the same files. Files: ``DIRPATH/epoch=E-step=S.ckpt`` (default DIRPATH:
    ``RUN_DIR/checkpoints``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        keep_last_k: int = 1,
        save_last: bool = True,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        if keep_last_k < 0 or save_top_k < 0:
            raise ValueError("ModelCheckpoint: keep_last_k and save_top_k must be >= 0")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"ModelCheckpoint: {name} must be >= 1 or None, got {value}")
        self.dirpath = dirpath
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.keep_last_k, self.save_last = keep_last_k, save_last
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self.saved: list[str] = []  # file names, oldest first
        self.best: list[tuple[float, str]] = []  # (score, file name), best first
        self.last_saved_step = -1

    def directory(self, trainer: Any) -> Path:
        return Path(self.dirpath or Path(trainer.config.default_root_dir) / "checkpoints")

    def on_batch_end(self, trainer: Any, module: Any) -> None:
        n = self.every_n_steps
        step = trainer.global_step
        if n and step % n == 0 and step != self.last_saved_step and trainer.at_step_boundary:
            self.save(trainer)

    def on_epoch_end(self, trainer: Any, module: Any) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.save(trainer)

    def save(self, trainer: Any) -> Path:
        """Save now (collective: call it on every rank at the same point)."""
        score = self._monitored(trainer) if self.monitor else None
        self.last_saved_step = trainer.global_step
        name = file_name(trainer.current_epoch, trainer.global_step)
        path = self.directory(trainer) / name
        trainer.save_checkpoint(path)
        if name not in self.saved:
            self.saved.append(name)
        if score is not None and self.save_top_k:
            self.best = [b for b in self.best if b[1] != name] + [(score, name)]
            self.best.sort(key=lambda b: b[0], reverse=self.mode == "max")
            self.best = self.best[: self.save_top_k]
        keep = set(self.saved[-self.keep_last_k :] if self.keep_last_k else []) | {
            n for _, n in self.best
        }
        doomed = [n for n in self.saved if n not in keep]
        self.saved = [n for n in self.saved if n in keep]
        trainer.manage_files(_rotate, self.directory(trainer), path, doomed, self.save_last)
        return path

    def _monitored(self, trainer: Any) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        pair = torch.tensor([0.0 if value is None else float(value), value is not None])
        total, count = trainer.all_reduce(pair.double()).tolist()
        if count < trainer.world_size:
            raise KeyError(
                f"ModelCheckpoint: monitor '{self.monitor}' is missing from callback_metrics on "
                f"{trainer.world_size - int(count)} rank(s); return it from validation_epoch_end"
            )
        return total / count

    @property
    def best_path(self) -> str | None:
        return self.best[0][1] if self.best else None

    def state_dict(self) -> dict[str, Any]:
        return {"saved": list(self.saved), "best": [list(b) for b in self.best]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = list(state.get("saved", []))
        self.best = [(float(s), str(n)) for s, n in state.get("best", [])]


def _rotate(directory: Path, newest: Path, doomed: list[str], save_last: bool) -> None:
    """Global zero's file work after a save: point last.ckpt at it, delete what is not kept.
    (A sharded checkpoint is a directory: it gets no last.ckpt; auto-resume finds it anyway.)"""
    if save_last and newest.is_file():
        atomic_link(newest, directory / LAST)
    for name in doomed:
        remove(directory / name)


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

    def on_post_performance_check(self, trainer: Any, module: Any) -> None:
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
