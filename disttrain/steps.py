"""Small pieces of the training step: the DDP forward router, losses, outputs, seeding."""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from disttrain.flight import FINISH, GRADIENT_SYNC, START
from disttrain.transfer import uncarried


class TrainingStep(torch.nn.Module):
    """Routes DDP's forward to ``training_step``, so DDP sees the step and syncs its gradients;
    with a stop vote attached the loss also carries this rank's vote into backward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        # plain attributes (not submodules) for what every forward reads: no Module lookup
        self._training_step = module.training_step
        self._vote: StopVote | None = None

    def attach(self, vote: StopVote) -> None:
        """Carry ``vote``: its weight becomes a parameter of this module, so DDP reduces it."""
        self.register_parameter("stop_vote", vote.weight)
        self._vote = vote

    def forward(self, *args: Any) -> Any:
        output = self._training_step(*uncarried(args))  # the batch exactly as transferred
        vote = self._vote
        return output if vote is None else vote.carried_by(output)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # one process: there is no gradient sync to skip


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


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (every device) and, if it is loaded, numpy's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "training_step must return a loss tensor or a dict with 'loss'; "
        f"got {type(output).__name__}"
    )


def detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    return output


def per_batch(outputs: list[Any], n_optimizers: int) -> list[Any]:
    if n_optimizers == 1:
        return outputs
    return [outputs[i : i + n_optimizers] for i in range(0, len(outputs), n_optimizers)]


def scalar_metrics(result: Any) -> dict[str, float]:
    """The scalar entries of what an ``*_epoch_end`` returned, as floats."""
    if not isinstance(result, dict):
        return {}
    metrics = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[str(key)] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[str(key)] = float(value)
    return metrics
