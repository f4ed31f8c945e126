"""Callbacks: the ``Callback`` base and the ones disttrain ships (``disttrain.callbacks.X`` is
the ``class_path`` a config names)."""

from disttrain.api.hooks import Callback
from disttrain.callbacks.device_stats import DeviceStatsMonitor
from disttrain.callbacks.early_stopping import EarlyStopping
from disttrain.callbacks.lr_monitor import LearningRateMonitor
from disttrain.callbacks.model_checkpoint import ModelCheckpoint
from disttrain.callbacks.model_summary import ModelSummary
from disttrain.callbacks.prediction_writer import PredictionWriter
from disttrain.callbacks.throughput import ThroughputMonitor

__all__ = [
    "Callback",
    "DeviceStatsMonitor",
    "EarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "PredictionWriter",
    "ThroughputMonitor",
]
