"""SIGTERM and Ctrl-C during training: a request every rank agrees on at a step boundary.

While the training loop runs, a signal only sets ``PreemptionWatcher.requested``; the stop
decisions (``disttrain.loop.stopping``) turn it into an agreed stop after the same step on
every rank, a checkpoint and ``Preempted``. A second Ctrl-C aborts at once
(``disttrain.dist.exits.abort_now``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from disttrain.dist.exits import abort_now, exit_code_for

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger("disttrain.preemption")


class Preempted(SystemExit):
    """Training stopped on a signal after an agreed step (a checkpoint was written, or the
    stop came before the first step and there was nothing to save). Global rank 0 has logged
    the message.

    A ``SystemExit`` whose code is ``exit_code``: a script that does not catch it ends with
    that code and no traceback, as an interrupted command should.
    """

    def __init__(self, message: str, signal_name: str = "SIGTERM") -> None:
        self.signal_name = signal_name
        self.exit_code = exit_code_for(signal_name)
        self.message = message
        super().__init__(self.exit_code)

    def __str__(self) -> str:
        return self.message


class PreemptionWatcher:
    """While active, SIGTERM and SIGINT only set ``requested``; the trainer acts on it at a
    step boundary. A second SIGINT aborts the process at once.

    Installed for the training loop only (the main thread's handlers are restored
    afterwards); a signal during start-up ends the process as usual.
    """

    def __init__(self, on_signal: Callable[[str], object] | None = None) -> None:
        self.requested: str | None = None  # the signal's name, e.g. "SIGINT"
        self._on_signal = on_signal  # e.g. dump the flight recorder: where was this rank?
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            abort_now("second interrupt: stopped at once, without a checkpoint")
        if self.requested is None:
            self.requested = name
            if signum == signal.SIGINT:  # the line under the ^C a person just typed
                log.warning(
                    "interrupted: every rank stops after the current step and writes a "
                    "checkpoint (Ctrl-C again to abort at once)"
                )
        if self._on_signal is not None:
            self._on_signal(name)

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous = {}
