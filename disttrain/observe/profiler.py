"""``Trainer(profiler="simple")``: time per hook and per loop phase, with the slowest rank.

Timing is attached when a run starts (wrapped hook callables, forward hooks on the module,
optimizer step hooks, a timing iterator over the data), so with the profiler off nothing of
it exists and the loop costs exactly what it costs without.

On CUDA, Python returns from a forward or an optimizer step once its kernels are queued: a
CPU clock would time the launches. There the forward, the optimizer step and whatever
``timed`` is told runs on the GPU are timed with CUDA events recorded on the current stream
around the work, read once in ``summary()`` (no synchronisation per step).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

TRAINING_LOOP = "training loop"  # the phase every share is of: all epochs of a fit


class SimpleProfiler:
    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._gpu_spans: list[tuple[str, Any, Any]] = []  # (name, start, end) CUDA events

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds
        self.calls[name] += 1

    def timed(
        self, name: str, fn: Callable[..., Any], device: torch.device | None = None
    ) -> Callable[..., Any]:
        """``fn`` timed under ``name``: GPU time when ``device`` is a CUDA device."""
        if _on_gpu(device):
            return self._gpu_timed(name, fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return wrapper

    def _gpu_timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self._gpu_mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self._gpu_spans.append((name, start, self._gpu_mark()))

        return wrapper

    @staticmethod
    def _gpu_mark() -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream, after the work queued so far
        return event

    def _gpu_start_end(self, name: str) -> tuple[Callable[..., None], Callable[..., None]]:
        """A pre- and a post-hook that time the GPU work between them."""
        starts: list[Any] = []

        def pre(*_: Any) -> None:
            starts.append(self._gpu_mark())

        def post(*_: Any) -> None:
            self._gpu_spans.append((name, starts.pop(), self._gpu_mark()))

        return pre, post

    def timed_iter(self, name: str, iterator: Iterator[Any]) -> Iterator[Any]:
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.add(name, time.perf_counter() - start)
            yield item

    def watch_module(self, module: torch.nn.Module, name: str = "forward") -> None:
        if _on_gpu(_device_of(module.parameters())):
            pre, post = self._gpu_start_end(name)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
            return
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self.add(name, time.perf_counter() - starts.pop()))

    def watch_optimizer(
        self, optimizer: torch.optim.Optimizer, name: str = "optimizer step"
    ) -> None:
        params = (p for group in optimizer.param_groups for p in group["params"])
        if _on_gpu(_device_of(params)):
            pre, post = self._gpu_start_end(name)
            optimizer.register_step_pre_hook(pre)
            optimizer.register_step_post_hook(post)
            return
        starts: list[float] = []
        optimizer.register_step_pre_hook(lambda *_: starts.append(time.perf_counter()))
        optimizer.register_step_post_hook(
            lambda *_: self.add(name, time.perf_counter() - starts.pop())
        )

    def summary(self) -> dict[str, tuple[int, float]]:
        """Calls and total seconds per name (the GPU spans read now, in one wait)."""
        if self._gpu_spans:
            self._gpu_spans[-1][2].synchronize()  # the last event: every earlier one is done
            for name, start, end in self._gpu_spans:
                self.add(name, start.elapsed_time(end) / 1e3)  # milliseconds
            self._gpu_spans.clear()
        return {name: (self.calls[name], self.totals[name]) for name in self.totals}


def _device_of(tensors: Any) -> torch.device | None:
    first = next(iter(tensors), None)
    return first.device if first is not None else None


def _on_gpu(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def report(per_rank: list[dict[str, tuple[int, float]]]) -> str:
    """A table: per phase/hook, calls, total and mean time (rank 0), the slowest rank, and
    the share of rank 0's training loop (the epochs, their validation included)."""
    names = sorted({n for summary in per_rank for n in summary},
                   key=lambda n: -per_rank[0].get(n, (0, 0.0))[1])  # fmt: skip
    loop = per_rank[0].get(TRAINING_LOOP, (0, 0.0))[1]
    rows = [f"{'phase / hook':<40}{'calls':>8}{'total s':>10}{'mean ms':>10}{'slowest rank':>14}"
            f"{'of loop':>9}"]  # fmt: skip
    for name in names:
        calls, total = per_rank[0].get(name, (0, 0.0))
        slowest = max(range(len(per_rank)), key=lambda r: per_rank[r].get(name, (0, 0.0))[1])
        slow_total = per_rank[slowest].get(name, (0, 0.0))[1]
        mean = 1e3 * total / calls if calls else 0.0
        share = f"{100 * total / loop:.1f}%" if loop else "-"
        rows.append(f"{name:<40}{calls:>8}{total:>10.3f}{mean:>10.3f}"
                    f"{f'{slowest} ({slow_total:.3f}s)':>14}{share:>9}")  # fmt: skip
    return "profile (rank 0's calls and times; the rank with the largest total):\n" + "\n".join(
        rows
    )
