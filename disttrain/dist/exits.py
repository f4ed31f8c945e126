"""How a rank process, or the launcher, ends: the exit codes of a stop, and aborting at once."""

from __future__ import annotations

import os
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- rerun the same command to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class NonFiniteLoss(RuntimeError):
    """Training stopped because the loss was NaN or inf on some rank
    (``stop_on_nonfinite_loss``): raised on every rank after the same step, before anything of
    the poisoned state was saved. ``found`` is every ``(rank, step, value)`` known, the first
    non-finite loss of each rank that had one. Uncaught, a failure: exit code 1."""

    def __init__(self, found: list[tuple[int, int, float]], stopped_after: int) -> None:
        unique = {(rank, step): value for rank, step, value in found}  # NaN != NaN: by key
        self.found = [(rank, step, value) for (rank, step), value in sorted(unique.items())]
        self.stopped_after = stopped_after
        where = "; ".join(f"the loss was {v} on rank {r} at step {s}" for r, s, v in self.found)
        super().__init__(
            f"{where}: every rank stopped after step {stopped_after} and nothing of that state "
            "was saved (stop_on_nonfinite_loss); resume='auto' goes on from the last "
            "checkpoint written before it"
        )


def exit_code_for(signal_name: str) -> int:
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


def abort_now(message: str) -> None:
    """Leave at once on a second Ctrl-C: one line, no traceback, no cleanup that could wait
    on another rank."""
    print(f"disttrain: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)
