"""Small pieces of the training step: the DDP forward router, losses, outputs, seeding."""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any

import torch

from disttrain.flight import FINISH, GRADIENT_SYNC, START


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
        output = self._training_step(*args)
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

    def __init__(self, device: torch.device, recorder: Any = None) -> None:
        self.weight = torch.nn.Parameter(torch.zeros((), device=device))
        # a tensor, not a float: a compiled model would otherwise recompile when a rank votes
        self._ballot = torch.zeros((), device=device)
        self._voting = False  # what _ballot holds: it is rewritten only when the vote changes
        self._seen = 0.0  # the weight's gradient when it was last read
        self._on_gpu = device.type == "cuda"
        self._pending: tuple[Any, torch.Tensor] | None = None  # GPU: (event, pinned copy)
        self._recorder = recorder

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
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(grad.device))
        previous, self._pending = self._pending, (event, host)
        if previous is None:
            return None
        # A step old, so normally long finished. With NCCL, backward returns before the
        # all-reduce runs: a rank whose peer never joined waits here, so the trace says so.
        if self._recorder is not None:
            self._recorder.record(START, GRADIENT_SYNC)
        previous[0].synchronize()
        if self._recorder is not None:
            self._recorder.record(FINISH, GRADIENT_SYNC)
        return previous[1]


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
