"""The hook table, the ModelHooks methods and the Callback methods name the same hooks."""

from __future__ import annotations

import inspect

import disttrain
from disttrain import HOOK_TABLE, Callback, Hook, ModelHooks, Ranks, Sync
from disttrain.ranks.table import PER_MICRO_BATCH, PER_OPTIMIZER_STEP, hook_schedule


def _public_methods(cls) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


def test_table_names_every_model_hook_and_nothing_else():
    assert {h.value for h in HOOK_TABLE} == _public_methods(ModelHooks)
    assert set(HOOK_TABLE) == set(Hook)


CALLBACK_STATE = {"state_dict", "load_state_dict"}  # what checkpoints keep; not hooks


def test_callback_has_exactly_the_notification_hooks():
    notify = {h.value for h, rule in HOOK_TABLE.items() if rule.callbacks}
    assert _public_methods(Callback) - CALLBACK_STATE == notify
    assert {h.value for h, rule in HOOK_TABLE.items() if not rule.callbacks} == {
        "prepare_data",
        "backward",
        "transfer_batch_to_device",
        "configure_model",
    }


def test_callback_signatures_are_the_module_signatures_plus_trainer_and_module():
    for name in _public_methods(Callback) - CALLBACK_STATE:
        module_params = list(inspect.signature(getattr(ModelHooks, name)).parameters)[1:]
        callback_params = list(inspect.signature(getattr(Callback, name)).parameters)[1:]
        assert callback_params == ["trainer", "module", *module_params], name


def test_seed_signatures():
    sig = {
        n: list(inspect.signature(getattr(ModelHooks, n)).parameters)[1:]
        for n in _public_methods(ModelHooks)
    }
    assert sig["backward"] == ["trainer", "loss", "optimizer", "optimizer_idx"]
    assert sig["on_batch_start"] == ["batch"]
    assert sig["on_before_zero_grad"] == ["optimizer"]
    assert sig["transfer_batch_to_device"] == ["batch", "device"]
    assert sig["setup"] == sig["teardown"] == ["stage"]


def test_every_hook_docstring_says_ranks():
    for hook in Hook:
        doc = getattr(ModelHooks, hook.value).__doc__ or ""
        assert "rank" in doc, f"{hook.value}'s docstring does not say on which ranks it runs"


def test_rank_rules():
    assert HOOK_TABLE[Hook.PREPARE_DATA].ranks is Ranks.GLOBAL_ZERO
    assert HOOK_TABLE[Hook.PREPARE_DATA].sync is Sync.VERDICT_HEARTBEAT  # no fixed timeout
    assert hook_schedule(prepare_data_per_node=True)[Hook.PREPARE_DATA].ranks is Ranks.LOCAL_ZERO
    assert HOOK_TABLE[Hook.ON_BATCH_START].sync is Sync.AGREE_STOP
    assert HOOK_TABLE[Hook.ON_TRAIN_BATCH_START].sync is Sync.AGREE_STOP
    assert HOOK_TABLE[Hook.SETUP].sync is Sync.VERDICT_LONG  # start-up: a generous timeout
    assert HOOK_TABLE[Hook.TEARDOWN].sync is Sync.VERDICT
    assert all(r.ranks is Ranks.ALL for h, r in HOOK_TABLE.items() if h is not Hook.PREPARE_DATA)


def test_the_table_names_the_hooks_of_every_micro_batch_and_of_every_optimizer_step():
    assert {Hook.ON_BEFORE_OPTIMIZER_STEP, Hook.ON_BEFORE_ZERO_GRAD} == PER_OPTIMIZER_STEP
    assert {Hook.ON_TRAIN_BATCH_END, Hook.ON_BATCH_END, Hook.BACKWARD} <= PER_MICRO_BATCH
    assert not PER_MICRO_BATCH & PER_OPTIMIZER_STEP
    # the docstrings say which: "per micro-batch" / "once per optimizer step"
    for hook in PER_OPTIMIZER_STEP:
        assert "once per optimizer step" in getattr(ModelHooks, hook.value).__doc__, hook


def test_module_is_model_hooks_and_nn_module():
    import torch

    assert issubclass(disttrain.Module, ModelHooks)
    assert issubclass(disttrain.Module, torch.nn.Module)
