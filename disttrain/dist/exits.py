"""How a rank process, or the launcher, ends: the exit codes of a stop, and aborting at once."""

from __future__ import annotations

import os
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- rerun the same command to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def exit_code_for(signal_name: str) -> int:
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


def abort_now(message: str) -> None:
    """Leave at once on a second Ctrl-C: one line, no traceback, no cleanup that could wait
    on another rank."""
    print(f"disttrain: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)
