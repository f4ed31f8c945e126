"""``Trainer(profiler="simple")``: time per hook and per loop phase, with the slowest rank.

Timing is attached when a run starts (wrapped hook callables, forward hooks on the module,
optimizer step hooks, a timing iterator over the data), so with the profiler off nothing of
it exists and the loop costs exactly what it costs without.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class SimpleProfiler:
    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds
        self.calls[name] += 1

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return wrapper

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
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self.add(name, time.perf_counter() - starts.pop()))

    def watch_optimizer(
        self, optimizer: torch.optim.Optimizer, name: str = "optimizer step"
    ) -> None:
        starts: list[float] = []
        optimizer.register_step_pre_hook(lambda *_: starts.append(time.perf_counter()))
        optimizer.register_step_post_hook(
            lambda *_: self.add(name, time.perf_counter() - starts.pop())
        )

    def summary(self) -> dict[str, tuple[int, float]]:
        return {name: (self.calls[name], self.totals[name]) for name in self.totals}


def report(per_rank: list[dict[str, tuple[int, float]]]) -> str:
    """A table: per phase/hook, calls, total and mean time (rank 0), and the slowest rank."""
    names = sorted({n for summary in per_rank for n in summary},
                   key=lambda n: -per_rank[0].get(n, (0, 0.0))[1])  # fmt: skip
    rows = [f"{'phase / hook':<40}{'calls':>8}{'total s':>10}{'mean ms':>10}{'slowest rank':>14}"]
    for name in names:
        calls, total = per_rank[0].get(name, (0, 0.0))
        slowest = max(range(len(per_rank)), key=lambda r: per_rank[r].get(name, (0, 0.0))[1])
        slow_total = per_rank[slowest].get(name, (0, 0.0))[1]
        mean = 1e3 * total / calls if calls else 0.0
        rows.append(f"{name:<40}{calls:>8}{total:>10.3f}{mean:>10.3f}"
                    f"{f'{slowest} ({slow_total:.3f}s)':>14}")  # fmt: skip
    return "profile (rank 0's calls and times; the rank with the largest total):\n" + "\n".join(
        rows
    )
