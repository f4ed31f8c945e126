"""The flight recorder: each rank's last few hundred events, dumped when something goes wrong.

Every rank appends (time, event, name, step) to a bounded deque: hooks entered and left,
collectives started and finished. That costs a tuple and an append per event. When a
collective times out, a rank raises, the process gets SIGUSR1 (or SIGTERM from the launcher
stopping a failed job), each rank writes ``RUN_DIR/flight/rank{R}.json``, and
``diagnose(RUN_DIR)`` (the launcher calls it after a failure) says which hook and step each
rank was in and which rank is missing from the collective the others wait in.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

ENTER, LEAVE, START, FINISH = "enter", "leave", "start", "finish"
GRADIENT_SYNC = "gradient sync in backward"  # DDP's all-reduce / FSDP's reduce-scatter, in C++


class FlightRecorder:
    def __init__(self, rank: int, capacity: int = 512) -> None:
        self.rank = rank
        self.events: collections.deque = collections.deque(maxlen=capacity)
        self.progress: Any = None  # the trainer: its global_step is read when recording
        self.directory: Path | None = None
        self.failed = False  # the first failure's trace is the one that tells where it began

    def record(self, event: str, name: str) -> None:
        progress = self.progress
        self.events.append((time.time(), event, name, progress.global_step if progress else 0))

    def dump(self, reason: str, failure: bool = True) -> Path | None:
        """Write the trace; after a failure's dump, later failure dumps keep the first."""
        if self.directory is None or (failure and self.failed):
            return None
        self.failed = self.failed or failure
        path = self.directory / f"rank{self.rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({
                "rank": self.rank, "pid": os.getpid(), "reason": reason, "time": time.time(),
                "events": list(self.events),
            }))  # fmt: skip
            os.replace(tmp, path)
        except OSError:
            return None  # diagnostics must never hide the error that triggered them
        return path

    def install_signal(self) -> Any:
        """SIGUSR1 dumps the trace (and the run goes on); returns the previous handler."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGUSR1, lambda *_: self.dump("SIGUSR1", failure=False))


def open_span(events: list) -> tuple[str, str, int, float] | None:
    """The innermost hook or collective entered and not left: (kind, name, step, since)."""
    stack: list[tuple[str, str, int, float]] = []
    for t, event, name, step in events:
        if event in (ENTER, START):
            stack.append(("collective" if event == START else "hook", name, step, t))
        elif stack and stack[-1][1] == name:
            stack.pop()
    return stack[-1] if stack else None


def diagnose(run_dir: str | Path) -> str | None:
    """A short account of where each rank was, from the traces in ``RUN_DIR/flight``."""
    files = sorted(Path(run_dir, "flight").glob("rank*.json"))
    if not files:
        return None
    traces = [json.loads(f.read_text()) for f in files]
    lines: list[str] = []
    waiting: list[int] = []
    elsewhere: list[int] = []
    for trace in sorted(traces, key=lambda t: t["rank"]):
        span = open_span(trace["events"])
        rank = trace["rank"]
        if span is None:
            lines.append(f"  rank {rank}: not inside any hook or collective ({trace['reason']})")
            elsewhere.append(rank)
            continue
        kind, name, step, since = span
        age = trace["time"] - since
        lines.append(f"  rank {rank}: in {kind} '{name}' at step {step} for {age:.1f}s "
                     f"({trace['reason']})")  # fmt: skip
        (waiting if kind == "collective" else elsewhere).append(rank)
    if waiting and elsewhere:
        lines.append(f"  ranks {waiting} wait in a collective that rank(s) {elsewhere} never "
                     f"joined: look at what rank(s) {elsewhere} were doing")  # fmt: skip
    return "flight recorder (last events of each rank):\n" + "\n".join(lines)
