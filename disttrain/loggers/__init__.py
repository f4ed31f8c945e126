"""Loggers: where metrics go. ``Trainer(logger=...)`` takes a name (``"csv"``, the default;
``"tensorboard"``, ``"mlflow"``, ``"wandb"``), one of these objects, your own ``Logger``, a
list of them, or ``False``; only global rank 0 writes (``disttrain.loggers.X`` is the
``class_path`` a config names)."""

from disttrain.loggers.build import LOGGERS, make_loggers
from disttrain.loggers.core import Logger, LoggerGroup, NullLogger
from disttrain.loggers.csv_logs import CSVLogger
from disttrain.loggers.mlflow import MLflowLogger
from disttrain.loggers.tensorboard import TensorBoardLogger
from disttrain.loggers.wandb import WandbLogger

__all__ = [
    "LOGGERS",
    "CSVLogger",
    "Logger",
    "LoggerGroup",
    "MLflowLogger",
    "NullLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_loggers",
]
