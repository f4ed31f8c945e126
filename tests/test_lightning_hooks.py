"""A module written for Lightning 2.x: its hooks are called at their Lightning 2.x moments,
once per micro-batch or once per optimizer step as Lightning 2 does, on one process and at 2
ranks; a method named like a Lightning hook disttrain never calls is named in a warning; a
scheduler returned plainly steps per epoch, and one that would never step is named.

The 2-rank runs are the scenarios below, on torchrun ranks (``conftest.run_beside``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from common import Regressor, read_results, run_scenario, run_scenarios, write_result
from conftest import run_alone, shared_launch

import disttrain
from disttrain.api.lightning_names import CALLED, LIGHTNING_HOOKS, NEVER_CALLED
from disttrain.loop import optim


class Lightning2(Regressor):
    """Overrides Lightning 2.x hooks only (none of 0.8's) and records them with what they got."""

    def __init__(self, stop_at: int | None = None, **kw):
        super().__init__(**kw)
        self.calls: list[str] = []
        self.stop_at = stop_at  # on_train_batch_start returns -1 at this batch_idx on rank 1

    def _record(self, name):
        self.calls.append(name)

    def training_step(self, batch, batch_idx):
        self.calls.append(f"training_step({batch_idx})")
        return {"loss": super().training_step(batch, batch_idx), "idx": batch_idx}

    def on_train_epoch_start(self):
        self._record("on_train_epoch_start")

    def on_train_epoch_end(self):
        self._record("on_train_epoch_end")

    def on_train_batch_start(self, batch, batch_idx):
        assert batch[0].device == self.device  # after transfer_batch_to_device
        self._record(f"on_train_batch_start({batch_idx})")
        if batch_idx == self.stop_at and self.global_rank == 1:
            return -1
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        assert outputs["idx"] == batch_idx and not outputs["loss"].requires_grad
        self._record(f"on_train_batch_end({batch_idx})")

    def on_before_backward(self, loss):
        assert loss.requires_grad
        self._record("on_before_backward")

    def on_before_optimizer_step(self, optimizer):
        assert optimizer is self.trainer.optimizers[0]
        assert all(p.grad is not None for p in self.parameters())
        self._record("on_before_optimizer_step")

    def on_validation_start(self):
        self._record("on_validation_start")

    def on_validation_epoch_start(self):
        self._record("on_validation_epoch_start")

    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._record(f"on_validation_batch_start({batch_idx})")

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        assert isinstance(outputs, torch.Tensor)
        self._record(f"on_validation_batch_end({batch_idx})")

    def on_validation_epoch_end(self):
        self._record("on_validation_epoch_end")
        self.log(
            "rank_seen", float(self.global_rank), batch_size=1
        )  # reduced with the epoch's values

    def on_validation_end(self):
        self._record("on_validation_end")

    def on_test_start(self):
        self._record("on_test_start")

    def on_test_epoch_start(self):
        self._record("on_test_epoch_start")

    def on_test_batch_start(self, batch, batch_idx, dataloader_idx=0):
        self._record(f"on_test_batch_start({batch_idx})")

    def on_test_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(f"on_test_batch_end({batch_idx})")

    def on_test_epoch_end(self):
        self._record("on_test_epoch_end")

    def on_test_end(self):
        self._record("on_test_end")


def expected_fit(batches: int, accumulate: int, val_batches: int) -> list[str]:
    """Lightning 2.x's order: on_train_batch_end on every batch, on_before_optimizer_step on
    every optimizer step (the accumulation window's last batch)."""
    calls = ["on_train_epoch_start"]
    for i in range(batches):
        calls += [f"on_train_batch_start({i})", f"training_step({i})", "on_before_backward"]
        if (i + 1) % accumulate == 0 or i + 1 == batches:
            calls.append("on_before_optimizer_step")
        calls.append(f"on_train_batch_end({i})")
    calls += ["on_validation_start", "on_validation_epoch_start"]
    for i in range(val_batches):
        calls += [f"on_validation_batch_start({i})", f"on_validation_batch_end({i})"]
    calls += ["on_validation_epoch_end", "on_validation_end", "on_train_epoch_end"]
    return calls


def expected_test(batches: int) -> list[str]:
    calls = ["on_test_start", "on_test_epoch_start"]
    for i in range(batches):
        calls += [f"on_test_batch_start({i})", f"on_test_batch_end({i})"]
    return [*calls, "on_test_epoch_end", "on_test_end"]


def fit_lightning2(**options):
    """One epoch of 4 batches per rank (16 samples, batch size 2, 2 ranks), accumulating 2,
    one validation batch; then a test of 2 batches per rank."""
    module = Lightning2(n_train=16, n_val=7, **options.pop("module", {}))
    trainer = disttrain.Trainer(
        max_epochs=options.pop("max_epochs", 1),
        limit_train_batches=4,
        limit_val_batches=1,
        limit_test_batches=2,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        **options,
    )
    trainer.fit(module)
    return module, trainer


def lightning2(outdir):
    module, trainer = fit_lightning2(accumulate_grad_batches=2)
    fit_calls = list(module.calls)
    module.calls.clear()
    trainer.test(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "fit": fit_calls,
            "test": module.calls,
            "rank_seen": float(trainer.callback_metrics["rank_seen"]),
            "global_step": trainer.global_step,
        },
    )


def minus_one(outdir):
    """Rank 1 alone returns -1 from on_train_batch_start at batch 1, in each of 2 epochs."""
    module, trainer = fit_lightning2(module={"stop_at": 1}, max_epochs=2)
    trained = [c for c in module.calls if c.startswith("training_step")]
    write_result(outdir, trainer.global_rank, {"trained": trained, "step": trainer.global_step})


def on_two_ranks(outdir):
    """The 2-rank runs of this file's tests, in one launch: each in its own directory."""
    run_scenarios(outdir, lightning2, minus_one)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "lightning_hooks-two_ranks", __file__, "on_two_ranks", nproc=2
    )


def test_lightning2_hooks_run_at_their_moments_on_two_ranks(two_ranks):
    for rank, result in enumerate(read_results(two_ranks / "lightning2", 2)):
        assert result["fit"] == expected_fit(4, accumulate=2, val_batches=1), f"rank {rank}"
        assert result["fit"].count("on_train_batch_end(3)") == 1
        assert result["fit"].count("on_before_optimizer_step") == 2
        assert result["test"] == expected_test(2), f"rank {rank}"
        assert result["rank_seen"] == pytest.approx(0.5)  # logged in on_validation_epoch_end
        assert result["global_step"] == 2


def test_the_debug_mode_runs_the_lightning2_hooks_in_the_same_order(tmp_path):
    run_alone(__file__, "lightning2", tmp_path)  # python FILE: one process, no launcher
    (result,) = read_results(tmp_path, 1)
    assert result["fit"] == expected_fit(4, accumulate=2, val_batches=1)  # 4 batches of 8
    assert result["test"] == expected_test(2)
    assert result["rank_seen"] == 0.0 and result["global_step"] == 2


def test_minus_one_from_on_train_batch_start_on_one_rank_ends_the_epoch_on_both(two_ranks):
    for rank, result in enumerate(read_results(two_ranks / "minus_one", 2)):
        assert result["trained"] == ["training_step(0)"] * 2, f"rank {rank}"
        assert result["step"] == 2


def test_one_process_runs_the_lightning2_hooks_in_the_same_order():
    module, trainer = fit_lightning2(accumulate_grad_batches=3)  # 8 batches, limited to 4
    assert module.calls == expected_fit(4, accumulate=3, val_batches=1)
    assert trainer.callback_metrics["rank_seen"] == 0.0
    module.calls.clear()
    trainer.test(module)
    assert module.calls == expected_test(2)


def test_minus_one_from_on_train_batch_start_ends_the_epoch_in_one_process():
    class StopsEverywhere(Lightning2):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 2 else None

    stops = StopsEverywhere(n_train=16)
    disttrain.Trainer(max_epochs=1, num_sanity_val_steps=0, enable_checkpointing=False).fit(stops)
    assert [c for c in stops.calls if c.startswith("training_step")] == [
        "training_step(0)",
        "training_step(1)",
    ]


def test_on_before_optimizer_step_sees_unscaled_gradients_under_16_mixed():
    seen: list[float] = []

    class Fp16(Regressor):
        def on_before_optimizer_step(self, optimizer):
            seen.append(max(p.grad.abs().max().item() for p in self.parameters()))

    disttrain.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        precision="16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        enable_checkpointing=False,
    ).fit(Fp16())
    finite = [v for v in seen if math.isfinite(v)]  # the first scale overflows: inf, skipped
    assert len(seen) == 2 and finite and max(finite) < 100  # scaled, they would be > 1000


def test_on_train_batch_end_gets_lightnings_dict_with_the_loss_detached():
    seen = []

    class TensorLoss(Regressor):  # training_step returns the loss tensor alone
        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen.append(outputs)

    disttrain.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    ).fit(TensorLoss())
    assert len(seen) == 2 and set(seen[0]) == {"loss"} and not seen[0]["loss"].requires_grad


class Counts(disttrain.Callback):
    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer, module):
        self.epochs += 1


class BringsCallbacks(Regressor):
    def __init__(self, dirpath):
        super().__init__(n_train=8)
        self.dirpath = dirpath

    def configure_callbacks(self):
        return [disttrain.ModelCheckpoint(dirpath=self.dirpath), Counts()]


def test_configure_callbacks_adds_the_modules_callbacks_and_replaces_the_trainers(tmp_path):
    module = BringsCallbacks(str(tmp_path / "mine"))
    trainer = disttrain.Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[Counts()],
    )
    trainer.fit(module)
    counts = [cb for cb in trainer.callbacks if isinstance(cb, Counts)]
    assert len(counts) == 1 and counts[0].epochs == 2  # the module's replaced the trainer's
    assert isinstance(trainer.callbacks[-1], disttrain.ModelCheckpoint)  # checkpoints last
    assert sum(isinstance(cb, disttrain.ModelCheckpoint) for cb in trainer.callbacks) == 1
    assert sorted(p.name for p in (tmp_path / "mine").iterdir())  # it saved there


# -- Lightning hook names disttrain never calls -------------------------------------------------


class WrittenForLightning(Regressor):
    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch

    def on_validation_model_eval(self):
        pass

    def on_train_epoch_end(self):  # called: no warning for it
        pass


class LightningCallback(disttrain.Callback):
    def on_exception(self, trainer, module, exception):
        pass

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # called
        pass


def test_a_lightning_hook_disttrain_never_calls_is_named_with_what_to_use(caplog):
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        disttrain.Trainer(
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            callbacks=[LightningCallback()],
        ).fit(WrittenForLightning())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "WrittenForLightning.on_before_batch_transfer" in text
    assert "transfer_batch_to_device" in text  # what to use instead
    assert "WrittenForLightning.on_validation_model_eval" in text
    assert "LightningCallback.on_exception" in text
    assert "on_train_epoch_end" not in text and "on_train_batch_end" not in text


def test_no_warning_for_the_hooks_disttrain_calls(caplog):
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        fit_lightning2()
    assert not [r for r in caplog.records if "never calls" in r.getMessage()]


def test_the_list_of_lightning_names_says_truly_which_disttrain_calls():
    hooks = {h.value for h in disttrain.Hook}
    methods = {n for n in dir(disttrain.Module) if not n.startswith("_")}
    assert not set(NEVER_CALLED) & (hooks | methods)  # no false warning
    assert hooks | methods >= CALLED
    assert hooks <= LIGHTNING_HOOKS  # every hook disttrain calls is a Lightning hook


# -- schedulers ----------------------------------------------------------------------------


class Scheduled(Regressor):
    def __init__(self, returned, **kw):
        super().__init__(**kw)
        self.returned = returned

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return self.returned(optimizer, scheduler)


def _fit_scheduled(returned, caplog, **options):
    module = Scheduled(returned, n_train=8)
    options = {"max_epochs": 1, "num_sanity_val_steps": 0, "limit_val_batches": 0, **options}
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        trainer = disttrain.Trainer(enable_checkpointing=False, **options)
        trainer.fit(module)
    warned = [r.getMessage() for r in caplog.records if "StepLR" in r.getMessage()]
    caplog.clear()
    return trainer.optimizers[0].param_groups[0]["lr"], warned


def test_a_per_epoch_scheduler_in_a_one_epoch_run_is_named_once(caplog):
    plain = lambda o, s: ([o], [s])  # noqa: E731
    lr, warned = _fit_scheduled(plain, caplog)  # 4 steps, one epoch
    assert lr == 0.5 and len(warned) == 1 and "interval" in warned[0]
    lr, warned = _fit_scheduled(plain, caplog, max_epochs=3, max_steps=2)  # ends in epoch 0
    assert len(warned) == 1
    lr, warned = _fit_scheduled(plain, caplog, max_epochs=2)
    assert lr == 0.25 and warned == []
    per_step = lambda o, s: ([o], [{"scheduler": s, "interval": "step"}])  # noqa: E731
    lr, warned = _fit_scheduled(per_step, caplog)
    assert lr == 0.5**4 and warned == []


def test_configure_optimizers_may_return_lightnings_dict_form(caplog):
    as_dict = lambda o, s: {  # noqa: E731
        "optimizer": o,
        "lr_scheduler": {"scheduler": s, "interval": "step"},
    }
    lr, warned = _fit_scheduled(as_dict, caplog)
    assert lr == 0.5**4 and warned == []
    plain_scheduler = lambda o, s: {"optimizer": o, "lr_scheduler": s}  # noqa: E731
    lr, warned = _fit_scheduled(plain_scheduler, caplog, max_epochs=2)
    assert lr == 0.25


def test_the_dict_form_in_a_list_and_alone():
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(b, 1)
    optimizers, entries = optim.normalise(
        [{"optimizer": a}, {"optimizer": b, "lr_scheduler": {"scheduler": sched, "frequency": 2}}]
    )
    assert optimizers == [a, b] and len(entries) == 1
    assert entries[0].scheduler is sched and entries[0].interval == "epoch"
    assert entries[0].frequency == 2
    assert optim.normalise({"optimizer": a}) == ([a], [])
    with pytest.raises(ValueError, match=r"'every_n'.*scheduler, interval, frequency"):
        optim.normalise({"optimizer": a, "lr_scheduler": {"scheduler": sched, "every_n": 1}})


if __name__ == "__main__":
    run_scenario(globals())
