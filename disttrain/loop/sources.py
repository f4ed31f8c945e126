"""Which loader a run reads: the data module's where it defines one, else the module's, made
ready for this rank (``disttrain.data.loaders``: sharded training data, exact evaluation)."""

from __future__ import annotations

import math
from typing import Any

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import overridden
from disttrain.api.module import Module
from disttrain.data.loaders import eval_loader, limit_batches, train_loader
from disttrain.loop.run import Run


def train_loader_for(run: Run, module: Any) -> Any:
    """The training loader of the data module (if it has one) or the module, sharded."""
    source = _loader_source(run, module, "train_dataloader")
    where = f"{type(source).__name__}.train_dataloader()"
    seed = run.seed if run.seed is not None else 0
    loader = source.train_dataloader()
    return train_loader(loader, run.data_rank, run.data_world_size, seed, where)


def eval_loader_for(run: Run, module: Any, loader_name: str, step_name: str) -> Any:
    """An evaluation loader, sharded without padding; None if the module has no such step."""
    if not overridden(module, step_name, Module):
        return None
    source = _loader_source(run, module, loader_name)
    where = f"{type(source).__name__}.{loader_name}()"
    loader = getattr(source, loader_name)()
    return eval_loader(loader, run.data_rank, run.data_world_size, where)


def _loader_source(run: Run, module: Any, loader_name: str) -> Any:
    dm = run.datamodule
    return dm if dm is not None and overridden(dm, loader_name, DataModule) else module


def estimated_stepping_batches(run: Run) -> int | float:
    """The optimizer steps this fit takes (``math.inf`` when nothing bounds it): the batches
    of an epoch (per rank, after ``limit_train_batches``) over ``accumulate_grad_batches``,
    times the epochs, capped by ``max_steps``. Before the fit has built its loader (in
    ``configure_optimizers``, where a OneCycleLR needs it) the loader is built once to count."""
    cfg, module = run.config, run.module
    if module is None:
        raise RuntimeError(
            "trainer.estimated_stepping_batches is known during fit (e.g. in "
            "configure_optimizers), once the trainer has the module"
        )
    batches = run.num_training_batches or limit_batches(
        train_loader_for(run, module), cfg.limit_train_batches, "limit_train_batches"
    )
    per_epoch = batches if math.isinf(batches) else math.ceil(batches / cfg.accumulate_grad_batches)
    total = per_epoch * cfg.epoch_limit
    return total if cfg.max_steps is None else min(total, cfg.max_steps)
