"""Golden tests: the recorded hook order equals docs/lifecycle.md (fit's table, and predict's
rows P1-P6), in one process and at 2 ranks.

The 2-rank run is the scenario ``golden`` below, on torchrun ranks (``conftest.run_beside``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from common import (
    NOTIFY_HOOKS,
    Recorder,
    RecordingCallback,
    read_results,
    run_scenario,
    write_result,
)
from conftest import run_beside

import disttrain
from disttrain import Hook

SPEC = Path(__file__).resolve().parents[1] / "docs" / "lifecycle.md"
CHECKPOINT_HOOKS = {"on_save_checkpoint", "on_load_checkpoint"}  # not in the page's table
STEP_METHODS = {
    "training_step",
    "validation_step",
    "test_step",
    "validation_epoch_end",
    "test_epoch_end",
    "training_epoch_end",
    "predict_step",
}


class Expected:
    """Builds the call list docs/lifecycle.md prescribes; callbacks come before the module."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str, arg: str | None = None) -> None:
        shown = f"{name}({arg})" if arg is not None else name
        if name in NOTIFY_HOOKS:
            self.calls.append("cb:" + shown)
        self.calls.append(shown)

    def evaluation(self, batches: int, kind: str) -> None:
        self("on_pre_performance_check")
        self(f"on_{kind}_start")
        self(f"on_{kind}_epoch_start")
        for _ in range(batches):
            self("transfer_batch_to_device")
            self(f"on_{kind}_batch_start")
            self(f"{kind}_step")
            self(f"on_{kind}_batch_end")
        self(f"{kind}_epoch_end")
        self(f"on_{kind}_epoch_end")
        self(f"on_{kind}_end")
        self("on_post_performance_check")


def expected_fit(rank: int, epochs: int, train_batches: int, val_batches: int, sanity: int):
    e = Expected()
    if rank == 0:  # row 1 of the table: global zero only
        e("prepare_data")
    e("setup", "fit")
    e("on_fit_start")
    e("configure_model")  # mesh=None: no device mesh in these runs
    e("on_train_start")
    e("on_sanity_check_start")
    e.evaluation(sanity, "validation")
    e("on_sanity_check_end")
    for _ in range(epochs):
        e("on_epoch_start")
        e("on_train_epoch_start")
        for _ in range(train_batches):
            e("on_batch_start")
            e("transfer_batch_to_device")
            e("on_train_batch_start")
            e("training_step")
            e("on_before_backward")
            e("backward", "0")
            e("on_after_backward")
            e("on_before_optimizer_step")
            e("on_before_zero_grad")
            e("on_train_batch_end")
            e("on_batch_end")
        e.evaluation(val_batches, "validation")
        e("training_epoch_end")
        e("on_train_epoch_end")
        # the default ModelCheckpoint (the last callback) saves in on_epoch_end
        e.calls.append("cb:on_epoch_end")
        e("on_save_checkpoint")
        e.calls.append("on_epoch_end")
    e("on_train_end")
    e("on_fit_end")
    e("teardown", "fit")
    return e.calls


def expected_test(rank: int, batches: int):
    e = Expected()
    if rank == 0:
        e("prepare_data")
    e("setup", "test")
    e.evaluation(batches, "test")
    e("teardown", "test")
    return e.calls


def expected_predict(rank: int, batches: int):
    e = Expected()
    if rank == 0:
        e("prepare_data")
    e("setup", "predict")
    e("on_predict_start")
    for _ in range(batches):
        e("on_predict_batch_start")
        e("transfer_batch_to_device")
        e("predict_step")
        e("on_predict_batch_end")
    e("on_predict_end")
    e("teardown", "predict")
    return e.calls


def _bare(call: str) -> str:
    return call.removeprefix("cb:").split("(")[0]


def _first_occurrences(names):
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen


def _spec_names(text: str, row: str) -> list[str]:
    """The hook and step names of ``text``'s table rows numbered as ``row`` (a regex)."""
    known = ({h.value for h in Hook} - CHECKPOINT_HOOKS) | STEP_METHODS
    names = []
    for line in text.splitlines():
        if re.match(rf"^\| {row} \|", line):
            hook_column = line.split("|")[2]
            names += [n for n in re.findall(r"`(\w+)", hook_column) if n in known]
    return names


def test_the_expected_order_names_the_hooks_in_the_lifecycle_pages_order():
    fit_section = SPEC.read_text().split("## `trainer.validate")[0]
    built = [_bare(c) for c in expected_fit(0, 1, 1, 1, 1) if _bare(c) not in CHECKPOINT_HOOKS]
    assert _first_occurrences(built) == _first_occurrences(_spec_names(fit_section, r"\d+"))


def test_the_expected_predict_order_names_the_hooks_of_the_pages_predict_rows():
    section = SPEC.read_text().split("## `trainer.predict")[1].split("\n## ")[0]
    built = [_bare(c) for c in expected_predict(0, 1)]
    assert _first_occurrences(built) == _first_occurrences(_spec_names(section, r"P\d+"))


def recorded_fit(**options):
    """The golden run: 2 epochs of 2 batches, 2 validation batches, a 1-batch sanity check;
    7 validation (and test) samples, batch size 2. Returns the recording module and trainer."""
    module = Recorder(n_train=16, n_val=7)
    trainer = disttrain.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        callbacks=[RecordingCallback(module.calls)],
        **options,
    )
    trainer.fit(module)
    return module, trainer


def test_one_process_runs_the_hooks_in_the_lifecycle_pages_order():
    with pytest.warns(FutureWarning, match="on_sanity_check_start is deprecated"):
        module, trainer = recorded_fit()
    assert module.calls == expected_fit(0, epochs=2, train_batches=2, val_batches=2, sanity=1)
    module.calls.clear()
    trainer.test(module)
    assert module.calls == expected_test(0, batches=4)  # 7 samples, batch size 2
    module.calls.clear()
    assert torch.cat(trainer.predict(module)).tolist() == list(range(7))
    assert module.calls == expected_predict(0, batches=4)


def golden(outdir):
    """The golden run on each rank, then a test of its module: each rank writes its calls."""
    module, trainer = recorded_fit()
    fit_calls = list(module.calls)
    module.calls.clear()
    trainer.test(module)
    test_calls = list(module.calls)
    module.calls.clear()
    trainer.predict(module)
    write_result(
        outdir,
        trainer.global_rank,
        {"fit": fit_calls, "test": test_calls, "predict": module.calls},
    )


def test_each_of_two_ranks_runs_the_hooks_in_the_lifecycle_pages_order(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "golden", outdir, nproc=2)
    for rank, result in enumerate(read_results(outdir, 2)):
        assert result["fit"] == expected_fit(
            rank, epochs=2, train_batches=2, val_batches=2, sanity=1
        ), f"rank {rank}"
        # 7 test samples over 2 ranks, unpadded: rank 0 has 4 (2 batches), rank 1 has 3 (2).
        assert result["test"] == expected_test(rank, batches=2), f"rank {rank}"
        # predict in blocks: rank 0 samples 0-3 (2 batches), rank 1 samples 4-6 (2)
        assert result["predict"] == expected_predict(rank, batches=2), f"rank {rank}"


if __name__ == "__main__":
    run_scenario(globals())
