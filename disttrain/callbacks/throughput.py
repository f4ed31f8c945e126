"""``ThroughputMonitor``: samples, batches and tokens per second, FLOP/s and MFU.

Counted per batch (a length and an optional token count), timed at the log points only, and
published with the step metrics every ``log_every_n_steps`` (this rank's rates) and with the
epoch's values (every rank's rate, their total over ranks: the epoch's one collective).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from disttrain.api.hooks import Callback
from disttrain.observe.metrics import batch_size_of

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState

log = logging.getLogger("disttrain.callbacks")

# bf16 dense tensor-core peaks, FLOP/s per GPU, from NVIDIA's datasheets (their figures "with
# sparsity" halved): A100 datasheet, "BF16 Tensor Core 312 TFLOPS"; H100 datasheet, "BF16
# Tensor Core 1,979 TFLOPS*" SXM, 1,513 PCIe, 1,671 NVL (*with sparsity); H200 datasheet,
# "BF16 Tensor Core 1,979 TFLOPS*" SXM, 1,671 NVL. First match of the device name wins.
PEAK_BF16_DENSE: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200", "nvl"), 835e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),
    (("a100",), 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The bf16 dense peak of ``device`` if it is a known GPU (H100, H200, A100), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for parts, peak in PEAK_BF16_DENSE if all(p in name for p in parts)), None)


def first_numel(batch: Any) -> int:
    """The element count of the batch's first tensor: the tokens of an ``(inputs, targets)``
    batch of token ids shaped ``(batch, sequence)``."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple, type({}.values()))):
        for item in items:
            count = first_numel(item)
            if count:
                return count
    return 0


class ThroughputMonitor(Callback):
    """Log how fast training goes, at the log points; nothing in between but counting.

    Every ``log_every_n_steps`` (this rank's values; the logger writes global rank 0's):
    ``throughput/batches_per_sec``, ``throughput/samples_per_sec`` (a batch's samples: its
    first tensor's length), ``throughput/tokens_per_sec`` when ``tokens_per_batch`` says how
    many tokens a batch holds, ``throughput/flops_per_sec`` and, on a known GPU,
    ``throughput/mfu``. At each epoch's end, in the epoch's one collective:
    ``throughput/epoch/...`` (the total over ranks: samples, batches, tokens and FLOP/s
    summed, MFU averaged) and, with ``per_rank``, ``throughput/rankR/samples_per_sec``.

    ``tokens_per_batch``: a function ``batch -> int``, its dotted path (for YAML), or
    ``"numel"``: the element count of the batch's first tensor (token ids ``(B, T)``).
    FLOPs: the first optimizer step of each fit runs under ``torch.utils.flop_counter``'s
    ``FlopCounterMode`` (forward and backward of every micro-batch; the optimizer's own
    arithmetic is not counted), once; that step is left out of the rates. FLOP/s scale
    that count by samples, so batches of one shape are assumed. MFU divides a rank's FLOP/s
    by its device's bf16 dense peak (``PEAK_BF16_DENSE``: H100, H200, A100, NVIDIA's
    datasheets), or by ``peak_flops`` when given; on CPU only FLOP/s are logged.
    Validation time is left out of the clock (paused between the performance-check hooks);
    on CUDA the clock waits for the device at each log point only.
    """

    def __init__(
        self,
        tokens_per_batch: str | Callable[[Any], int] | None = None,
        per_rank: bool = True,
        measure_flops: bool = True,
        peak_flops: float | None = None,
    ) -> None:
        self.count_tokens = _token_counter(tokens_per_batch)
        self.per_rank, self.measure_flops, self.peak = per_rank, measure_flops, peak_flops
        self.flops_per_step: float | None = None  # as counted on the first step
        self._flops_per_sample = 0.0
        self._mode: FlopCounterMode | None = None
        self._warm = False  # the first step (measured, left out) has ended
        self._window = [0, 0, 0]  # batches, samples, tokens since the last log point
        self._epoch = [0, 0, 0]  # the same since the epoch's clock started
        self._t_window = self._t_epoch = 0.0
        self._paused, self._pause_at = 0.0, 0.0
        self._every = 1
        self._last: Any = None
        self._sync: Callable[[], None] | None = None

    # -- the clock: training time, validation left out ----------------------------------------
    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter() - self._paused

    def on_pre_performance_check(self, trainer: TrainerState, module: Any) -> None:
        self._pause_at = self._now() + self._paused

    def on_post_performance_check(self, trainer: TrainerState, module: Any) -> None:
        self._paused += time.perf_counter() - self._pause_at

    # -- counting -------------------------------------------------------------------------------
    def on_train_start(self, trainer: TrainerState, module: Any) -> None:
        self._every, self._last = trainer.config.log_every_n_steps, trainer.optimizers[-1]
        device = trainer.device
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        if self.peak is None:
            self.peak = peak_flops(device)
        self._warm = False

    def on_batch_start(self, trainer: TrainerState, module: Any, batch: Any) -> None:
        if not self._warm and self._mode is None and self.measure_flops:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        counts = self._window
        counts[0] += 1
        counts[1] += batch_size_of(batch)
        if self.count_tokens is not None:
            counts[2] += self.count_tokens(batch)

    def on_before_zero_grad(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        if optimizer is not self._last:  # the step ends with its last optimizer
            return
        if not self._warm:
            self._first_step_ended(trainer)
        elif (trainer.global_step + 1) % self._every == 0:  # a log point: see LR monitor
            now = self._now()
            rates = self._rates(self._window, now - self._t_window)
            for name, value in rates.items():
                module.log(f"throughput/{name}", value, on_step=True, on_epoch=False)
            self._add_window_to_epoch()
            self._t_window = now

    def _first_step_ended(self, trainer: TrainerState) -> None:
        samples = self._window[1]
        if self._mode is not None:
            self._close_mode()
            if self.flops_per_step is not None and samples:
                self._flops_per_sample = self.flops_per_step / samples
                log.info(
                    "ThroughputMonitor: %.4g FLOPs per optimizer step (forward and backward, "
                    "%d samples on this rank)",
                    self.flops_per_step,
                    samples,
                )
        self._warm = True
        self._window, self._epoch = [0, 0, 0], [0, 0, 0]
        self._t_window = self._t_epoch = self._now()

    def _close_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
            self.flops_per_step = float(mode.get_total_flops())

    def _add_window_to_epoch(self) -> None:
        self._epoch = [e + w for e, w in zip(self._epoch, self._window)]
        self._window = [0, 0, 0]

    def _rates(self, counts: list[int], seconds: float) -> dict[str, float]:
        if seconds <= 0:
            return {}
        batches, samples, tokens = counts
        rates = {"batches_per_sec": batches / seconds, "samples_per_sec": samples / seconds}
        if self.count_tokens is not None:
            rates["tokens_per_sec"] = tokens / seconds
        if self._flops_per_sample:
            rates["flops_per_sec"] = self._flops_per_sample * samples / seconds
            if self.peak:
                rates["mfu"] = rates["flops_per_sec"] / self.peak
        return rates

    # -- the epoch: every rank's rates in the epoch's collective ----------------------------
    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        if self._warm:
            self._window, self._epoch = [0, 0, 0], [0, 0, 0]
            self._t_window = self._t_epoch = self._now()

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        if self._mode is not None:  # an epoch without a finished step
            self._close_mode()
        if not self._warm:
            return
        self._add_window_to_epoch()
        rates = self._rates(self._epoch, self._now() - self._t_epoch)
        rank = trainer.global_rank
        for name, value in rates.items():
            reduce = "mean" if name == "mfu" else "sum"  # MFU: the mean over devices
            module.log(f"throughput/epoch/{name}", value, **_EPOCH, reduce=reduce)
            if self.per_rank:
                module.log(f"throughput/rank{rank}/{name}", value, **_EPOCH, reduce="max")

    def on_train_end(self, trainer: TrainerState, module: Any) -> None:
        self._close_mode()

    def teardown(self, trainer: TrainerState, module: Any, stage: str) -> None:
        self._close_mode()


_EPOCH = {"on_step": False, "on_epoch": True, "batch_size": 1}  # one value per rank


def _token_counter(spec: str | Callable[[Any], int] | None) -> Callable[[Any], int] | None:
    if spec is None or callable(spec):
        return spec
    if spec == "numel":
        return first_numel
    module_name, _, name = spec.rpartition(".")
    if not module_name:
        raise ValueError(
            f"ThroughputMonitor: tokens_per_batch must be 'numel', a function or its dotted "
            f"path (package.module.function), got {spec!r}"
        )
    return getattr(importlib.import_module(module_name), name)
