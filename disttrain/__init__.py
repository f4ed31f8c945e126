"""disttrain: a distributed-first PyTorch trainer with Lightning 0.8's model hooks."""

from disttrain.callback import Callback
from disttrain.config import ConfigError, TrainerConfig
from disttrain.datamodule import DataModule
from disttrain.dispatch import HookFailed
from disttrain.hooks import HOOK_TABLE, Hook, ModelHooks, Ranks, Sync
from disttrain.module import Module
from disttrain.trainer import Trainer, seed_everything

__version__ = "0.1.0"

__all__ = [
    "HOOK_TABLE",
    "Callback",
    "ConfigError",
    "DataModule",
    "Hook",
    "HookFailed",
    "ModelHooks",
    "Module",
    "Ranks",
    "Sync",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "seed_everything",
]
