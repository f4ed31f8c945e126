"""``disttrain launch``: torch's elastic agent, with disttrain's Ctrl-C and failure report."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.run import get_args_parser, parse_args, run

from disttrain.dist.exits import abort_now, exit_code_for


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
        with _announcing_restarts():
            run(parse_args(torchrun_argv))
    except SignalException as err:  # the agent passed the signal on and waited for the workers
        # rank 0 said what the workers did (where the checkpoint went, or that none was
        # written); the launcher claims nothing of its own
        return exit_code_for(err.sigval.name)
    except ChildFailedError as err:
        rank, failure = root_cause(err.failures)
        if after_failure is not None:  # the flight recorder's trace, then the cause: last,
            after_failure()  # where the eye lands
        print(_failure_summary(rank, failure, err.failures), file=sys.stderr, flush=True)
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


# What a rank's error says when a peer rank died under it (gloo, NCCL): a consequence
PEER_LOSS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


def peer_loss(text: str) -> str | None:
    """What an error's text says if it says only that another rank went away, else None."""
    return next((marker for marker in PEER_LOSS if marker in text), None)


def root_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The failure that explains the others, as ``(global rank, failure)``.

    torch reports the earliest by its error file's time, in whole seconds: a rank killed by a
    signal writes no error file, so a surviving rank's "connection closed by peer" from the
    same second often wins. Here an error a rank raised itself comes first, then a death by
    a signal other than the SIGTERM the agent sends when it stops the group, then SIGTERM;
    a peer's loss comes last. Within a kind, the earliest."""

    def kind(failure: Any) -> int:
        if peer_loss(_message_of(failure)):
            return 3
        if failure.exitcode < 0:
            return 2 if failure.exitcode == -signal.SIGTERM else 1
        return 0

    rank = min(failures, key=lambda r: (kind(failures[r]), failures[r].timestamp, r))
    return rank, failures[rank]


def _message_of(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):  # the error file's content
        message = message.get("message", message)
        if isinstance(message, dict):
            message = message.get("message", "")
    return str(message).strip()


def _death(failure: Any) -> str:
    if failure.exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-failure.exitcode).name}"
    return f"failed (exit code {failure.exitcode})"


@contextlib.contextmanager
def _announcing_restarts() -> Iterator[None]:
    """Say, when the agent restarts the workers after a failure, which rank died and that the
    job goes on from its last checkpoint (the agent's own log line is silenced: it names no
    rank). torch has no public hook for it: the agent's monitor step is wrapped for the
    launcher's lifetime, and left alone if a torch version lacks it."""
    try:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    except ImportError:
        yield
        return
    original = getattr(LocalElasticAgent, "_monitor_workers", None)
    if original is None:
        yield
        return

    def monitor(agent: Any, group: Any) -> Any:
        result = original(agent, group)
        remaining = getattr(agent, "_remaining_restarts", 0)
        if result.is_failed() and result.failures and remaining > 0:
            rank, failure = root_cause(result.failures)
            total = group.spec.max_restarts
            print(
                f"disttrain: rank {rank} {_death(failure)}; restarting every rank from the last "
                f"checkpoint (restart {total - remaining + 1} of {total})",
                file=sys.stderr,
                flush=True,
            )
        return result

    LocalElasticAgent._monitor_workers = monitor  # type: ignore[method-assign]
    try:
        yield
    finally:
        LocalElasticAgent._monitor_workers = original  # type: ignore[method-assign]


def _failure_summary(rank: int, failure: Any, failures: dict[int, Any] | None = None) -> str:
    """The failing rank's error in a few lines: the message, not the traceback (which the
    worker wrote to its log file); a rank that died without an error of its own is named as
    such, and the ranks that only lost it as a peer are said to be a consequence."""
    text = _message_of(failure) or f"exit code {failure.exitcode}"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # only the exception line
        lines = lines[-1:]
    summary = "\n  ".join(lines[:12])
    if failure.exitcode < 0 and not isinstance(failure.message, dict):  # no error file
        head = f"disttrain: rank {rank} {_death(failure)}, without an error of its own"
        head += " (killed by hand, by the OS when out of memory, or by the scheduler?)"
    else:
        head = f"disttrain: rank {rank} failed first (exit code {failure.exitcode})"
    others = sorted(r for r, f in (failures or {}).items() if peer_loss(_message_of(f)))
    if others and rank not in others:
        after = ", ".join(map(str, others))
        summary += f"\n  (rank {after} then lost its connection to it: a consequence)"
    return f"{head}:\n  {summary}"
