"""The trainer's logger from ``Trainer(logger=...)``: the one place that decides which rank
writes (global rank 0; every other rank holds a ``NullLogger`` standing in for it)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from disttrain.loggers.core import Logger, LoggerGroup, NullLogger
from disttrain.loggers.csv_logs import CSVLogger
from disttrain.loggers.mlflow import MLflowLogger
from disttrain.loggers.tensorboard import TensorBoardLogger
from disttrain.loggers.wandb import WandbLogger
from disttrain.observe.console import writes_run_output

LOGGERS: dict[str, type[Logger]] = {  # the names logger= takes, each with its defaults
    "csv": CSVLogger,
    "tensorboard": TensorBoardLogger,
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}


def make_loggers(option: Any, run_dir: str | Path, rank: int) -> Logger:
    """The logger a rank uses for ``TrainerConfig.logger`` (a name, a ``Logger``, a
    ``{class_path, init_args}`` mapping, a list of these, or None): on the rank that writes,
    the logger itself (a ``LoggerGroup`` for a list); elsewhere a ``NullLogger`` standing in
    for it. Loggers given as objects are never touched on other ranks but for
    ``set_run_dir``, which creates nothing."""
    entries = option if isinstance(option, list) else [] if option in (None, False) else [option]
    built = [_build(entry) for entry in entries]
    if not built:
        return NullLogger()
    logger = built[0] if len(built) == 1 and not isinstance(option, list) else LoggerGroup(built)
    logger.set_run_dir(run_dir)
    return logger if writes_run_output(rank) else NullLogger(logger)


def _build(entry: Any) -> Logger:
    if isinstance(entry, Logger):
        return entry
    if entry is True:
        return CSVLogger()
    if isinstance(entry, str) and entry in LOGGERS:
        return LOGGERS[entry]()
    if isinstance(entry, Mapping) and isinstance(entry.get("class_path"), str):
        module_name, _, name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        if not (isinstance(cls, type) and issubclass(cls, Logger)):
            raise TypeError(f"logger: '{entry['class_path']}' is not a disttrain Logger")
        return cls(**(entry.get("init_args") or {}))
    raise ValueError(
        f"logger: expected one of {', '.join(LOGGERS)}, a disttrain Logger, a "
        f"{{class_path, init_args}} mapping, a list of these, or false; got {entry!r}"
    )
