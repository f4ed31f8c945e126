"""``Callback``: the notification hooks, for code kept out of the module; each runs where the
module's hook of the same name runs (``disttrain.api.hooks.ModelHooks`` says when)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState


class Callback:
    """Override any of these to observe or steer a run without touching the module.

    Every method receives ``(trainer, module, ...)`` with the same extra arguments as the
    module's hook of the same name (see :class:`disttrain.ModelHooks` for when each runs and on
    which ranks); callbacks run in list order before the module. The three hooks that do work
    (``prepare_data``, ``backward``, ``transfer_batch_to_device``) belong to the module alone.
    Return values are ignored.
    """

    def setup(self, trainer: TrainerState, module: Any, stage: str) -> None:
        """All ranks, before the module's ``setup``."""

    def teardown(self, trainer: TrainerState, module: Any, stage: str) -> None:
        """All ranks, before the module's ``teardown``."""

    def on_fit_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the very beginning of fit."""

    def on_fit_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the very end of fit."""

    def on_train_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, before the sanity check."""

    def on_train_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of training."""

    def on_sanity_check_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, before the sanity check (deprecated in the seed; warns once)."""

    def on_sanity_check_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after the sanity check."""

    def on_pre_performance_check(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the beginning of every validation loop."""

    def on_post_performance_check(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of every validation loop."""

    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the beginning of a training epoch."""

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of a training epoch."""

    def on_train_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after ``on_epoch_start``."""

    def on_train_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, before ``on_epoch_end``."""

    def on_batch_start(self, trainer: TrainerState, module: Any, batch: Any) -> None:
        """All ranks, before a training batch (its return value is ignored)."""

    def on_train_batch_start(
        self, trainer: TrainerState, module: Any, batch: Any, batch_idx: int
    ) -> None:
        """All ranks, every batch, after the transfer (its return value is ignored)."""

    def on_train_batch_end(
        self, trainer: TrainerState, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """All ranks, every batch (also inside an accumulation window)."""

    def on_before_backward(self, trainer: TrainerState, module: Any, loss: torch.Tensor) -> None:
        """All ranks, before each backward."""

    def on_before_optimizer_step(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        """All ranks, once per optimizer step, before clipping and ``optimizer.step()``."""

    def on_after_backward(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after each backward."""

    def on_before_zero_grad(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        """All ranks, after each optimizer step and before its ``zero_grad``."""

    def on_batch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of a training batch."""

    def on_validation_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the start of a validation loop."""

    def on_validation_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, before the first validation batch."""

    def on_validation_batch_start(
        self,
        trainer: TrainerState,
        module: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """All ranks, before each ``validation_step``."""

    def on_validation_batch_end(
        self,
        trainer: TrainerState,
        module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """All ranks, after each ``validation_step``."""

    def on_validation_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after ``validation_epoch_end``, before the values are reduced."""

    def on_validation_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of a validation loop."""

    def on_test_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the start of the test loop."""

    def on_test_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, before the first test batch."""

    def on_test_batch_start(
        self,
        trainer: TrainerState,
        module: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """All ranks, before each ``test_step``."""

    def on_test_batch_end(
        self,
        trainer: TrainerState,
        module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """All ranks, after each ``test_step``."""

    def on_test_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after ``test_epoch_end``, before the values are reduced."""

    def on_test_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of the test loop."""

    def on_save_checkpoint(
        self, trainer: TrainerState, module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """All ranks, while a checkpoint is assembled; add entries to ``checkpoint``."""

    def on_load_checkpoint(
        self, trainer: TrainerState, module: Any, checkpoint: dict[str, Any]
    ) -> None:
        """All ranks, when a run resumes from ``checkpoint``."""

    def on_predict_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the beginning of predict; a verdict follows."""

    def on_predict_batch_start(
        self, trainer: TrainerState, module: Any, batch: Any, batch_idx: int
    ) -> None:
        """All ranks, before each predict batch (no collectives)."""

    def on_predict_batch_end(
        self, trainer: TrainerState, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """All ranks, after each ``predict_step`` (no collectives)."""

    def on_predict_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, once every rank finished predicting; a verdict follows."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state, saved in every checkpoint (under its class name)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, when a run resumes."""
