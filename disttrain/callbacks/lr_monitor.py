"""``LearningRateMonitor``: each optimizer's learning rate, per param group, at the log points."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.hooks import Callback

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState


class LearningRateMonitor(Callback):
    """Log the learning rate each optimizer step used, as Lightning names it.

    ``lr-SGD`` for an optimizer with one param group; ``lr-AdamW/pg1``, ``lr-AdamW/pg2``
    with several (or the group's ``"name"`` entry, ``lr-AdamW/decay``); a second optimizer of
    the same class is ``lr-AdamW-1``. ``log_momentum`` adds ``momentum-...`` (``momentum``, or
    Adam's ``betas[0]``) and ``log_weight_decay`` adds ``weight_decay-...``.

    ``logging_interval="step"`` (default) records the value of the step that ends on each
    ``log_every_n_steps``, published with that step's metrics; ``"epoch"`` records it once per
    epoch, published with the epoch's values. Either way it rides the existing log points:
    no collective, nothing on the steps in between but a modulo.
    """

    def __init__(
        self,
        logging_interval: str = "step",
        log_momentum: bool = False,
        log_weight_decay: bool = False,
    ) -> None:
        if logging_interval not in ("step", "epoch"):
            raise ValueError(
                f"LearningRateMonitor: logging_interval must be 'step' or 'epoch', "
                f"got {logging_interval!r}"
            )
        self.logging_interval = logging_interval
        self.log_momentum, self.log_weight_decay = log_momentum, log_weight_decay
        self.names: list[list[str]] = []  # per optimizer, per param group: "lr-..."
        self._index: dict[int, int] = {}
        self._every = 1

    def on_train_start(self, trainer: TrainerState, module: Any) -> None:
        self.names = lr_names(trainer.optimizers)
        self._index = {id(optimizer): i for i, optimizer in enumerate(trainer.optimizers)}
        self._every = trainer.config.log_every_n_steps

    def on_before_zero_grad(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        # after optimizer.step(), before the step's scheduler and global_step += 1: the value
        # this step used, recorded for the step that is just ending when it is a log point
        if self.logging_interval == "step" and (trainer.global_step + 1) % self._every == 0:
            self._log(trainer, module, optimizer, on_step=True)

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        if self.logging_interval == "epoch":
            for optimizer in trainer.optimizers:
                self._log(trainer, module, optimizer, on_step=False)

    def _log(self, trainer: TrainerState, module: Any, optimizer: Any, on_step: bool) -> None:
        i = self._index.get(id(optimizer))
        if i is None:
            return
        groups = optimizer.param_groups
        if len(groups) != len(self.names[i]):  # add_param_group since: name them anew
            self.names = lr_names(trainer.optimizers)
        options = {"on_step": on_step, "on_epoch": not on_step, "reduce": "max", "batch_size": 1}
        for name, group in zip(self.names[i], groups):
            module.log(name, _value(group["lr"]), **options)
            if self.log_momentum:
                momentum = group.get("momentum", group.get("betas", (None,))[0])
                if momentum is not None:
                    module.log("momentum" + name[2:], _value(momentum), **options)
            if self.log_weight_decay and "weight_decay" in group:
                module.log("weight_decay" + name[2:], _value(group["weight_decay"]), **options)


def lr_names(optimizers: list[torch.optim.Optimizer]) -> list[list[str]]:
    """The metric name of every param group of every optimizer (see the class docstring)."""
    seen: collections.Counter[str] = collections.Counter()
    names = []
    for optimizer in optimizers:
        base = f"lr-{type(optimizer).__name__}"
        count = seen[base]
        seen[base] += 1
        if count:
            base = f"{base}-{count}"
        groups = optimizer.param_groups
        if len(groups) == 1:
            names.append([base])
        else:
            names.append([f"{base}/{g.get('name') or f'pg{j + 1}'}" for j, g in enumerate(groups)])
    return names


def _value(value: Any) -> Any:
    """A float, or a 1-element tensor left on its device (a ``capturable`` optimizer's)."""
    return value.detach() if isinstance(value, torch.Tensor) else float(value)
