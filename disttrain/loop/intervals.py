"""When validation runs inside an epoch: ``val_check_interval`` as the loop reads it."""

from __future__ import annotations

import math
from typing import Any

from disttrain.loop.run import Run


def batches_between_validations(cfg: Any, n_train: int | float) -> int | None:
    """``val_check_interval`` as a batch count (a multiple of the accumulation), or None."""
    interval = cfg.val_check_interval
    if interval is None or isinstance(interval, int):
        return interval
    if interval == 1.0:
        return None  # the epoch's end, where validation runs anyway
    if math.isinf(n_train):
        raise ValueError(
            f"val_check_interval={interval} is a fraction of the epoch, but the training "
            "dataloader has no length; give a batch count (an int)"
        )
    accumulate = cfg.accumulate_grad_batches
    batches = max(int(n_train * interval), accumulate)
    return batches - batches % accumulate


def validates_after(run: Run, every: int, n_train: int | float, trained: int) -> bool:
    """Whether validation runs after the ``trained``-th batch of the epoch (not at its last
    one, which ends the epoch with its own validation), or, with ``check_val_every_n_epoch``
    None, after every ``val_check_interval`` batches counted across epochs."""
    every_n_epochs = run.config.check_val_every_n_epoch
    if every_n_epochs is None:
        return run.global_step % (every // run.config.accumulate_grad_batches) == 0
    in_epoch = (run.current_epoch + 1) % every_n_epochs == 0
    return in_epoch and trained % every == 0 and trained < n_train
