"""The hooks you override: ``ModelHooks`` (a module's, every hook of Lightning 0.8's model
hooks) and ``Callback`` (the notification hooks, for code kept out of the module), each
saying when it runs, on which ranks and whether it may use collectives (the rules
themselves are ``disttrain.ranks.table``)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from disttrain.data.transfer import move_to_device

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState


class ModelHooks:
    """The hooks of Lightning 0.8's ``ModelHooks``, scheduled by rank.

    Override any of them in your :class:`disttrain.Module`. Unless a docstring says otherwise a
    hook runs on every rank, in the same order, so it may call collectives (all ranks reach it).
    The default implementations do nothing, except ``backward`` and
    ``transfer_batch_to_device``, which do the work their names say.
    """

    def prepare_data(self) -> None:
        """Download and preprocess data, once, before anything else in any stage.

        Runs on global rank 0 only (on local rank 0 of every node with
        ``Trainer(prepare_data_per_node=True)``); every other rank waits for it at a barrier
        with a long timeout. If it raises, every rank stops with an error naming the rank.

        Must not use collectives (the other ranks are not running it) and must not assign
        state (``self.something = ...``): the other ranks would not have it. Use ``setup``.
        disttrain raises an error naming any attribute it adds or changes.
        """

    def setup(self, stage: str) -> None:
        """Build what depends on data (layers, vocabularies) on every rank.

        Runs on all ranks after ``prepare_data`` and before the module is moved to its device
        and wrapped in DDP; ``stage`` is ``"fit"``, ``"validate"``, ``"test"`` or
        ``"predict"``. A failure on any rank stops every rank (a verdict follows). May use
        collectives.
        """

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` built, at the end of fit/validate/test/predict.

        Runs on all ranks, also when the stage ran to completion after an early stop; a verdict
        follows, then the process group is destroyed. May use collectives.
        """

    def on_fit_start(self) -> None:
        """Runs at the very beginning of fit on every rank, after ``setup`` and the move to
        the device, before the optimizers are configured and the module is wrapped in DDP.
        May use collectives."""

    def on_fit_end(self) -> None:
        """Runs at the very end of fit on every rank, after ``on_train_end``. May use
        collectives."""

    def on_train_start(self) -> None:
        """Runs on every rank at the beginning of training, before the sanity check; the
        module is already wrapped in DDP and the dataloaders are built. May use collectives."""

    def on_train_end(self) -> None:
        """Runs on every rank at the end of training, before the loggers are closed. May use
        collectives."""

    def on_sanity_check_start(self) -> None:
        """Runs on every rank right before the sanity-check validation.

        Deprecated in Lightning 0.8; still called, and overriding it warns once.
        """

    def on_pre_performance_check(self) -> None:
        """Runs on every rank at the very beginning of a validation loop (sanity check,
        in-fit validation, ``Trainer.validate`` and ``Trainer.test``). May use collectives."""

    def on_post_performance_check(self) -> None:
        """Runs on every rank at the very end of a validation loop, after
        ``validation_epoch_end``. May use collectives."""

    def on_epoch_start(self) -> None:
        """Runs on every rank at the very beginning of a training epoch, after the sampler's
        ``set_epoch``. May use collectives."""

    def on_epoch_end(self) -> None:
        """Runs on every rank at the very end of a training epoch, after validation and
        ``training_epoch_end``. May use collectives."""

    def on_batch_start(self, batch: Any) -> int | None:
        """Runs on every rank before anything happens to a training batch.

        ``batch`` is as the DataLoader returned it (still on the CPU). Return ``-1`` to skip
        the rest of this epoch's training: the decision is agreed, so if any rank returns -1
        every rank stops at this same batch; validation and the epoch-end hooks still run.
        Overriding this hook costs one small all-reduce per batch; not overriding it costs
        nothing. Must not call collectives of its own.
        """
        return None

    def transfer_batch_to_device(self, batch: Any, device: torch.device) -> Any:
        """Move a batch to ``device`` and return it, on every rank, before each step.

        The default moves tensors and anything with ``.to(device)`` inside any nesting of
        lists, tuples, namedtuples, dicts and dataclasses, keeping their types, with
        ``non_blocking=True`` for pinned memory. Override it for custom batch types and call
        ``super().transfer_batch_to_device(batch, device)`` for the rest. Local only: must not
        call collectives or modify the data.
        """
        return move_to_device(batch, device)

    def backward(
        self, trainer: TrainerState, loss: torch.Tensor, optimizer: Any, optimizer_idx: int
    ) -> None:
        """Compute gradients for ``loss``; the default is ``loss.backward()``.

        Runs on every rank, once per optimizer per batch. ``loss`` is already divided by
        ``accumulate_grad_batches`` (and scaled by the GradScaler with ``16-mixed``). Under DDP
        this is where gradients are all-reduced across ranks (except on micro-steps inside an
        accumulation window), so every rank must run it.
        """
        loss.backward()

    def on_after_backward(self) -> None:
        """Runs on every rank after ``backward`` and before the optimizers do anything: the
        place to inspect gradients (they are already all-reduced on accumulation boundaries)."""

    def on_before_zero_grad(self, optimizer: Any) -> None:
        """Runs on every rank after ``optimizer.step()`` and before ``optimizer.zero_grad()``,
        once per optimizer at every accumulation boundary: the place to inspect updated
        weights."""

    def on_batch_end(self) -> None:
        """Runs on every rank at the end of a training batch, after the optimizer step (if
        any). May use collectives."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add your own entries to ``checkpoint`` (a dict) before it is written.

        Runs on every rank whenever a checkpoint is saved (saving is collective); only global
        rank 0's dict is written, so put there what is the same on every rank (or what rank 0
        alone needs). Values must be tensors, numbers, strings, lists, tuples or dicts: files
        are loaded with ``weights_only=True``. Must not call collectives.
        """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read back what ``on_save_checkpoint`` added, when a run resumes.

        Runs on every rank after the module's weights are restored and before training goes
        on. Must not call collectives.
        """

    def on_predict_start(self) -> None:
        """Runs on every rank at the beginning of ``Trainer.predict``, in eval mode, before
        the loop over the batches; a verdict follows. May use collectives."""

    def on_predict_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Runs on every rank before each predict batch (``batch`` as the DataLoader returned
        it). Ranks may hold different numbers of batches: must not call collectives."""

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Runs on every rank after each ``predict_step``, with its ``outputs``;
        ``trainer.predict_batch_indices`` are the batch's dataset indices. Ranks may hold
        different numbers of batches: must not call collectives."""

    def on_predict_end(self) -> None:
        """Runs on every rank after every rank finished its predict batches, before the
        predictions are gathered; a verdict follows (a failure on any rank stops every rank).
        May use collectives."""


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

    def on_pre_performance_check(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the beginning of every validation loop."""

    def on_post_performance_check(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of every validation loop."""

    def on_epoch_start(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the beginning of a training epoch."""

    def on_epoch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of a training epoch."""

    def on_batch_start(self, trainer: TrainerState, module: Any, batch: Any) -> None:
        """All ranks, before a training batch (its return value is ignored)."""

    def on_after_backward(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, after each backward."""

    def on_before_zero_grad(self, trainer: TrainerState, module: Any, optimizer: Any) -> None:
        """All ranks, after each optimizer step and before its ``zero_grad``."""

    def on_batch_end(self, trainer: TrainerState, module: Any) -> None:
        """All ranks, at the end of a training batch."""

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


def overridden(obj: object, name: str, base: type) -> bool:
    """True if ``obj``'s class defines ``name`` differently from ``base``."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


_warned_deprecated: set[type] = set()


def warn_deprecated_overrides(obj: object, base: type) -> None:
    """Warn once per class that overrides ``on_sanity_check_start`` (deprecated in the seed)."""
    cls = type(obj)
    if cls in _warned_deprecated or not overridden(obj, "on_sanity_check_start", base):
        return
    _warned_deprecated.add(cls)
    warnings.warn(
        f"{cls.__name__}.on_sanity_check_start is deprecated (Lightning 0.8 removes it in 0.9); "
        "it is still called. Use on_train_start or on_pre_performance_check instead.",
        FutureWarning,
        stacklevel=3,
    )
