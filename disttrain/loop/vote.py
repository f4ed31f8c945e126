"""The stop vote: every rank's votes ride the gradient all-reduce DDP makes anyway.

One extra zero parameter on the model DDP wraps carries, as its gradient, this rank's ballot
[stop, my data ends, my loss was not finite]; after DDP's all-reduce each slot grows exactly
when some rank voted. No collective of its own, no Python communication hook. The decisions
that cast and read votes are ``disttrain.loop.stopping``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from disttrain.dist.flight import FINISH, GRADIENT_SYNC, START


class StopVote:
    """This rank's votes as the gradient of one extra parameter of the DDP model.

    ``carried_by`` adds ``weight · ballot`` to the loss: the weight is zero, so the loss and
    every other gradient stay exactly as they were. A gradient hook on the weight replaces
    what backward computes for it (the ballot times the loss's gradient) by the ballot itself,
    [stop, my data ends, my loss was not finite] (1: yes, 0: no), whatever gradient reaches
    the loss from above (GradScaler's 65536, inf in a float16 loss; a user's ``backward``
    that scales the loss, zeroes it or makes it NaN). The hook is one Python call per
    backward (a custom autograd Function, a Python forward and backward, made the tiny DDP
    benchmark's step about 6% slower at world size 1).
    No optimizer owns the weight. DDP averages its gradient with the others in its own
    bucketed all-reduce (C++: no Python comm hook, no collective of its own). Ballots are
    never negative, so each slot of the weight's gradient, left to accumulate, grows exactly
    when some rank voted: reading both costs one ``tolist()``, clearing them nothing.
    """

    def __init__(
        self, device: torch.device, recorder: Any = None, timeout: float | None = None
    ) -> None:
        self.weight = torch.nn.Parameter(torch.zeros(SLOTS, device=device))
        # a tensor, not a float: a compiled model would otherwise recompile when a rank votes
        self._ballot = torch.zeros(SLOTS, device=device)
        # what is cast between a forward and its backward (a non-finite loss): read by the
        # hook only, since the forward saved _ballot for backward and it must not change there
        self._late = torch.zeros(SLOTS, device=device)
        self._late_nonfinite = self._late[2:]  # made once: cast_nonfinite runs per micro-batch
        ballot, late = self._ballot, self._late  # the hook holds tensors, not this object
        self.weight.register_hook(lambda from_above: ballot + late)
        self._voting = [False, False]  # what _ballot holds: rewritten only when a vote changes
        self._seen = [0.0] * SLOTS  # the weight's gradient when it was last read
        self.data_ended = False  # read with the stop vote: some rank's data ends at this step
        self.nonfinite = False  # read with the stop vote: some rank's loss was not finite
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

    def cast_nonfinite(self, flag: torch.Tensor) -> None:
        """Vote, from the next backward on, whether this rank's loss was not finite: ``flag``
        is a tensor on the vote's device, written there without waiting for it."""
        self._late_nonfinite.copy_(flag)

    def new_epoch(self) -> None:
        """Forget the votes carried so far (every rank, at the same point): a data-ended vote
        of the epoch before must not end this one. A stop is cast again from its cause."""
        if self.weight.grad is not None:
            self.weight.grad.zero_()
        self._seen, self._pending, self.data_ended = [0.0] * SLOTS, None, False
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
        self._seen, self.data_ended, self.nonfinite = total, voted[1], voted[2]
        return voted[0]

    def _copied_a_step_ago(self, grad: torch.Tensor) -> torch.Tensor | None:
        host = torch.empty(SLOTS, pin_memory=True)
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


SLOTS = 3  # the ballot: [stop, my data ends, my loss was not finite]
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
