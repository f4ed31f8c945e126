"""The hooks you override: ``ModelHooks`` (a module's: every hook of Lightning 0.8's model
hooks, and Lightning 2.x's training, validation and test hooks at their Lightning 2.x moments)
and ``Callback`` (the notification hooks, for code kept out of the module,
``disttrain.api.callback_hooks``), each saying when it runs, on which ranks and whether it may
use collectives (the rules themselves are ``disttrain.ranks.table``)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.callback_hooks import Callback
from disttrain.data.transfer import move_to_device

__all__ = ["Callback", "ModelHooks", "overridden", "warn_deprecated_overrides"]

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState


class ModelHooks:
    """The hooks of Lightning 0.8's ``ModelHooks`` and Lightning 2.x's, scheduled by rank.

    Lightning 0.8's and 2.x's hooks of the same moment both run, 0.8's first at a start and
    last at an end (``on_epoch_start`` → ``on_train_epoch_start`` ... ``on_train_epoch_end``
    → ``on_epoch_end``), as in Lightning 1.x, which had both. Per micro-batch (every batch,
    also inside a gradient-accumulation window): ``on_batch_start``,
    ``on_train_batch_start``, ``on_before_backward``, ``backward``, ``on_after_backward``,
    ``on_train_batch_end``, ``on_batch_end``. Once per optimizer step:
    ``on_before_optimizer_step``, ``on_before_zero_grad``.

    Override any of them in your :class:`disttrain.Module`. Unless a docstring says otherwise a
    hook runs on every rank, in the same order, so it may call collectives (all ranks reach it).
    The default implementations do nothing, except ``backward`` and
    ``transfer_batch_to_device``, which do the work their names say.
    """

    def prepare_data(self) -> None:
        """Download and preprocess data, once, before anything else in any stage.

        Runs on global rank 0 only (on local rank 0 of every node with
        ``Trainer(prepare_data_per_node=True)``); every other rank waits for it, without a
        fixed timeout, as long as its heartbeat comes (a thread beats every
        ``prepare_data_heartbeat`` seconds while it runs). If it raises, every rank stops with
        an error naming the rank; if its rank dies or freezes, the others stop after
        ``prepare_data_heartbeat_timeout`` seconds of silence, naming it. A hang in a live
        process keeps beating: ``prepare_data_timeout`` bounds the whole wait.

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

    def configure_model(self, mesh: Any) -> None:
        """Parallelize the module on the device mesh, before FSDP2 shards its data dimension.

        Runs in fit on every rank after ``on_fit_start`` (the module is on its device) and
        before the module is sharded or wrapped and before ``configure_optimizers``; a
        verdict follows, so a failure on one rank stops every rank. ``mesh`` is torch's
        ``DeviceMesh`` with dimensions ``dp_replicate``, ``dp_shard`` and ``tp``
        (``Trainer(mesh=...)``, or ``strategy="hsdp"``), or None where the run has none
        (DDP, FSDP over every rank, the one-process debug mode, where the module then runs
        as it is). Apply a tensor-parallel plan to ``mesh["tp"]``::

            def configure_model(self, mesh):
                if mesh is not None and mesh["tp"].size() > 1:
                    parallelize_module(self.net, mesh["tp"],
                                       {"0": ColwiseParallel(), "2": RowwiseParallel()})

        The ``tp`` ranks of one data-parallel group read the same batches. May use
        collectives (all ranks run it; distributing parameters is one). Not called by
        validate, test or predict, which run the module unsharded.
        """

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

    def on_sanity_check_end(self) -> None:
        """Runs on every rank right after the sanity-check validation (Lightning 1.x/2.x).
        May use collectives."""

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
        """Runs on every rank at the very end of a training epoch, after validation,
        ``training_epoch_end`` and ``on_train_epoch_end``. May use collectives."""

    def on_train_epoch_start(self) -> None:
        """Lightning 2.x: runs on every rank at the beginning of a training epoch, right after
        ``on_epoch_start``. May use collectives."""

    def on_train_epoch_end(self) -> None:
        """Lightning 2.x: runs on every rank at the end of a training epoch, after validation
        and ``training_epoch_end``, before ``on_epoch_end`` (and so before the default
        ``ModelCheckpoint`` saves). What it logs is reduced with the epoch's values. May use
        collectives."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Lightning 2.x: runs on every rank once per batch (micro-batch under gradient
        accumulation), after ``transfer_batch_to_device`` (``batch`` is on the device) and
        before ``training_step``. Return ``-1`` to end this epoch's training: agreed as for
        ``on_batch_start`` (any rank's -1 stops every rank at this batch), which costs one
        small all-reduce per batch only when you override it. Must not call collectives."""
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Lightning 2.x: runs on every rank once per batch, after the optimizer step (if
        this batch ended an accumulation window) and before ``on_batch_end``: as in Lightning
        2, on every micro-batch under gradient accumulation. ``outputs`` is what
        ``training_step`` returned, detached, as Lightning 2 hands it: ``{"loss": loss,
        ...}`` (a loss returned alone becomes ``{"loss": loss}``; the loss is not divided by
        ``accumulate_grad_batches``); a list, one per optimizer, with several. May use
        collectives."""

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Lightning 2.x: runs on every rank before each ``backward``, with the loss it will
        get (divided by ``accumulate_grad_batches``, scaled under ``16-mixed``). Must not call
        collectives."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Lightning 2.x: runs on every rank once per optimizer step (not per micro-batch),
        per optimizer, before gradient clipping and ``optimizer.step()``: the gradients are
        all-reduced, and unscaled under ``16-mixed``. The place to inspect or change
        gradients. Must not call collectives."""

    def on_validation_start(self) -> None:
        """Lightning 2.x: runs on every rank at the start of a validation loop (sanity check
        and in-fit validation), after ``on_pre_performance_check`` and the switch to eval
        mode. May use collectives."""

    def on_validation_epoch_start(self) -> None:
        """Lightning 2.x: runs on every rank right before the first validation batch. May use
        collectives."""

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Lightning 2.x: runs on every rank before each ``validation_step``, after
        ``transfer_batch_to_device``. Ranks may hold different numbers of batches: must not
        call collectives."""

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Lightning 2.x: runs on every rank after each ``validation_step``, with what it
        returned. Must not call collectives (ranks may hold different numbers of batches)."""

    def on_validation_epoch_end(self) -> None:
        """Lightning 2.x: runs on every rank after ``validation_epoch_end``; what it logs is
        reduced over all ranks with the loop's values (the place to log epoch metrics). May
        use collectives."""

    def on_validation_end(self) -> None:
        """Lightning 2.x: runs on every rank at the end of a validation loop, after its
        values are reduced (``trainer.callback_metrics`` has them), before
        ``on_post_performance_check``. May use collectives."""

    def on_test_start(self) -> None:
        """Lightning 2.x: as ``on_validation_start``, on every rank, for ``Trainer.test``."""

    def on_test_epoch_start(self) -> None:
        """Lightning 2.x: as ``on_validation_epoch_start``, on every rank, for the test loop."""

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Lightning 2.x: as ``on_validation_batch_start``, on every rank, before each
        ``test_step``. Must not call collectives."""

    def on_test_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Lightning 2.x: as ``on_validation_batch_end``, on every rank, after each
        ``test_step``. Must not call collectives."""

    def on_test_epoch_end(self) -> None:
        """Lightning 2.x: as ``on_validation_epoch_end``, on every rank, after
        ``test_epoch_end``: what it logs is reduced over all ranks. May use collectives."""

    def on_test_end(self) -> None:
        """Lightning 2.x: as ``on_validation_end``, on every rank, at the end of the test
        loop. May use collectives."""

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
        once per optimizer step (at every accumulation boundary, not per micro-batch), per
        optimizer: the place to inspect updated weights."""

    def on_batch_end(self) -> None:
        """Runs on every rank at the end of every training batch (every micro-batch under
        gradient accumulation), after the optimizer step (if any) and
        ``on_train_batch_end``. For once per optimizer step, use ``on_before_optimizer_step``
        or ``on_before_zero_grad``. May use collectives."""

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
