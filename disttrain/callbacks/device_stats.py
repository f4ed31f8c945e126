"""``DeviceStatsMonitor``: peak memory per rank (host RSS; CUDA allocated and reserved)."""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.hooks import Callback

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState

_MB = 1024 * 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    """This process's peaks so far, in MiB: ``peak_rss_mb`` (``getrusage``'s ``ru_maxrss``),
    and on CUDA ``max_allocated_mb``/``max_reserved_mb`` of ``device`` (no device sync)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    stats = {"peak_rss_mb": rss / (_MB if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        stats["max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / _MB
        stats["max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / _MB
    return stats


class DeviceStatsMonitor(Callback):
    """Log peak memory at the log points: ``memory/peak_rss_mb`` (the process's peak
    resident set, host memory: loader buffers, pinned memory, the model on CPU), and on CUDA
    ``memory/max_allocated_mb`` and ``memory/max_reserved_mb`` (torch's caching allocator).

    Every ``log_every_n_steps`` this rank's peaks go with the step metrics (the logger
    writes global rank 0's); at each epoch's end, in the epoch's one collective,
    ``memory/max/...`` is the largest over ranks and, with ``per_rank``,
    ``memory/rankR/...`` each rank's. Reading them costs a system call, no device sync.
    """

    def __init__(self, per_rank: bool = True) -> None:
        self.per_rank = per_rank
        self._every = 1

    def on_train_start(self, trainer: TrainerState, module: Any) -> None:
        self._every = trainer.config.log_every_n_steps

    def on_before_zero_grad(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        if optimizer is trainer.optimizers[-1] and (trainer.global_step + 1) % self._every == 0:
            for name, value in memory_stats(trainer.device).items():
                module.log(f"memory/{name}", value, on_step=True, on_epoch=False)

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        rank = trainer.global_rank
        options = {"on_step": False, "on_epoch": True, "reduce": "max", "batch_size": 1}
        for name, value in memory_stats(trainer.device).items():
            module.log(f"memory/max/{name}", value, **options)
            if self.per_rank:
                module.log(f"memory/rank{rank}/{name}", value, **options)
