"""Taking a checkpoint of a run and putting one back: every rank's part, global zero's file."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from disttrain.checkpoint.background import CheckpointWrites
from disttrain.checkpoint.format import (
    FORMAT,
    CheckpointError,
    Progress,
    begin_sharded,
    callback_keys,
    finish_sharded,
    plain_config,
    sharded_staging,
    write,
)
from disttrain.dist.exits import NonFiniteLoss
from disttrain.dist.fsdp import dcp_async_save, dcp_load, dcp_save, full_state_dict
from disttrain.ranks.dispatch import Dispatcher, HookFailed
from disttrain.ranks.table import Action, Hook
from disttrain.rng import rng_state
from disttrain.storage.location import Location, Where
from disttrain.version import __version__

if TYPE_CHECKING:  # source.py imports what imports this module
    from disttrain.checkpoint.run_view import CheckpointedRun

log = logging.getLogger("disttrain.checkpoint")


def gather_state(
    run: CheckpointedRun,
    progress: Progress,
    weights: bool = True,
    waits: bool = False,
    stage: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Assemble a checkpoint on every rank (collective: it gathers each rank's RNG state).
    Without ``weights`` (sharded checkpoints) the module and optimizers go to DCP instead.
    The same gather tells every rank of any rank's non-finite loss: then every rank raises
    ``NonFiniteLoss`` and nothing is saved. With ``waits``, each rank first waits for its
    background write in flight, and the gather tells every rank whether one failed: then
    every rank raises ``HookFailed`` naming the rank and its error. ``stage``, on the rank
    that writes in the background, copies the module's and optimizers' states to host
    memory while the gather runs; if it fails, the failure is kept as the write's."""
    data_position = run.data_position  # a stream's position: data/positions.py
    failed_write = run.checkpoint_writes.finished() if waits else ""
    position = data_position() if data_position is not None else None
    gathered = run.collectives.gather_object_started(
        (rng_state(), position, _nonfinite(run), failed_write)
    )
    module_state = run.running_module.state_dict() if weights else {}
    optimizer_states = [o.state_dict() for o in run.optimizers] if weights else []
    if stage is not None:
        try:
            module_state, optimizer_states = stage((module_state, optimizer_states))
        except Exception as error:  # told at the next save's gather or fit's end
            run.checkpoint_writes.fail(error)
    rngs, data, nonfinite, failed_writes = zip(*gathered())
    if any(nonfinite):
        raise NonFiniteLoss([f for found in nonfinite for f in found], run.global_step)
    failed = [rank for rank, text in enumerate(failed_writes) if text]
    if failed:
        raise HookFailed(Action.START_WRITE, failed, list(failed_writes))
    checkpoint = {
        "format": FORMAT,
        "versions": {"disttrain": __version__, "torch": str(torch.__version__)},
        "module": module_state,
        "hyper_parameters": dict(getattr(run.running_module, "hparams", {})),
        "optimizers": optimizer_states,
        "schedulers": [entry.scheduler.state_dict() for entry in run.schedulers],
        "scaler": run.scaler.state_dict() if run.scaler is not None else {},
        "progress": dataclasses.asdict(progress),
        "world_size": run.world_size,
        "data_world_size": run.data_world_size,  # fewer than world_size under tensor parallelism
        "rng": list(rngs),
        "data": list(data),
        "callbacks": {key: cb.state_dict() for key, cb in callback_keys(run).items()},
        "config": plain_config(run),
    }
    run.running("save_checkpoint").call(Hook.ON_SAVE_CHECKPOINT, checkpoint)
    return checkpoint


def save(
    run: CheckpointedRun,
    path: Where,
    progress: Progress,
    after_write: Callable[[], Any] | None = None,
) -> Location:
    """The collective save behind ``Trainer.save_checkpoint``: one file from global zero, or
    under FSDP a directory of every rank's shards that global zero completes (at a local
    path or an fsspec URL); then global zero's ``after_write``. With ``async_checkpointing``
    it returns once the state is in host memory, and the writes go on in the background
    (``background.py``)."""
    dispatcher = run.running("save_checkpoint")
    background = run.config.async_checkpointing
    writes = run.checkpoint_writes
    if background and run.sharded:  # never two at once; a failed write stops every rank here
        dispatcher.run(Action.FINISH_WRITES, writes.wait)
    after = after_write or _nothing
    if run.sharded:
        state = gather_state(run, progress, weights=False)
        dispatcher.run(Action.WRITE_CHECKPOINT, begin_sharded, path)  # then every rank writes
        staging = sharded_staging(path)
        if background:
            written = dcp_async_save(run.running_module, run.optimizers, staging, run.collectives)
            writes.start(written.result)
            finish = functools.partial(_finish_sharded_then, path, state, after)
            dispatcher.run(Action.WRITE_CHECKPOINT, writes.start, finish)
        else:
            dcp_save(run.running_module, run.optimizers, staging)
            dispatcher.run(Action.WRITE_CHECKPOINT, _finish_sharded_then, path, state, after)
    else:  # global zero writes: in the background, from host copies made during the gather
        stage = writes.to_host if background and dispatcher.runs_here(Action.START_WRITE) else None
        state = gather_state(run, progress, waits=background, stage=stage)
        if background:
            dispatcher.run(Action.START_WRITE, _write_in_background, writes, path, state, after)
        else:
            dispatcher.run(Action.WRITE_CHECKPOINT, _write_then, path, state, after)
    return Location.at(path)


def _write_then(path: Where, state: dict[str, Any], after: Callable[[], Any]) -> None:
    write(path, state)
    after()


def _finish_sharded_then(path: Where, state: dict[str, Any], after: Callable[[], Any]) -> None:
    finish_sharded(path, state)
    after()


def _write_in_background(
    writes: CheckpointWrites, path: Where, state: dict[str, Any], after: Callable[[], Any]
) -> None:
    """Global zero, the only rank writing, once its last write finished (``gather_state``
    waited for it, and copied the state to host memory): no collective of its own. Nothing
    starts if the copy failed; the failure is kept as the write's, which every rank learns
    of at the next checkpoint's gather or at the end of fit."""
    if not writes.holds_failure():
        writes.start(functools.partial(_write_then, path, state, after))


def _nothing() -> None:
    return None


def export(run: CheckpointedRun, path: Where, dispatcher: Dispatcher | None = None) -> Location:
    """The whole module's weights in one file (gathered from the shards under FSDP): a
    ``torch.save`` state dict, or a ``.safetensors`` file by the suffix (the ``safetensors``
    extra). After a session, through the ``dispatcher`` given (no collectives: global zero
    writes). None after a non-finite loss: within a session of several ranks, one every
    rank knows of."""
    alone = dispatcher is not None or run.world_size == 1  # no rank to agree with
    dispatcher = dispatcher or run.running("export_weights")
    found = _nonfinite(run, agreed=not alone)
    if found:  # trained on a NaN or inf loss: no weights of that state
        raise NonFiniteLoss(found, run.global_step)
    # every rank, before any collective: a missing extra fails alike everywhere
    writer = _safetensors_writer() if str(path).endswith(".safetensors") else write
    sharded = run.sharded
    module = run.running_module
    state = full_state_dict(module) if sharded else module.state_dict()
    weights = {k: v.detach().cpu() for k, v in state.items()}
    dispatcher.run(Action.WRITE_CHECKPOINT, writer, path, weights)
    return Location.at(path)


def _safetensors_writer() -> Callable[[Where, dict[str, torch.Tensor]], None]:
    """How a ``.safetensors`` export is written: loadable with ``safetensors.torch.load_file``
    alone, every key of the state dict (safetensors refuses tensors that share memory, such
    as tied weights: each one after the first is written as a copy)."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError(
            "export_weights to a .safetensors file needs safetensors: "
            "pip install 'disttrain[safetensors]'"
        ) from None

    def write_safetensors(path: Where, weights: dict[str, torch.Tensor]) -> None:
        seen: set[int] = set()
        unshared = {}
        for key, tensor in weights.items():
            where = tensor.untyped_storage().data_ptr()
            unshared[key] = (
                tensor.clone(memory_format=torch.contiguous_format)
                if where in seen
                else tensor.contiguous()
            )
            seen.add(where)
        data = save(unshared, metadata={"format": "pt"})
        Location.at(path).write_with(lambda f: f.write(data))

    return write_safetensors


def _nonfinite(run: CheckpointedRun, agreed: bool = False) -> list[tuple[int, int, float]]:
    found = run.nonfinite_losses
    return found(agreed) if found is not None else []


def restore(run: CheckpointedRun, checkpoint: dict[str, Any]) -> Progress:
    """Put a loaded checkpoint back into the trainer, module, optimizers and callbacks."""
    if "sharded" in checkpoint:  # DCP reshards to however the module is sharded now
        dcp_load(run.running_module, run.optimizers, checkpoint["sharded"])
    else:
        run.running_module.load_state_dict(checkpoint["module"])
        if len(checkpoint["optimizers"]) != len(run.optimizers):
            raise CheckpointError(
                f"the checkpoint has {len(checkpoint['optimizers'])} optimizer states but "
                f"configure_optimizers returned {len(run.optimizers)}"
            )
        for optimizer, state in zip(run.optimizers, checkpoint["optimizers"]):
            optimizer.load_state_dict(state)
    for entry, state in zip(run.schedulers, checkpoint.get("schedulers", [])):
        entry.scheduler.load_state_dict(state)
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("callbacks", {})
    for key, callback in callback_keys(run).items():
        if key in states:
            callback.load_state_dict(states[key])
    progress = Progress.from_dict(checkpoint["progress"])
    run.global_step = progress.global_step
    run.current_epoch = progress.epoch
    run.running("resume").call(Hook.ON_LOAD_CHECKPOINT, checkpoint)
    return progress
