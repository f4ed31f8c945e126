"""Taking a checkpoint of a run and putting one back: every rank's part, global zero's file."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from disttrain.checkpoint.format import (
    FORMAT,
    CheckpointError,
    Progress,
    callback_keys,
    finish_sharded,
    plain_config,
    sharded_tmp,
    write,
)
from disttrain.dist.fsdp import dcp_load, dcp_save, full_state_dict
from disttrain.ranks.table import Action, Hook
from disttrain.rng import rng_state
from disttrain.version import __version__

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.loop.trainer import Trainer

log = logging.getLogger("disttrain.checkpoint")


def gather_state(
    trainer: Trainer, call: Callable[..., Any], progress: Progress, weights: bool = True
) -> dict[str, Any]:
    """Assemble a checkpoint on every rank (collective: it gathers each rank's RNG state).
    Without ``weights`` (sharded checkpoints) the module and optimizers go to DCP instead."""
    data_position = trainer._data_position  # a stream's position: data/positions.py
    mine = (rng_state(), data_position() if data_position is not None else None)
    rngs, data = zip(*trainer.collectives.gather_object(mine))
    checkpoint = {
        "format": FORMAT,
        "versions": {"disttrain": __version__, "torch": str(torch.__version__)},
        "module": trainer.running_module.state_dict() if weights else {},
        "optimizers": [o.state_dict() for o in trainer.optimizers] if weights else [],
        "schedulers": [entry.scheduler.state_dict() for entry in trainer.schedulers],
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else {},
        "progress": dataclasses.asdict(progress),
        "world_size": trainer.world_size,
        "rng": list(rngs),
        "data": list(data),
        "callbacks": {key: cb.state_dict() for key, cb in callback_keys(trainer).items()},
        "config": plain_config(trainer),
    }
    call(Hook.ON_SAVE_CHECKPOINT, checkpoint)
    return checkpoint


def save(trainer: Trainer, dispatcher: Any, path: str | os.PathLike, progress: Progress) -> Path:
    """The collective save behind ``Trainer.save_checkpoint``: one file from global zero, or
    under FSDP a directory of every rank's shards that global zero completes."""
    if trainer.sharded:
        state = gather_state(trainer, dispatcher.call, progress, weights=False)
        dcp_save(trainer.running_module, trainer.optimizers, sharded_tmp(path))
        dispatcher.run(Action.WRITE_CHECKPOINT, finish_sharded, path, state)
    else:
        state = gather_state(trainer, dispatcher.call, progress)
        dispatcher.run(Action.WRITE_CHECKPOINT, write, path, state)
    return Path(path)


def export(trainer: Trainer, dispatcher: Any, path: str | os.PathLike) -> Path:
    """The whole module's weights in one file (gathered from the shards under FSDP)."""
    sharded = trainer.sharded
    module = trainer.running_module
    state = full_state_dict(module) if sharded else module.state_dict()
    weights = {k: v.detach().cpu() for k, v in state.items()}
    dispatcher.run(Action.WRITE_CHECKPOINT, write, path, weights)
    return Path(path)


def restore(trainer: Trainer, checkpoint: dict[str, Any], call: Callable[..., Any]) -> Progress:
    """Put a loaded checkpoint back into the trainer, module, optimizers and callbacks."""
    if "sharded" in checkpoint:  # DCP reshards to however the module is sharded now
        dcp_load(trainer.running_module, trainer.optimizers, checkpoint["sharded"])
    else:
        trainer.running_module.load_state_dict(checkpoint["module"])
        if len(checkpoint["optimizers"]) != len(trainer.optimizers):
            raise CheckpointError(
                f"the checkpoint has {len(checkpoint['optimizers'])} optimizer states but "
                f"configure_optimizers returned {len(trainer.optimizers)}"
            )
        for optimizer, state in zip(trainer.optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
    for entry, state in zip(trainer.schedulers, checkpoint.get("schedulers", [])):
        entry.scheduler.load_state_dict(state)
    if trainer.scaler is not None and checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("callbacks", {})
    for key, callback in callback_keys(trainer).items():
        if key in states:
            callback.load_state_dict(states[key])
    progress = Progress.from_dict(checkpoint["progress"])
    trainer.global_step = progress.global_step
    trainer.current_epoch = progress.epoch
    call(Hook.ON_LOAD_CHECKPOINT, checkpoint)
    return progress
