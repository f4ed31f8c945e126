"""disttrain: a distributed-first PyTorch trainer with Lightning 0.8's model hooks."""

from disttrain.callback import Callback
from disttrain.callbacks import EarlyStopping, ModelCheckpoint
from disttrain.checkpoint import CheckpointError
from disttrain.config import ConfigError, TrainerConfig
from disttrain.datamodule import DataModule
from disttrain.dispatch import HookFailed
from disttrain.hooks import HOOK_TABLE, Hook, ModelHooks, Ranks, Sync
from disttrain.module import Module
from disttrain.preemption import EXIT_PREEMPTED, Preempted
from disttrain.steps import seed_everything
from disttrain.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "EXIT_PREEMPTED",
    "HOOK_TABLE",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DataModule",
    "EarlyStopping",
    "Hook",
    "HookFailed",
    "ModelCheckpoint",
    "ModelHooks",
    "Module",
    "Preempted",
    "Ranks",
    "Sync",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "seed_everything",
]
