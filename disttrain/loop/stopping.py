"""Every way a run stops early, in one place.

- ``on_batch_start`` returning -1 on any rank: the dispatcher's agreement (``agree_stop``),
  which ends the epoch's training on every rank at the same batch.
- ``trainer.should_stop`` (early stopping, a user's hook), SIGTERM and Ctrl-C (SIGINT): a
  vote that rides the next step's gradient all-reduce (``StopVote``, no collective of its
  own), read after every optimizer step; at an epoch's end it rides the epoch's metric
  reduction instead. A signal also writes a checkpoint and raises ``Preempted``.
- ``max_steps``: a value every rank compares alike, so no vote is needed.
- Data that ran out on one rank before the others (uneven streams, a custom sampler): the
  loop reads one accumulation window ahead (``DataAhead``), and a rank without a complete
  window after this one votes "my data ends" on the same ride as the stop vote; every rank
  leaves the epoch after the step where the shortest rank's data ends (``Stopping.data_ended``),
  and the epoch then ends as usual. One agreement at each epoch's start covers a rank whose
  data ends within the first window(s).

A second Ctrl-C aborts at once (``abort_now``). Exit codes: ``EXIT_PREEMPTED`` (75) after
SIGTERM, what schedulers requeue on; ``EXIT_INTERRUPTED`` (130) after Ctrl-C."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch

from disttrain.data.loaders import DataAhead
from disttrain.observe.flight import FINISH, GRADIENT_SYNC, START


class StopVote:
    """This rank's votes as the gradient of one extra parameter of the DDP model.

    ``carried_by`` adds ``weight · ballot`` to the loss: the weight is zero, so the loss and
    every other gradient stay exactly as they were. A gradient hook on the weight replaces
    what backward computes for it (the ballot times the loss's gradient) by the ballot itself,
    [stop, my data ends] (1: yes, 0: no), whatever gradient reaches the loss from above
    (GradScaler's 65536, inf in a float16 loss; a user's ``backward`` that scales the loss,
    zeroes it or makes it NaN). The hook is one Python call per backward (a custom autograd
    Function, a Python forward and backward, made the tiny DDP benchmark's step about 6%
    slower at world size 1).
    No optimizer owns the weight. DDP averages its gradient with the others in its own
    bucketed all-reduce (C++: no Python comm hook, no collective of its own). Ballots are
    never negative, so each slot of the weight's gradient, left to accumulate, grows exactly
    when some rank voted: reading both costs one ``tolist()``, clearing them nothing.
    """

    def __init__(
        self, device: torch.device, recorder: Any = None, timeout: float | None = None
    ) -> None:
        self.weight = torch.nn.Parameter(torch.zeros(2, device=device))
        # a tensor, not a float: a compiled model would otherwise recompile when a rank votes
        self._ballot = torch.zeros(2, device=device)
        ballot = self._ballot  # the hook holds the tensor, not this object (no cycle)
        self.weight.register_hook(lambda from_above: ballot.clone())
        self._voting = [False, False]  # what _ballot holds: rewritten only when a vote changes
        self._seen = [0.0, 0.0]  # the weight's gradient when it was last read
        self.data_ended = False  # read with the stop vote: some rank's data ends at this step
        self._on_gpu = device.type == "cuda"
        self.lag = 1 if self._on_gpu else 0  # steps between a backward and reading its votes
        self._pending: tuple[Any, torch.Tensor, float] | None = None  # GPU: (event, copy, when)
        self._recorder = recorder
        if timeout is None:  # the collective timeout of the trainer the recorder reports on
            trainer = getattr(recorder, "progress", None)
            timeout = getattr(getattr(trainer, "config", None), "timeout", DEFAULT_TIMEOUT)
        self._timeout = float(timeout)

    def carried_by(self, output: Any) -> Any:
        """``output`` (a loss, or a dict with one) whose loss also carries this rank's vote:
        exactly ``loss``, in its dtype, whose backward gives the weight the ballot as its
        gradient. A loss that needs no gradient is left alone, so backward reports it."""
        if isinstance(output, torch.Tensor):
            if not output.requires_grad:
                return output
            votes = (self.weight * self._ballot).sum()  # elementwise: autocast leaves it
            if output.dtype is not self.weight.dtype:  # keep a bf16/fp16 loss in its dtype
                return output + votes.to(output.dtype)
            return output + votes
        if isinstance(output, dict) and "loss" in output:
            return {**output, "loss": self.carried_by(output["loss"])}
        return output  # not a loss: loss_of reports it

    def cast(self, slot: int, vote: bool) -> None:
        if vote is not self._voting[slot]:
            self._voting[slot] = vote
            self._ballot[slot].fill_(1.0 if vote else 0.0)

    def new_epoch(self) -> None:
        """Forget the votes carried so far (every rank, at the same point): a data-ended vote
        of the epoch before must not end this one. A stop is cast again from its cause."""
        if self.weight.grad is not None:
            self.weight.grad.zero_()
        self._seen, self._pending, self.data_ended = [0.0, 0.0], None, False
        self.cast(1, False)

    def agreed(self, local_vote: bool) -> bool:
        """Cast ``local_vote`` for the next forward; return whether any rank's vote rode a
        synchronised backward since the last call (``data_ended`` says the same of the data).

        On a GPU the answer lags one step, read from a copy taken without waiting: reading it
        at once would make the CPU wait for this step's all-reduce every step. Every rank
        reads the same step's votes either way, so every rank decides at the same step.
        """
        self.cast(0, local_vote)
        grad = self.weight.grad
        if grad is None:
            return False
        if self._on_gpu:
            grad = self._copied_a_step_ago(grad)
            if grad is None:
                return False
        total = grad.tolist()
        voted = [now > before for now, before in zip(total, self._seen)]
        self._seen, self.data_ended = total, voted[1]
        return voted[0]

    def _copied_a_step_ago(self, grad: torch.Tensor) -> torch.Tensor | None:
        host = torch.empty(2, pin_memory=True)
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


_UNKNOWN = 2**62  # a loader without a length, in an integer agreement

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
        self.data_ended = False  # after_step: every rank leaves the epoch after this step
        self._ends = False  # this rank's data-ended vote, where no StopVote carries it
        self._steps_left: int | None = None  # set where the epoch-start agreement decides

    def fewest_batches(self, n_train: int | float) -> int | float:
        """The fewest training batches any rank's loader has (once per fit): with loaders of
        uneven lengths every rank then ends each epoch at the same batch, with the same
        windows (FSDP gathers in every micro-batch, so windows must match, not only steps)."""
        if self.collectives.backend == "none":
            return n_train
        fewest = self.collectives.agree([_UNKNOWN if n_train == math.inf else n_train], "min")
        return math.inf if fewest[0] == _UNKNOWN else fewest[0]

    def start_epoch(
        self, items: Iterator[tuple[int, Any]], first: int, boundary: Callable[[int], bool]
    ) -> Iterator[tuple[int, Any]]:
        """The epoch's ``(batch_idx, batch)`` pairs. At world size > 1 they are read ahead
        (``DataAhead``) so that a rank votes "my data ends" in the backward of its last step;
        the votes are read as late as the stop votes (``lag`` steps), so the first windows are
        agreed once here: the fewest complete windows any rank has, up to 1 + lag."""
        self._ends, self._steps_left, self.data_ended = False, None, False
        if self.collectives.backend == "none":  # one process: its loop ends with its data
            return items
        if self.vote is not None:
            self.vote.new_epoch()
        ahead = DataAhead(items, boundary, 1 + (self.vote.lag if self.vote else 0))
        windows = self.collectives.agree([ahead.windows_after(first - 1)], "min")[0]
        if windows == 0:  # a rank has not one complete window: no step this epoch
            return iter(())
        if windows < ahead.depth:  # ends before the first vote can be read
            self._steps_left = windows
        return ahead  # its loader's workers end with the epoch's block (workers.reading)

    def before_step(self, items: Iterator[tuple[int, Any]], batch_idx: int) -> None:
        """Before a batch's forward: at a step's last batch, cast whether this rank's data
        ends too soon for another ``1 + lag`` complete windows (then every rank leaves after
        the step whose votes are read next)."""
        ahead = items if isinstance(items, DataAhead) else None
        if ahead is None or not ahead.boundary(batch_idx):
            return
        ends = ahead.windows_after(batch_idx) < ahead.depth
        if self.vote is not None:
            self.vote.cast(1, ends)
        else:
            self._ends = ends

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
        """Whether any rank voted to stop in the last synchronised step; ``data_ended`` is
        read on the same ride: whether a rank's data ends at this step."""
        local = self.local_vote(should_stop)
        if self.vote is None:  # no DDP model to carry it: nothing else synchronised this step
            stop, ended = map(bool, self.collectives.agree([local, self._ends]))
        else:  # rides the next step's gradient all-reduce
            stop, ended = self.vote.agreed(local), self.vote.data_ended
        if self._steps_left is not None:
            self._steps_left -= 1
            ended = ended or self._steps_left == 0
        self.data_ended = ended
        return stop

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
