"""The hook names of every Lightning version (0.8, 1.x, 2.x), in one place, and the warning for
a method named like one that disttrain never calls.

A module or callback written for Lightning keeps methods the Lightning trainer called: those
disttrain calls too are the hooks of ``disttrain.ranks.table`` and the step methods of
``disttrain.Module``; the rest (``NEVER_CALLED``) would silently never run, so a run names them
at its start, with what to use instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("disttrain.hooks")

_TRANSFER = (
    "override transfer_batch_to_device(batch, device) and change the batch before or after "
    "super().transfer_batch_to_device(batch, device)"
)
_EVAL_MODE = "disttrain switches eval/train mode itself; use on_{}_start / on_{}_end"
_PREDICT = (
    "Trainer.predict runs predict_step between on_predict_start / on_predict_end and per "
    "batch on_predict_batch_start / on_predict_batch_end; use those"
)
_STEP_END = (
    "disttrain runs each step on its rank's whole batch (no DataParallel split to gather); "
    "do that work in {}_step"
)
_OPTIMIZER = (
    "disttrain steps and zeroes the optimizers itself; use on_before_optimizer_step "
    "(gradients before the step) or on_before_zero_grad (weights after it), and the "
    "gradient_clip_val option"
)
_BUILD = "build the layers in __init__ or setup(stage); strategy='fsdp' shards them"
_EXCEPTION = "disttrain does not call it on a failure; use try/finally around Trainer.fit"
_DATALOADER = "use {}_dataloader()"

# Lightning's hook and trainer-called method names that disttrain never calls: what to do instead.
NEVER_CALLED: Mapping[str, str] = {
    # batch transfer (1.x, 2.x)
    "on_before_batch_transfer": _TRANSFER,
    "on_after_batch_transfer": _TRANSFER,
    # train/eval mode switching (1.x, 2.x)
    "on_validation_model_eval": _EVAL_MODE.format("validation", "validation"),
    "on_validation_model_train": _EVAL_MODE.format("validation", "validation"),
    "on_validation_model_zero_grad": "disttrain zeroes no gradients before validation; use "
    "on_validation_start",
    "on_test_model_eval": _EVAL_MODE.format("test", "test"),
    "on_test_model_train": _EVAL_MODE.format("test", "test"),
    # prediction's epoch and mode hooks (1.x, 2.x)
    "on_predict_epoch_start": _PREDICT,
    "on_predict_epoch_end": _PREDICT,
    "on_predict_model_eval": _PREDICT,
    "on_predict_model_train": _PREDICT,
    "on_predict_dataloader": "use predict_dataloader()",
    # step-end methods of DataParallel (0.8, 1.x)
    "training_step_end": _STEP_END.format("training") + " or on_train_batch_end",
    "validation_step_end": _STEP_END.format("validation"),
    "test_step_end": _STEP_END.format("test"),
    # optimization the trainer owns (0.8, 1.x, 2.x)
    "optimizer_step": _OPTIMIZER,
    "optimizer_zero_grad": _OPTIMIZER,
    "configure_gradient_clipping": _OPTIMIZER,
    "lr_scheduler_step": "return the scheduler from configure_optimizers with "
    '{"scheduler": s, "interval": "step" | "epoch", "frequency": n}',
    "amp_scale_loss": "the precision option ('16-mixed') scales the loss; override backward "
    "to change how it is backpropagated",
    "tbptt_split_batch": "disttrain has no truncated backpropagation through time; split the "
    "sequence in training_step",
    # building and wrapping the model (0.8, 1.x, 2.x)
    "configure_sharded_model": _BUILD,
    "on_configure_sharded_model": _BUILD,
    "configure_ddp": "disttrain wraps the module in DDP itself (strategy='ddp' | 'fsdp')",
    "init_ddp_connection": "disttrain joins the process group itself, from torchrun's environment",
    "configure_apex": "use the precision option ('16-mixed' or 'bf16-mixed')",
    "on_post_move_to_device": "use setup(stage) or on_fit_start (after the move)",
    "on_before_accelerator_backend_setup": "use setup(stage)",
    # start-up and failures (0.8, 1.x, 2.x)
    "on_init_start": "use __init__ or setup(stage)",
    "on_init_end": "use __init__ or setup(stage)",
    "on_pretrain_routine_start": "use on_fit_start",
    "on_pretrain_routine_end": "use on_train_start",
    "on_keyboard_interrupt": _EXCEPTION,
    "on_exception": _EXCEPTION,
    # checkpoints and the progress bar (0.8, 1.x)
    "on_hpc_save": "use on_save_checkpoint",
    "on_hpc_load": "use on_load_checkpoint",
    "get_progress_bar_dict": "log with self.log(name, value, prog_bar=True)",
    # dataloader hooks (1.x)
    "on_train_dataloader": _DATALOADER.format("train"),
    "on_val_dataloader": _DATALOADER.format("val"),
    "on_test_dataloader": _DATALOADER.format("test"),
}

# Lightning's hook and trainer-called method names that disttrain calls, at their moments.
CALLED: frozenset[str] = frozenset(
    {
        # 0.8 (and most of them in 1.x and 2.x)
        *("prepare_data", "setup", "teardown", "on_fit_start", "on_fit_end"),
        *("on_train_start", "on_train_end", "on_sanity_check_start", "on_sanity_check_end"),
        *("on_pre_performance_check", "on_post_performance_check"),
        *("on_epoch_start", "on_epoch_end", "on_batch_start", "on_batch_end"),
        *("transfer_batch_to_device", "backward", "on_after_backward", "on_before_zero_grad"),
        *("on_save_checkpoint", "on_load_checkpoint", "configure_optimizers"),
        *("training_step", "validation_step", "test_step"),
        *("training_epoch_end", "validation_epoch_end", "test_epoch_end"),
        *("train_dataloader", "val_dataloader", "test_dataloader"),
        # 1.x and 2.x
        *("on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start"),
        *("on_train_batch_end", "on_before_backward", "on_before_optimizer_step"),
        *("on_validation_start", "on_validation_end", "on_validation_epoch_start"),
        *("on_validation_epoch_end", "on_validation_batch_start", "on_validation_batch_end"),
        *("on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end"),
        *("on_test_batch_start", "on_test_batch_end", "configure_callbacks"),
        *("predict_step", "predict_dataloader", "on_predict_start", "on_predict_end"),
        "configure_model",  # with the device mesh: configure_model(mesh)
        *("on_predict_batch_start", "on_predict_batch_end"),
    }
)

# Every hook name of Lightning 0.8, 1.x and 2.x this list knows: called or not.
LIGHTNING_HOOKS: frozenset[str] = CALLED | NEVER_CALLED.keys()

_warned: set[tuple[type, str]] = set()


def warn_never_called(obj: object, base: type) -> None:
    """Name each method of ``obj``'s class (not of ``base``) that Lightning would have called and
    disttrain never calls, with what to use instead; once per class and name."""
    cls = type(obj)
    for name, instead in NEVER_CALLED.items():
        if (cls, name) in _warned or not callable(getattr(cls, name, None)):
            continue
        if getattr(cls, name) is getattr(base, name, None):
            continue
        _warned.add((cls, name))
        log.warning(
            "%s.%s is a Lightning hook that disttrain never calls: %s",
            cls.__name__,
            name,
            instead,
        )
