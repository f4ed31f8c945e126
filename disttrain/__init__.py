"""disttrain: a distributed-first PyTorch trainer with Lightning 0.8's model hooks."""

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import Callback, ModelHooks
from disttrain.api.module import Module
from disttrain.callbacks import (
    DeviceStatsMonitor,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    PredictionWriter,
    ThroughputMonitor,
)
from disttrain.checkpoint import inference  # noqa: F401 (Module.load_from_checkpoint)
from disttrain.checkpoint.format import CheckpointError
from disttrain.config.options import ConfigError, TrainerConfig
from disttrain.data.streams import ShardedStream
from disttrain.dist.exits import EXIT_PREEMPTED, NonFiniteLoss
from disttrain.loop.signals import Preempted
from disttrain.loop.trainer import Trainer
from disttrain.ranks.dispatch import HookFailed
from disttrain.ranks.table import HOOK_TABLE, Hook, Ranks, Sync
from disttrain.rng import seed_everything
from disttrain.version import __version__

__all__ = [
    "EXIT_PREEMPTED",
    "HOOK_TABLE",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DataModule",
    "DeviceStatsMonitor",
    "EarlyStopping",
    "Hook",
    "HookFailed",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelHooks",
    "ModelSummary",
    "Module",
    "NonFiniteLoss",
    "PredictionWriter",
    "Preempted",
    "Ranks",
    "ShardedStream",
    "Sync",
    "ThroughputMonitor",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "seed_everything",
]
