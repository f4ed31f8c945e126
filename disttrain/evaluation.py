"""One pass of the validation or test loop, shared by fit, validate and test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from disttrain.hooks import Hook
from disttrain.steps import scalar_metrics


def evaluate(trainer: Any, call: Callable[..., Any], loader: Any, limit: int, kind: str) -> Any:
    """Run ``{kind}_step`` over ``loader`` with no collective per batch (the unwrapped module
    under DDP, the module unsharded for the whole loop under FSDP: ranks may hold different
    numbers of batches), then
    ``{kind}_epoch_end``; its logged epoch values are reduced over all ranks in one collective
    (not for the sanity check). Returns what ``{kind}_epoch_end`` returned."""
    module = trainer.module
    fit_step = trainer._step  # under FSDP, steps go through the sharded root's __call__
    step = fit_step.call(f"{kind}_step") if fit_step else getattr(module, f"{kind}_step")
    call(Hook.ON_PRE_PERFORMANCE_CHECK)
    was_training = module.training
    module.eval()
    outputs = []
    reporter = trainer.reporter
    reporter.evaluating = True
    evaluating = fit_step.evaluating() if fit_step else contextlib.nullcontext()
    with torch.no_grad(), trainer._autocast, evaluating:
        for batch_idx, batch in zip(range(limit), loader):
            batch = reporter.batch = call(Hook.TRANSFER_BATCH_TO_DEVICE, batch, trainer.device)
            outputs.append(step(batch, batch_idx))
    result = getattr(module, f"{kind}_epoch_end")(outputs)
    reporter.evaluating = False
    if trainer.sanity_checking:
        reporter.skip_evaluation()
    else:
        reporter.end_evaluation(trainer._collectives, trainer.global_step)
        trainer.callback_metrics.update(scalar_metrics(result))
    module.train(was_training)
    call(Hook.ON_POST_PERFORMANCE_CHECK)
    return result
