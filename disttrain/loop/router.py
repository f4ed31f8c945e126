"""The module DDP wraps: its forward is the user's ``training_step`` (and carries the stop vote)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from disttrain.data.transfer import uncarried
from disttrain.loop.vote import StopVote


class TrainingStep(torch.nn.Module):
    """Routes DDP's forward to ``training_step``, so DDP sees the step and syncs its gradients;
    with a stop vote attached the loss also carries this rank's vote into backward."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module
        # plain attributes (not submodules) for what every forward reads: no Module lookup
        self._training_step: Callable[..., Any] = module.training_step
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
