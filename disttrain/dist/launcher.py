"""``disttrain launch``: torch's elastic agent, with disttrain's Ctrl-C and failure report."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.run import get_args_parser, parse_args, run

from disttrain.loop.stopping import abort_now, exit_code_for


def record_failure(error: BaseException) -> None:
    """Write a worker's exception to its error file, where the agent (and so the launcher's
    summary) reads which rank failed and why."""
    handler = get_error_handler()
    handler.initialize()
    handler.record_exception(error)


def launch_workers(torchrun_argv: list[str], after_failure: Any = None) -> int:
    """Start workers with ``torch.distributed.run`` (the elastic agent); their exit status.

    When a worker fails, the agent stops every worker, and the failing rank's error (from its
    error file) is summarised. A first Ctrl-C is passed on to the workers as one SIGINT (they
    stop after an agreed step and checkpoint); a second one kills them at once.
    """
    flags = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    if "--signals-to-handle" in flags:  # torch >= 2.7: SIGINT is ours, the rest the agent's
        torchrun_argv = ["--signals-to-handle=SIGTERM,SIGHUP,SIGQUIT", *torchrun_argv]
        previous = signal.signal(signal.SIGINT, _first_interrupt)
    else:
        previous = None
    # time for the workers' agreed stop and checkpoint before the agent kills them
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    # the agent's own lines repeat what disttrain reports in its words (which signal, which
    # rank failed); its errors about itself (rendezvous, start-up) still show
    for name, level in _QUIET_AGENT_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        run(parse_args(torchrun_argv))
    except SignalException as err:  # the agent passed the signal on and waited for the workers
        # rank 0 said what the workers did (where the checkpoint went, or that none was
        # written); the launcher claims nothing of its own
        return exit_code_for(err.sigval.name)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(_failure_summary(rank, failure), file=sys.stderr, flush=True)
        if after_failure is not None:
            after_failure()
        return failure.exitcode if failure.exitcode > 0 else 1  # killed by a signal: 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


_QUIET_AGENT_LOGGERS = {
    "torch.distributed.run": logging.ERROR,
    "torch.distributed.elastic.agent.server.api": logging.ERROR,
    "torch.distributed.elastic.multiprocessing.api": logging.CRITICAL,
}


def _first_interrupt(signum: int, frame: Any) -> None:
    """The launcher's first Ctrl-C: the agent sends the workers one SIGINT and waits for their
    agreed stop; from now on a second Ctrl-C kills them."""
    signal.signal(signal.SIGINT, _second_interrupt)
    raise SignalException("Ctrl-C", sigval=signal.Signals.SIGINT)


def _second_interrupt(signum: int, frame: Any) -> None:
    for pid in _child_pids():  # each worker leads its own session (torchrun starts them so)
        with contextlib.suppress(OSError):  # already gone
            os.killpg(pid, signal.SIGKILL)
    abort_now("second interrupt: workers killed at once, without a checkpoint")


def _child_pids() -> list[int]:
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def _failure_summary(rank: int, failure: Any) -> str:
    """The first failing rank's error in a few lines: the message, not the traceback (which
    the worker wrote to its log file)."""
    message = failure.message
    if isinstance(message, dict):  # the error file's content
        message = message.get("message", message)
        if isinstance(message, dict):
            message = message.get("message", "")
    text = str(message).strip() or f"exit code {failure.exitcode}"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # only the exception line
        lines = lines[-1:]
    summary = "\n  ".join(lines[:12])
    return f"disttrain: rank {rank} failed first (exit code {failure.exitcode}):\n  {summary}"
