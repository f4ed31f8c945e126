"""``ModelCheckpoint``: checkpoints every N steps or epochs, the last K and the best K kept."""

from __future__ import annotations

import functools
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.hooks import Callback
from disttrain.callbacks.monitor import MonitorWatch
from disttrain.checkpoint.format import LAST_NAME, SUFFIX, file_name
from disttrain.storage.atomic import atomic_link
from disttrain.storage.location import Location

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState

LAST = LAST_NAME
log = logging.getLogger("disttrain.callbacks")


class ModelCheckpoint(Callback):
    """Save checkpoints every N optimizer steps (``every_n_steps``, or Lightning's
    ``every_n_train_steps``) and/or every N epochs; keep the last K, and
    optionally the best K by a monitored metric; keep ``last.ckpt`` naming the newest.

    ``monitor`` names a key of ``trainer.callback_metrics`` (a metric logged with
    ``self.log``, or what ``validation_epoch_end`` returned); its value is averaged over the
    ranks before it is compared, so every rank keeps the same files. A key the run never logs
    is an error once an epoch with validation has ended, naming the keys that were logged.
    Files: ``DIRPATH/epoch=E-step=S.ckpt`` (default DIRPATH: ``RUN_DIR/checkpoints``; a local
    path or any fsspec URL such as ``s3://bucket/run/checkpoints``, where ``resume="auto"``
    then looks too; ``last.ckpt``, a hard link, only on a local disk), or as
    ``filename`` says in Lightning's template form (``"{epoch}-{val_loss:.2f}"`` →
    ``epoch=3-val_loss=0.52.ckpt``). ``best_model_path``, ``best_model_score`` and
    ``last_model_path`` read as in Lightning.
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
        every_n_train_steps: int | None = None,
        filename: str | None = None,
    ) -> None:
        if every_n_train_steps is not None:  # Lightning's name
            if every_n_steps not in (None, every_n_train_steps):
                raise ValueError(
                    "ModelCheckpoint: every_n_steps and every_n_train_steps are the same "
                    f"option; got {every_n_steps} and {every_n_train_steps}"
                )
            every_n_steps = every_n_train_steps
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        if keep_last_k < 0 or save_top_k < 0:
            raise ValueError("ModelCheckpoint: keep_last_k and save_top_k must be >= 0")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"ModelCheckpoint: {name} must be >= 1 or None, got {value}")
        self.dirpath, self.filename = dirpath, filename
        if filename is not None:
            _formatted(filename, 0, 0, {})  # a bad template fails here, not at the first save
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.keep_last_k, self.save_last = keep_last_k, save_last
        self.monitor, self.mode, self.save_top_k = monitor, mode, save_top_k
        self._watch = MonitorWatch("ModelCheckpoint", monitor) if monitor else None
        self.saved: list[str] = []  # file names, oldest first
        self.best: list[tuple[float, str]] = []  # (score, file name), best first
        self.last_saved_step = -1
        self._directory: Location | None = None  # where the last save went

    def directory(self, trainer: TrainerState) -> Location:
        return Location.at(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")

    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        if self._watch is not None:
            self._watch.check(trainer)

    def on_post_performance_check(self, trainer: TrainerState, module: Any) -> None:
        if self._watch is not None:
            self._watch.validation_ended(trainer)

    def on_train_end(self, trainer: TrainerState, module: Any) -> None:
        if self._watch is not None:
            self._watch.check(trainer, at_end=True)

    def on_batch_end(self, trainer: TrainerState, module: Any) -> None:
        n = self.every_n_steps
        step = trainer.global_step
        if n and step % n == 0 and step != self.last_saved_step and trainer.at_step_boundary:
            self.save(trainer)

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        if self._watch is not None:
            self._watch.epoch_ended()
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.save(trainer)

    def save(self, trainer: TrainerState) -> Location:
        """Save now (collective: call it on every rank at the same point). The lists of kept
        files are brought up to date first, so the checkpoint records itself among them; the
        files no longer kept go once it is complete (in the background if the save is)."""
        score = self._monitored(trainer, self.monitor) if self.monitor else None
        self.last_saved_step = trainer.global_step
        name = self._name(trainer)
        directory = self.directory(trainer)
        if name not in self.saved:
            self.saved.append(name)
        if score is not None and math.isnan(score):
            log.warning("ModelCheckpoint: '%s' is NaN at %s: not ranked", self.monitor, name)
            score = None
        if score is not None and self.save_top_k:
            self.best = [b for b in self.best if b[1] != name] + [(score, name)]
            self.best.sort(key=lambda b: b[0], reverse=self.mode == "max")
            self.best = self.best[: self.save_top_k]
        keep = set(self.saved[-self.keep_last_k :] if self.keep_last_k else []) | {
            n for _, n in self.best
        }
        doomed = [n for n in self.saved if n not in keep]
        self.saved = [n for n in self.saved if n in keep]
        rotate = functools.partial(_rotate, directory, directory / name, doomed, self.save_last)
        path = trainer.save_checkpoint(directory / name, after_write=rotate)
        self._directory = directory
        return path

    def _monitored(self, trainer: TrainerState, monitor: str) -> float | None:
        value = trainer.callback_metrics.get(monitor)
        pair = torch.tensor([0.0 if value is None else float(value), value is not None])
        total, count = trainer.all_reduce(pair.double()).tolist()
        if count == 0:  # no validation yet (a stop or max_steps before it): saved unranked
            return None
        if count < trainer.world_size:
            raise KeyError(
                f"ModelCheckpoint: monitor '{self.monitor}' is missing from callback_metrics on "
                f"{trainer.world_size - int(count)} rank(s); return it from validation_epoch_end"
            )
        return total / count

    def _name(self, trainer: TrainerState) -> str:
        if self.filename is None:
            return file_name(trainer.current_epoch, trainer.global_step)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        name = _formatted(self.filename, trainer.current_epoch, trainer.global_step, metrics)
        # global zero's: a returned metric in the name may differ between ranks
        return trainer.collectives.broadcast_object(name + SUFFIX)

    @property
    def best_path(self) -> str | None:
        """The best checkpoint's file name (by ``monitor``), or None."""
        return self.best[0][1] if self.best else None

    @property
    def best_model_path(self) -> str:
        """Lightning's name: the best checkpoint's full path ("" before there is one)."""
        if not self.best or self._directory is None:
            return ""
        return str(self._directory / self.best[0][1])

    @property
    def best_model_score(self) -> float | None:
        return self.best[0][0] if self.best else None

    @property
    def last_model_path(self) -> str:
        """The newest checkpoint's full path ("" before there is one)."""
        if not self.saved or self._directory is None:
            return ""
        return str(self._directory / self.saved[-1])

    def state_dict(self) -> dict[str, Any]:
        return {"saved": list(self.saved), "best": [list(b) for b in self.best]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = list(state.get("saved", []))
        self.best = [(float(s), str(n)) for s, n in state.get("best", [])]


_FIELD = re.compile(r"\{([A-Za-z_][\w/.-]*)(:[^{}]*)?\}")


def _formatted(template: str, epoch: int, step: int, metrics: dict[str, float]) -> str:
    """Lightning's ``filename``: ``"{epoch}-{val_loss:.2f}"`` → ``"epoch=3-val_loss=0.52"``
    (a name not yet logged is formatted as 0, as Lightning does before a first value)."""
    values = {**metrics, "epoch": epoch, "step": step}

    def field(match: re.Match) -> str:
        key, spec = match.group(1), (match.group(2) or ":")[1:]
        return f"{key}={format(values.get(key, 0), spec)}"

    try:
        name = _FIELD.sub(field, template)
    except ValueError as err:
        raise ValueError(f"ModelCheckpoint: filename {template!r}: {err}") from None
    if "/" in name or not name:
        raise ValueError(f"ModelCheckpoint: filename {template!r} must name a file, got {name!r}")
    return name


def _rotate(directory: Location, newest: Location, doomed: list[str], save_last: bool) -> None:
    """Global zero's file work after a save: point last.ckpt at it, delete what is not kept.
    (A sharded checkpoint is a directory, and a URL cannot hard-link: neither gets a
    last.ckpt, and one left by an earlier run goes; auto-resume finds the newest by its
    progress anyway.)"""
    local = newest.local
    if save_last and local is not None and local.is_file():
        atomic_link(local, local.with_name(LAST))
    elif (directory / LAST).exists():  # an earlier run's file: it would name older weights
        (directory / LAST).remove()
    for name in doomed:
        (directory / name).remove()
