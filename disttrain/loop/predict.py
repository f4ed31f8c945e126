"""``Trainer.predict``: every sample predicted once across the ranks, the predictions gathered
in dataset order on every rank, once, at the end (the picture: ``disttrain.ranks.table``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import overridden
from disttrain.api.module import Module
from disttrain.checkpoint.resume import restore_weights
from disttrain.data.loaders import predict_loader
from disttrain.data.transfer import move_to_device
from disttrain.data.workers import ended, reading
from disttrain.loop.run import Run
from disttrain.loop.session import open_session, write_run_files
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Action, Hook
from disttrain.rng import seed_rank

log = logging.getLogger("disttrain.predict")

_CPU = torch.device("cpu")


def run_prediction(
    run: Run,
    module: Module,
    datamodule: DataModule | None,
    dataloader: Any,
    ckpt_path: str | None,
    keep: bool,
) -> list[Any] | None:
    """The predict lifecycle of ``docs/lifecycle.md``. The loop over this rank's batches is
    one trainer action: no collective inside it (ranks hold different numbers of batches),
    and a verdict after it, so a failure on one rank stops every rank with its message."""
    with open_session(run, module, datamodule) as dispatcher:
        call = dispatcher.call
        call(Hook.PREPARE_DATA)
        dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, run, "predict")
        call(Hook.SETUP, "predict")
        module.to(device=run.device, dtype=run.param_dtype)  # *-true: the parameters' dtype
        restore_weights(run, ckpt_path)
        seed_rank(run.seed, run.global_rank)  # each rank draws its own (rng.py)
        loader = _loader_for(run, module, dataloader)
        with ended(loader), evaluating(module):
            call(Hook.ON_PREDICT_START)
            kept = dispatcher.run(Action.PREDICT, predict_shard, run, dispatcher, loader, keep)
            call(Hook.ON_PREDICT_END)
        predictions = None
        if keep:  # the ranks' blocks in rank order: the dataset's order
            parts = run.collectives.gather_object(kept)
            predictions = [outputs for part in parts for outputs in part]
        call(Hook.TEARDOWN, "predict")
    kept_what = f"{len(predictions)} batches returned" if predictions is not None else "none kept"
    log.info("predict: %d samples on this rank, %s", len(loader.sampler), kept_what)
    return predictions


def predict_shard(run: Run, dispatcher: Dispatcher, loader: Any, keep: bool) -> list[Any]:
    """``predict_step`` over this rank's block of the dataset under ``torch.inference_mode``;
    returns the outputs on the CPU (nothing with ``keep`` off).
    ``trainer.predict_batch_indices`` holds each batch's dataset indices meanwhile."""
    module = run.running_module
    step = module.predict_step
    batch_start = dispatcher.caller(Hook.ON_PREDICT_BATCH_START)
    batch_end = dispatcher.caller(Hook.ON_PREDICT_BATCH_END)
    transfer = dispatcher.caller(Hook.TRANSFER_BATCH_TO_DEVICE)
    kept: list[Any] = []
    convert = run.convert_input  # *-true: the batch's floats in the parameters' dtype
    with torch.inference_mode(), reading(loader) as batches:
        try:
            # the batch sampler again, in the main process: each batch's dataset indices
            for batch_idx, (batch, indices) in enumerate(zip(batches, loader.batch_sampler)):
                run.predict_batch_indices = indices
                batch_start(batch, batch_idx)
                batch = transfer(batch, run.device)
                batch = batch if convert is None else convert(batch)
                with run.autocast:  # around the step only: not around the loader's reading
                    outputs = step(batch, batch_idx)
                batch_end(outputs, batch, batch_idx)
                if keep:
                    kept.append(move_to_device(outputs, _CPU))
        finally:
            run.predict_batch_indices = None
    return kept


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it came in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _loader_for(run: Run, module: Module, dataloader: Any) -> Any:
    """The loader given to ``predict``, else the data module's or the module's, sharded in
    blocks for this rank (``data.loaders.predict_loader``)."""
    where = "Trainer.predict(dataloaders=...)"
    if dataloader is None:
        dm = run.datamodule
        use_dm = dm is not None and overridden(dm, "predict_dataloader", DataModule)
        source: Any = dm if use_dm else module
        where = f"{type(source).__name__}.predict_dataloader()"
        dataloader = source.predict_dataloader()
    if dataloader is None:
        raise ValueError(
            f"Trainer.predict: {type(module).__name__} needs predict_dataloader() returning a "
            "DataLoader (or a data module's), or pass Trainer.predict(dataloaders=...)"
        )
    return predict_loader(dataloader, run.env.rank, run.env.world_size, where)
