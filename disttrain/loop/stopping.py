"""Every way a run stops early, in one place.

- ``on_batch_start`` returning -1 on any rank: the dispatcher's agreement (``agree_stop``),
  which ends the epoch's training on every rank at the same batch.
- ``trainer.should_stop`` (early stopping, a user's hook), SIGTERM and Ctrl-C (SIGINT): a
  vote that rides the next step's gradient all-reduce (``StopVote``, no collective of its
  own), read after every optimizer step; at an epoch's end it rides the epoch's metric
  reduction instead. A signal also writes a checkpoint and raises ``Preempted``.
- ``max_steps``: a value every rank compares alike, so no vote is needed.

A second Ctrl-C aborts at once (``abort_now``). Exit codes: ``EXIT_PREEMPTED`` (75) after
SIGTERM, what schedulers requeue on; ``EXIT_INTERRUPTED`` (130) after Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from disttrain.observe.flight import FINISH, GRADIENT_SYNC, START


class StopVote:
    """This rank's stop vote as the gradient of one extra parameter of the DDP model.

    ``carried_by`` adds ``weight * ballot`` to the loss. The weight is zero and no optimizer
    owns it, so the loss and every other gradient stay exactly as they were, while the
    weight's gradient is the ballot (1: stop, 0: go on). DDP averages it with the other
    gradients in its own bucketed all-reduce (C++: no Python comm hook, no collective of
    its own). Ballots are never negative, so the weight's gradient, left to accumulate, grows
    exactly when some rank voted: reading it costs one ``item()``, clearing it nothing.
    """

    def __init__(
        self, device: torch.device, recorder: Any = None, timeout: float | None = None
    ) -> None:
        self.weight = torch.nn.Parameter(torch.zeros((), device=device))
        # a tensor, not a float: a compiled model would otherwise recompile when a rank votes
        self._ballot = torch.zeros((), device=device)
        self._voting = False  # what _ballot holds: it is rewritten only when the vote changes
        self._seen = 0.0  # the weight's gradient when it was last read
        self._on_gpu = device.type == "cuda"
        self._pending: tuple[Any, torch.Tensor, float] | None = None  # GPU: (event, copy, when)
        self._recorder = recorder
        if timeout is None:  # the collective timeout of the trainer the recorder reports on
            trainer = getattr(recorder, "progress", None)
            timeout = getattr(getattr(trainer, "config", None), "timeout", DEFAULT_TIMEOUT)
        self._timeout = float(timeout)

    def carried_by(self, output: Any) -> Any:
        """``output`` (a loss, or a dict with one) whose loss also carries this rank's vote:
        ``loss + weight * ballot``, exactly ``loss``, whose gradient for the weight is the
        ballot. A loss that needs no gradient is left alone, so backward reports it."""
        if isinstance(output, torch.Tensor):
            if not output.requires_grad:
                return output
            if output.dtype is not self.weight.dtype:  # keep a bf16/fp16 loss in its dtype
                return output + (self.weight * self._ballot).to(output.dtype)
            return torch.addcmul(output, self.weight, self._ballot)
        if isinstance(output, dict) and "loss" in output:
            return {**output, "loss": self.carried_by(output["loss"])}
        return output  # not a loss: loss_of reports it

    def agreed(self, local_vote: bool) -> bool:
        """Cast ``local_vote`` for the next forward; return whether any rank's vote rode a
        synchronised backward since the last call.

        On a GPU the answer lags one step, read from a copy taken without waiting: reading it
        at once would make the CPU wait for this step's all-reduce every step. Every rank
        reads the same step's votes either way, so every rank decides at the same step.
        """
        if local_vote is not self._voting:
            self._voting = local_vote
            self._ballot.fill_(1.0 if local_vote else 0.0)
        grad = self.weight.grad
        if grad is None:
            return False
        if self._on_gpu:
            grad = self._copied_a_step_ago(grad)
            if grad is None:
                return False
        total = grad.item()
        if total != total:  # NaN (a user's backward scaled by NaN): start over; votes recur
            self.weight.grad, self._seen, self._pending = None, 0.0, None
            return False
        voted, self._seen = total > self._seen, total
        return voted

    def _copied_a_step_ago(self, grad: torch.Tensor) -> torch.Tensor | None:
        host = torch.empty((), pin_memory=True)
        host.copy_(grad, non_blocking=True)
        # blocking: a wait on it sleeps in the driver instead of spinning a CPU core
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(grad.device))
        previous, self._pending = self._pending, (event, host, time.monotonic())
        if previous is None:
            return None
        self._wait(previous[0], previous[2])
        return previous[1]

    def _wait(self, event: Any, recorded_at: float) -> None:
        """Wait for the GPU to pass ``event`` (recorded at ``recorded_at``, after the backward
        whose all-reduce carried the votes), with a deadline.

        A step old, so normally long finished. With NCCL, backward returns before the
        all-reduce runs: a rank whose peer never joined waits here. An unbounded wait would
        end in NCCL's watchdog tearing the process down at the collective timeout, before
        the flight recorder could write which rank waited where; the deadline falls a margin
        before that timeout, so the trace is written and the error names this rank.
        """
        recorder = self._recorder
        if recorder is not None:
            recorder.record(START, GRADIENT_SYNC)
        deadline = recorded_at + self._timeout - deadline_margin(self._timeout)
        if not wait_for(event, deadline):
            rank = getattr(recorder, "rank", "?")
            waited = time.monotonic() - recorded_at
            message = (
                f"rank {rank}: the gradient all-reduce of the step before (it carries the stop "
                f"votes, in '{GRADIENT_SYNC}') has not finished after {waited:.0f}s: a peer "
                "rank never joined it. The flight recorder's trace says where each rank was."
            )
            if recorder is not None:
                recorder.dump(message)
            raise RuntimeError(message)
        if recorder is not None:
            recorder.record(FINISH, GRADIENT_SYNC)


DEFAULT_TIMEOUT = 1800.0  # TrainerConfig.timeout's default, for a vote built without a trainer


def deadline_margin(timeout: float) -> float:
    """How long before the collective timeout a wait gives up: time to write the trace."""
    return min(60.0, 0.1 * timeout)


def wait_for(
    event: Any,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll ``event.query()`` until it reports done (True) or ``clock()`` passes ``deadline``
    (False). The pause doubles from 0.1 ms to 50 ms: a finished event costs one query, a late
    one no busy CPU core."""
    pause = 1e-4
    while not event.query():
        now = clock()
        if now >= deadline:
            return False
        sleep(min(pause, deadline - now))
        pause = min(2 * pause, 0.05)
    return True


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- rerun the same command to resume


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


log = logging.getLogger("disttrain.preemption")


def exit_code_for(signal_name: str) -> int:
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


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


def abort_now(message: str) -> None:
    """Leave at once on a second Ctrl-C: one line, no traceback, no cleanup that could wait
    on another rank."""
    print(f"disttrain: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


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


def agree_on_minus_one(result: Any, any_true: Callable[[bool], bool]) -> Any:
    """``on_batch_start``'s agreement: -1 on any rank is -1 on every rank."""
    return -1 if any_true(result == -1) else result


_SIGNALS = (None, "SIGTERM", "SIGINT")  # ordered: an agreed stop reports the strongest


class Stopping:
    """One fit's stop decisions, each agreed by every rank at the same step.

    ``after_step`` is read after every optimizer step: the votes (``trainer.should_stop``,
    a signal) ride the next step's gradient all-reduce where DDP carries a ``StopVote``, or
    cost one agreement otherwise. ``for_signal`` turns an agreed stop into a checkpoint and
    ``Preempted`` when the stop came from a signal.
    """

    def __init__(self, collectives: Any, watcher: PreemptionWatcher) -> None:
        self.collectives, self.watcher = collectives, watcher
        self.vote: StopVote | None = None

    def attach_vote(self, router: Any, device: torch.device) -> None:
        """Carry votes in ``router``'s gradient all-reduce once DDP wraps it (no collective of
        their own). One process has nothing to agree with."""
        if self.collectives.backend == "none":
            return
        self.vote = StopVote(device, self.collectives.recorder, self.collectives.timeout)
        router.attach(self.vote)

    def local_vote(self, should_stop: bool) -> bool:
        return should_stop or self.watcher.requested is not None

    def after_step(self, should_stop: bool) -> bool:
        """Whether any rank voted to stop in the last synchronised step."""
        local = self.local_vote(should_stop)
        if self.vote is None:  # no DDP model to carry it: nothing else synchronised this step
            return self.collectives.any_true(local)
        return self.vote.agreed(local)  # rides the next step's gradient all-reduce

    def agreed_signal(self) -> str | None:
        """The stop signal any rank got (SIGINT over SIGTERM), the same on every rank."""
        code = torch.tensor([_SIGNALS.index(self.watcher.requested)], dtype=torch.int32)
        return _SIGNALS[int(self.collectives.all_reduce(code, "max").item())]

    def before_training(self) -> None:
        """A stop asked for during start-up: nothing trained, so nothing to checkpoint."""
        signal_name = self.agreed_signal()
        if signal_name is not None:
            message = f"stopped on {signal_name} before the first training step; nothing was saved"
            log.warning("%s", message)
            raise Preempted(message, signal_name)

    def for_signal(self, step: int, save: Callable[[], Any], resume: str | None) -> None:
        """After an agreed stop: if a rank got a signal, checkpoint (``save``, collective) and
        raise ``Preempted``; global rank 0 says where the checkpoint went and how to resume."""
        signal_name = self.agreed_signal()
        if signal_name is None:
            return
        path = save()
        command = os.environ.get("DISTTRAIN_RESUME_COMMAND")  # set by the disttrain command
        if command:
            how = f"To resume: {command}"
        elif resume == "auto":
            how = "Run the same command again to resume."
        else:
            how = "Run it again with resume='auto' to resume."
        message = (
            f"stopped on {signal_name} after step {step} (every rank after the same step); "
            f"checkpoint written to {path}. {how}"
        )
        log.warning("%s", message)
        raise Preempted(message, signal_name)
