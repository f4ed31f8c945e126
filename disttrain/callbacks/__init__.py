"""Callbacks: the ``Callback`` base and the ones disttrain ships (``disttrain.callbacks.X`` is
the ``class_path`` a config names)."""

from disttrain.api.hooks import Callback
from disttrain.callbacks.early_stopping import EarlyStopping
from disttrain.callbacks.model_checkpoint import ModelCheckpoint

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint"]
