"""The model hooks, the table that says on which ranks each runs, and the loop they live in.

The whole of ``Trainer.fit``, with every hook in place (``[v]`` verdict, ``[a]`` agreement;
Lightning 2.x's hooks sit beside Lightning 0.8's, at their Lightning moments)::

    prepare_data()                       # global zero (local zero per node)  [v, heartbeat]
    setup("fit")                         # all                                [v]
    module.to(device)
    on_fit_start()
    configure_model(mesh)                # all; the device mesh, or None       [v]
    configure_optimizers(); wrap in DDP (shard with FSDP2); dataloaders with distributed samplers
    on_train_start()
    on_sanity_check_start()
    validation(num_sanity_val_steps batches)                 # as below
    on_sanity_check_end()
    for epoch:
        set_epoch(epoch) of each sampler in the loader's chain and of the dataset, if any
        on_epoch_start(); on_train_epoch_start()
        for batch_idx, batch in loader:                      # once per micro-batch:
            on_batch_start(batch)                            # [a] -1 on any rank ends the epoch
            batch = transfer_batch_to_device(batch, device)
            on_train_batch_start(batch, batch_idx)           # [a] -1 on any rank ends the epoch
            for i, optimizer:                                # no grad all-reduce off-boundary
                loss = training_step(batch, batch_idx[, i]) / accumulate_grad_batches
                on_before_backward(loss)
                backward(trainer, loss, optimizer, i)
                on_after_backward()
            if accumulation boundary:                        # once per optimizer step:
                for optimizer:
                    unscale (16-mixed); on_before_optimizer_step(optimizer); clip
                    optimizer.step(); on_before_zero_grad(optimizer); zero_grad()
                step-interval schedulers
            on_train_batch_end(outputs, batch, batch_idx)
            validation every val_check_interval batches, if set (inside the epoch)
            on_batch_end()
        validation (every check_val_every_n_epoch):
            on_pre_performance_check(); on_validation_start(); on_validation_epoch_start()
            for batch_idx, batch:
                transfer_batch_to_device(batch, device)
                on_validation_batch_start(batch, batch_idx); validation_step(batch, batch_idx)
                on_validation_batch_end(outputs, batch, batch_idx)
            validation_epoch_end(outputs); on_validation_epoch_end()   # logged values reduced
            on_validation_end(); on_post_performance_check()
        training_epoch_end(outputs); on_train_epoch_end(); on_epoch_end()
        epoch-interval schedulers
    on_train_end()
    on_fit_end()
    teardown("fit")                      # all                                [v]

``Trainer.predict`` (``disttrain.loop.predict``)::

    prepare_data()                       # as in fit                          [v, heartbeat]
    setup("predict")                     # all                                [v]
    module.to(device); weights from ckpt_path / resume; the unpadded loader, in blocks
    module.eval()
    on_predict_start()                   # all                                [v]
    under torch.inference_mode(), no collective (ranks hold different numbers of batches):
    for batch_idx, batch in loader:
        on_predict_batch_start(batch, batch_idx)
        batch = transfer_batch_to_device(batch, device)
        outputs = predict_step(batch, batch_idx)
        on_predict_batch_end(outputs, batch, batch_idx)
                                         # the loop: trainer action predict   [v]
    on_predict_end()                     # all                                [v]
    predictions gathered in dataset order, once (return_predictions=True)
    teardown("predict")                  # all                                [v]

Every rank runs the same sequence; only ``prepare_data`` is limited to some ranks. Callbacks
run before the module's hook of the same name. ``HOOK_TABLE`` below is the single statement of
which ranks run a hook and what synchronisation follows; ``disttrain.ranks.dispatch`` applies
it; ``disttrain.api.hooks.ModelHooks`` documents each hook for those who implement them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace


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
    # the ranks that run it beat in the store and the others wait while they do (no fixed
    # timeout); then the long verdict (per node, where another node may still be preparing)
    VERDICT_HEARTBEAT = "verdict (after waiting on a heartbeat)"
    DECISION = "verdict, then global zero's result is sent to every rank"
    AGREE_STOP = "agreement (-1 on any rank stops every rank)"
    # no collective now: the work keeps its failure, and every rank learns of it where it is
    # next waited for (a background write's: the next checkpoint's gather, or fit's end)
    LATER = "none now: its failure is told where it is next waited for"


class Hook(str, enum.Enum):
    PREPARE_DATA = "prepare_data"
    SETUP = "setup"
    ON_FIT_START = "on_fit_start"
    CONFIGURE_MODEL = "configure_model"
    ON_TRAIN_START = "on_train_start"
    ON_SANITY_CHECK_START = "on_sanity_check_start"
    ON_SANITY_CHECK_END = "on_sanity_check_end"
    ON_PRE_PERFORMANCE_CHECK = "on_pre_performance_check"
    ON_POST_PERFORMANCE_CHECK = "on_post_performance_check"
    ON_EPOCH_START = "on_epoch_start"
    ON_TRAIN_EPOCH_START = "on_train_epoch_start"
    ON_BATCH_START = "on_batch_start"
    TRANSFER_BATCH_TO_DEVICE = "transfer_batch_to_device"
    ON_TRAIN_BATCH_START = "on_train_batch_start"
    ON_BEFORE_BACKWARD = "on_before_backward"
    BACKWARD = "backward"
    ON_AFTER_BACKWARD = "on_after_backward"
    ON_BEFORE_OPTIMIZER_STEP = "on_before_optimizer_step"
    ON_BEFORE_ZERO_GRAD = "on_before_zero_grad"
    ON_TRAIN_BATCH_END = "on_train_batch_end"
    ON_BATCH_END = "on_batch_end"
    ON_VALIDATION_START = "on_validation_start"
    ON_VALIDATION_EPOCH_START = "on_validation_epoch_start"
    ON_VALIDATION_BATCH_START = "on_validation_batch_start"
    ON_VALIDATION_BATCH_END = "on_validation_batch_end"
    ON_VALIDATION_EPOCH_END = "on_validation_epoch_end"
    ON_VALIDATION_END = "on_validation_end"
    ON_TEST_START = "on_test_start"
    ON_TEST_EPOCH_START = "on_test_epoch_start"
    ON_TEST_BATCH_START = "on_test_batch_start"
    ON_TEST_BATCH_END = "on_test_batch_end"
    ON_TEST_EPOCH_END = "on_test_epoch_end"
    ON_TEST_END = "on_test_end"
    ON_TRAIN_EPOCH_END = "on_train_epoch_end"
    ON_EPOCH_END = "on_epoch_end"
    ON_TRAIN_END = "on_train_end"
    ON_FIT_END = "on_fit_end"
    TEARDOWN = "teardown"
    ON_SAVE_CHECKPOINT = "on_save_checkpoint"
    ON_LOAD_CHECKPOINT = "on_load_checkpoint"
    ON_PREDICT_START = "on_predict_start"
    ON_PREDICT_BATCH_START = "on_predict_batch_start"
    ON_PREDICT_BATCH_END = "on_predict_batch_end"
    ON_PREDICT_END = "on_predict_end"


@dataclass(frozen=True)
class Rule:
    ranks: Ranks
    sync: Sync
    callbacks: bool = True  # False for the hooks that do work rather than notify
    forbids_state: bool = False  # True: assigning module attributes in the hook is an error


# hook                              ranks            sync that follows        runs once per
HOOK_TABLE: Mapping[Hook, Rule] = {
    Hook.PREPARE_DATA:              Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT_HEARTBEAT, callbacks=False, forbids_state=True),  # noqa: E501
    Hook.SETUP:                     Rule(Ranks.ALL, Sync.VERDICT_LONG),
    Hook.ON_FIT_START:              Rule(Ranks.ALL, Sync.NONE),
    Hook.CONFIGURE_MODEL:           Rule(Ranks.ALL, Sync.VERDICT, callbacks=False),
    Hook.ON_TRAIN_START:            Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_SANITY_CHECK_START:     Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_SANITY_CHECK_END:       Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_PRE_PERFORMANCE_CHECK:  Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_POST_PERFORMANCE_CHECK: Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_EPOCH_START:            Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TRAIN_EPOCH_START:      Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_BATCH_START:            Rule(Ranks.ALL, Sync.AGREE_STOP),               # micro-batch
    Hook.TRANSFER_BATCH_TO_DEVICE:  Rule(Ranks.ALL, Sync.NONE, callbacks=False),    # micro-batch
    Hook.ON_TRAIN_BATCH_START:      Rule(Ranks.ALL, Sync.AGREE_STOP),               # micro-batch
    Hook.ON_BEFORE_BACKWARD:        Rule(Ranks.ALL, Sync.NONE),                     # micro-batch
    Hook.BACKWARD:                  Rule(Ranks.ALL, Sync.NONE, callbacks=False),    # micro-batch
    Hook.ON_AFTER_BACKWARD:         Rule(Ranks.ALL, Sync.NONE),                     # micro-batch
    Hook.ON_BEFORE_OPTIMIZER_STEP:  Rule(Ranks.ALL, Sync.NONE),                     # optimizer step
    Hook.ON_BEFORE_ZERO_GRAD:       Rule(Ranks.ALL, Sync.NONE),                     # optimizer step
    Hook.ON_TRAIN_BATCH_END:        Rule(Ranks.ALL, Sync.NONE),                     # micro-batch
    Hook.ON_BATCH_END:              Rule(Ranks.ALL, Sync.NONE),                     # micro-batch
    Hook.ON_VALIDATION_START:       Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_VALIDATION_EPOCH_START: Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_VALIDATION_BATCH_START: Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_VALIDATION_BATCH_END:   Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_VALIDATION_EPOCH_END:   Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_VALIDATION_END:         Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_START:             Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_EPOCH_START:       Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_BATCH_START:       Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_BATCH_END:         Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_EPOCH_END:         Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TEST_END:               Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TRAIN_EPOCH_END:        Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_EPOCH_END:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_TRAIN_END:              Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_FIT_END:                Rule(Ranks.ALL, Sync.NONE),
    Hook.TEARDOWN:                  Rule(Ranks.ALL, Sync.VERDICT),
    Hook.ON_SAVE_CHECKPOINT:        Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_LOAD_CHECKPOINT:        Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_PREDICT_START:          Rule(Ranks.ALL, Sync.VERDICT),
    Hook.ON_PREDICT_BATCH_START:    Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_PREDICT_BATCH_END:      Rule(Ranks.ALL, Sync.NONE),
    Hook.ON_PREDICT_END:            Rule(Ranks.ALL, Sync.VERDICT),
}  # fmt: skip


# The training hooks that run per micro-batch (every batch, also inside an accumulation window)
# and those that run once per optimizer step (the window's last batch), as the comments above say.
PER_MICRO_BATCH = frozenset(
    {
        Hook.ON_BATCH_START,
        Hook.TRANSFER_BATCH_TO_DEVICE,
        Hook.ON_TRAIN_BATCH_START,
        Hook.ON_BEFORE_BACKWARD,
        Hook.BACKWARD,
        Hook.ON_AFTER_BACKWARD,
        Hook.ON_TRAIN_BATCH_END,
        Hook.ON_BATCH_END,
    }
)
PER_OPTIMIZER_STEP = frozenset({Hook.ON_BEFORE_OPTIMIZER_STEP, Hook.ON_BEFORE_ZERO_GRAD})


class Action(str, enum.Enum):
    """Work the trainer itself does under the same rank rules as a hook."""

    WRITE_RUN_FILES = "write_run_files"  # the resolved config in the run directory
    WRITE_CHECKPOINT = "write_checkpoint"  # one file, atomically, from the gathered state
    MANAGE_FILES = "manage_files"  # choose, clean up or delete files in the run directory
    LOAD_CHECKPOINT = "load_checkpoint"  # every rank reads the file global zero chose
    FINISH_WRITES = "finish_checkpoint_writes"  # wait for this rank's background checkpoint write
    START_WRITE = "start_checkpoint_write"  # copy the state to host memory, write it on a thread
    PREDICT = "predict"  # the predict loop over this rank's shard: a failure stops every rank


ACTION_TABLE: Mapping[Action, Rule] = {
    Action.WRITE_RUN_FILES:  Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT, callbacks=False),
    Action.WRITE_CHECKPOINT: Rule(Ranks.GLOBAL_ZERO, Sync.VERDICT, callbacks=False),
    Action.MANAGE_FILES:     Rule(Ranks.GLOBAL_ZERO, Sync.DECISION, callbacks=False),
    Action.LOAD_CHECKPOINT:  Rule(Ranks.ALL, Sync.VERDICT_LONG, callbacks=False),
    Action.FINISH_WRITES:    Rule(Ranks.ALL, Sync.VERDICT_LONG, callbacks=False),
    Action.START_WRITE:      Rule(Ranks.GLOBAL_ZERO, Sync.LATER, callbacks=False),
    Action.PREDICT:          Rule(Ranks.ALL, Sync.VERDICT, callbacks=False),
}  # fmt: skip


# A hook limited to some ranks is safe only if a verdict (the barrier) follows it on every
# rank, or (LATER: trainer work that raises nothing and runs no collective) its outcome is
# waited for in a later collective of every rank.
_FOLLOWED = (Sync.VERDICT, Sync.VERDICT_LONG, Sync.VERDICT_HEARTBEAT, Sync.DECISION, Sync.LATER)
assert all(
    rule.sync in _FOLLOWED
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
