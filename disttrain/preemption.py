"""SIGTERM as a request to stop cleanly: agree, checkpoint, exit with ``EXIT_PREEMPTED``."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- rerun the same command to resume


class Preempted(Exception):
    """Training stopped on SIGTERM after an agreed step; a checkpoint was written."""

    exit_code = EXIT_PREEMPTED


class PreemptionWatcher:
    """While active, SIGTERM only sets ``requested``; the trainer acts on it at a step boundary.

    Installed for the training loop only (the main thread's handler is restored afterwards),
    so a SIGTERM during start-up still ends the process at once.
    """

    def __init__(self, on_signal: Callable[[], object] | None = None) -> None:
        self.requested = False
        self._on_signal = on_signal  # e.g. dump the flight recorder: where was this rank?
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._on_signal is not None:
            self._on_signal()

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
