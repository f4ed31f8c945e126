"""One pass of the validation or test loop, shared by fit, validate and test."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from disttrain.checkpoint.resume import restore_weights
from disttrain.data import loaders
from disttrain.data.loaders import batch_indices
from disttrain.data.workers import ended, reading
from disttrain.loop import sources
from disttrain.loop.outputs import scalar_metrics
from disttrain.loop.run import Run
from disttrain.loop.session import open_session, write_run_files
from disttrain.ranks.table import Action, Hook
from disttrain.rng import seed_rank

# Lightning 2.x's hooks of an evaluation loop, per kind: start, epoch start, batch start,
# batch end, epoch end, end.
_EVAL_HOOKS = {
    "validation": (
        Hook.ON_VALIDATION_START,
        Hook.ON_VALIDATION_EPOCH_START,
        Hook.ON_VALIDATION_BATCH_START,
        Hook.ON_VALIDATION_BATCH_END,
        Hook.ON_VALIDATION_EPOCH_END,
        Hook.ON_VALIDATION_END,
    ),
    "test": (
        Hook.ON_TEST_START,
        Hook.ON_TEST_EPOCH_START,
        Hook.ON_TEST_BATCH_START,
        Hook.ON_TEST_BATCH_END,
        Hook.ON_TEST_EPOCH_END,
        Hook.ON_TEST_END,
    ),
}


def evaluate(run: Run, call: Callable[..., Any], loader: Any, limit: int | float, kind: str) -> Any:
    """Run ``{kind}_step`` over ``loader`` with no collective per batch (the unwrapped module
    under DDP, the module unsharded for the whole loop under FSDP: ranks may hold different
    numbers of batches), then ``{kind}_epoch_end`` and ``on_{kind}_epoch_end``; the epoch
    values logged are reduced over all ranks in one collective (not for the sanity check).
    Returns what ``{kind}_epoch_end`` returned. The loader's workers end with the loop
    (persistent ones stay for the next validation, see ``workers.reading``)."""
    module = run.running_module
    fit_step = run.step  # under FSDP, steps go through the sharded root's __call__
    step = fit_step.call(f"{kind}_step") if fit_step else getattr(module, f"{kind}_step")
    start, epoch_start, batch_start, batch_end, epoch_end, end = _EVAL_HOOKS[kind]
    call(Hook.ON_PRE_PERFORMANCE_CHECK)
    was_training = module.training
    module.eval()
    call(start)
    call(epoch_start)
    outputs = []
    reporter = run.reporter
    reporter.evaluating = True
    evaluating = fit_step.evaluating() if fit_step else contextlib.nullcontext()
    convert = run.convert_input
    with torch.no_grad(), evaluating, reading(loader) as batches:
        for batch_idx, batch in zip(batch_indices(0, limit), batches):
            batch = call(Hook.TRANSFER_BATCH_TO_DEVICE, batch, run.device)
            batch = reporter.batch = batch if convert is None else convert(batch)
            call(batch_start, batch, batch_idx)
            with run.autocast:  # around the step only: not around the loader's reading
                out = step(batch, batch_idx)
            call(batch_end, out, batch, batch_idx)
            outputs.append(out)
    result = getattr(module, f"{kind}_epoch_end")(outputs)
    call(epoch_end)  # what it logs is reduced with the loop's values
    reporter.evaluating = False
    if run.sanity_checking:
        reporter.skip_evaluation()
    else:
        reporter.end_evaluation(run.collectives, run.global_step)
        run.callback_metrics.update(scalar_metrics(result))
    call(end)
    module.train(was_training)
    call(Hook.ON_POST_PERFORMANCE_CHECK)
    return result


log = logging.getLogger("disttrain.evaluation")

_STAGES = {  # stage: (loader, kind of step, limit option)
    "validate": ("val_dataloader", "validation", "limit_val_batches"),
    "test": ("test_dataloader", "test", "limit_test_batches"),
}


def run_evaluation(run: Run, module: Any, datamodule: Any, stage: str) -> Any:
    """``Trainer.validate`` / ``test``: the evaluation lifecycle of ``docs/lifecycle.md``, on
    the weights ``resume`` names (auto or a path). Returns what ``{kind}_epoch_end`` returned."""
    loader_name, kind, option = _STAGES[stage]
    with open_session(run, module, datamodule) as dispatcher:
        call = dispatcher.call
        call(Hook.PREPARE_DATA)
        dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, run, stage)
        call(Hook.SETUP, stage)
        module.to(device=run.device, dtype=run.param_dtype)
        restore_weights(run)  # with resume=auto|path
        seed_rank(run.seed, run.global_rank)  # each rank draws its own (rng.py)
        loader = sources.eval_loader_for(run, module, loader_name, f"{kind}_step")
        if loader is None:
            raise ValueError(
                f"Trainer.{stage}: {type(module).__name__} needs {loader_name}() returning a "
                f"DataLoader and a {kind}_step"
            )
        limit = loaders.limit_batches(loader, getattr(run.config, option), option)
        before = dict(run.logged_metrics)
        with ended(loader):  # its persistent workers
            result = evaluate(run, call, loader, limit, kind)
        run.logger.finalize()
        call(Hook.TEARDOWN, stage)
    found = {**run.logged_metrics, **scalar_metrics(result)}
    found = {k: v for k, v in found.items() if before.get(k) != v or k not in before}
    shown = "  ".join(f"{k} {v:.4g}" for k, v in found.items()) or "nothing logged or returned"
    log.info("%s at epoch %d, step %d: %s", stage, run.current_epoch, run.global_step, shown)
    return result
