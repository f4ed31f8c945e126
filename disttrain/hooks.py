"""The model hooks, the table that says on which ranks each runs, and the loop they live in.

The whole of ``Trainer.fit``, with every hook in place (``[v]`` verdict, ``[a]`` agreement)::

    prepare_data()                       # global zero (local zero per node)  [v, long timeout]
    setup("fit")                         # all                                [v]
    module.to(device)
    on_fit_start()
    configure_optimizers(); wrap in DDP; dataloaders with distributed samplers
    on_train_start()
    on_sanity_check_start()
    on_pre_performance_check()           # sanity validation, num_sanity_val_steps batches
        transfer_batch_to_device(batch, device); validation_step(batch, i)
        validation_epoch_end(outputs)
    on_post_performance_check()
    for epoch:
        sampler.set_epoch(epoch)
        on_epoch_start()
        for batch_idx, batch in loader:
            on_batch_start(batch)                            # [a] -1 on any rank ends the epoch
            batch = transfer_batch_to_device(batch, device)
            for i, optimizer:                                # no grad all-reduce off-boundary
                loss = training_step(batch, batch_idx[, i]) / accumulate_grad_batches
                backward(trainer, loss, optimizer, i)
                on_after_backward()
            if accumulation boundary:
                for optimizer: clip; optimizer.step(); on_before_zero_grad(optimizer); zero_grad()
                step-interval schedulers
            on_batch_end()
        validation (every check_val_every_n_epoch), as the sanity check but on all batches
        training_epoch_end(outputs); on_epoch_end(); epoch-interval schedulers
    on_train_end()
    on_fit_end()
    teardown("fit")                      # all                                [v]

Every rank runs the same sequence; only ``prepare_data`` is limited to some ranks. Callbacks
run before the module's hook of the same name. ``HOOK_TABLE`` below is the single statement of
which ranks run a hook and what synchronisation follows; ``disttrain.dispatch`` applies it.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from disttrain.transfer import move_to_device


class Ranks(enum.Enum):
    """Which ranks run a hook."""

    ALL = "all"
    GLOBAL_ZERO = "global zero"
    LOCAL_ZERO = "local zero"


class Sync(enum.Enum):
    """What every rank does together after a hook."""

    NONE = "none"
    VERDICT = "verdict"
    VERDICT_LONG = "verdict (long timeout)"
    DECISION = "verdict, then global zero's result is sent to every rank"
    AGREE_STOP = "agreement (-1 on any rank stops every rank)"


class Hook(str, enum.Enum):
    PREPARE_DATA = "prepare_data"
    SETUP = "setup"
    ON_FIT_START = "on_fit_start"
    ON_TRAIN_START = "on_train_start"
    ON_SANITY_CHECK_START = "on_sanity_check_start"
    ON_PRE_PERFORMANCE_CHECK = "on_pre_performance_check"
    ON_POST_PERFORMANCE_CHECK = "on_post_performance_check"
    ON_EPOCH_START = "on_epoch_start"
    ON_BATCH_START = "on_batch_start"
    TRANSFER_BATCH_TO_DEVICE = "transfer_batch_to_device"
    BACKWARD = "backward"
    ON_AFTER_BACKWARD = "on_after_backward"
    ON_BEFORE_ZERO_GRAD = "on_before_zero_grad"
    ON_BATCH_END = "on_batch_end"
    ON_EPOCH_END = "on_epoch_end"
    ON_TRAIN_END = "on_train_end"
    ON_FIT_END = "on_fit_end"
    TEARDOWN = "teardown"
    ON_SAVE_CHECKPOINT = "on_save_checkpoint"
    ON_LOAD_CHECKPOINT = "on_load_checkpoint"


@dataclass(frozen=True)
class Rule:
    ranks: Ranks
    sync: Sync
    callbacks: bool = True  # False for the hooks that do work rather than notify
    forbids_state: bool = False  # True: assigning module attributes in the hook is an error


# hook                              ranks            sync that follows
HOOK_TABLE: Mapping[Hook, Rule] = {
    Hook.PREPARE_DATA:              Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT_LONG, callbacks=False, forbids_state=True),  # noqa: E501
    Hook.SETUP:                     Rule(Ranks.ALL, Sync.VERDICT_LONG),
    Hook.ON_FIT_START:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TRAIN_START:            Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_SANITY_CHECK_START:     Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_PRE_PERFORMANCE_CHECK:  Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_POST_PERFORMANCE_CHECK: Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_EPOCH_START:            Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_BATCH_START:            Rule(Ranks.ALL, Sync.AGREE_STOP),
    Hook.TRANSFER_BATCH_TO_DEVICE:  Rule(Ranks.ALL, Sync.NONE, callbacks=False),
    Hook.BACKWARD:                  Rule(Ranks.ALL, Sync.NONE, callbacks=False),
    Hook.ON_AFTER_BACKWARD:         Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_BEFORE_ZERO_GRAD:       Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_BATCH_END:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_EPOCH_END:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TRAIN_END:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_FIT_END:                Rule(Ranks.ALL, Sync.NONE),
    Hook.TEARDOWN:                  Rule(Ranks.ALL, Sync.VERDICT),
    Hook.ON_SAVE_CHECKPOINT:        Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_LOAD_CHECKPOINT:        Rule(Ranks.ALL, Sync.NONE),
}  # fmt: skip


class Action(str, enum.Enum):
    """Work the trainer itself does under the same rank rules as a hook."""

    WRITE_RUN_FILES = "write_run_files"  # the resolved config in the run directory
    WRITE_CHECKPOINT = "write_checkpoint"  # one file, atomically, from the gathered state
    MANAGE_FILES = "manage_files"  # choose, clean up or delete files in the run directory
    LOAD_CHECKPOINT = "load_checkpoint"  # every rank reads the file global zero chose


ACTION_TABLE: Mapping[Action, Rule] = {
    Action.WRITE_RUN_FILES:  Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT, callbacks=False),
    Action.WRITE_CHECKPOINT: Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT, callbacks=False),
    Action.MANAGE_FILES:     Rule(Ranks.GLOBAL_ZERO, Sync.DECISION, callbacks=False),
    Action.LOAD_CHECKPOINT:  Rule(Ranks.ALL, Sync.VERDICT_LONG, callbacks=False),
}  # fmt: skip

# A hook limited to some ranks is safe only if a verdict (the barrier) follows it on every rank.
assert all(
    rule.sync in (Sync.VERDICT, Sync.VERDICT_LONG, Sync.DECISION)
    for rule in [*HOOK_TABLE.values(), *ACTION_TABLE.values()]
    if rule.ranks is not Ranks.ALL
)


def hook_schedule(prepare_data_per_node: bool = False) -> Mapping[Hook, Rule]:
    """The table as a run applies it; ``prepare_data_per_node`` moves data prep to local zero."""
    if not prepare_data_per_node:
        return HOOK_TABLE
    table = dict(HOOK_TABLE)
    table[Hook.PREPARE_DATA] = replace(table[Hook.PREPARE_DATA], ranks=Ranks.LOCAL_ZERO)
    return table


class ModelHooks:
    """The hooks of Lightning 0.8's ``ModelHooks``, scheduled by rank.

    Override any of them in your :class:`disttrain.Module`. Unless a docstring says otherwise a
    hook runs on every rank, in the same order, so it may call collectives (all ranks reach it).
    The default implementations do nothing, except ``backward`` and
    ``transfer_batch_to_device``, which do the work their names say.
    """

    def prepare_data(self) -> None:
        """Download and preprocess data, once, before anything else in fit/validate/test.

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
        and wrapped in DDP; ``stage`` is ``"fit"``, ``"validate"`` or ``"test"``. A failure on
        any rank stops every rank (a verdict follows). May use collectives.
        """

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` built, at the end of fit/validate/test.

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
        self, trainer: Any, loss: torch.Tensor, optimizer: Any, optimizer_idx: int
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


def overridden(obj: object, name: str, base: type) -> bool:
    """True if ``obj``'s class defines ``name`` differently from ``base``."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


_warned_deprecated: set[type] = set()


def warn_deprecated_overrides(obj: object, base: type) -> None:
    """Warn once per class that overrides ``on_sanity_check_start`` (deprecated in the seed)."""
    cls = type(obj)
    if cls in _warned_deprecated or not overridden(obj, Hook.ON_SANITY_CHECK_START.value, base):
        return
    _warned_deprecated.add(cls)
    warnings.warn(
        f"{cls.__name__}.on_sanity_check_start is deprecated (Lightning 0.8 removes it in 0.9); "
        "it is still called. Use on_train_start or on_pre_performance_check instead.",
        FutureWarning,
        stacklevel=3,
    )
