"""The FSDP2 strategy on CPU/gloo: same losses as DDP, less parameter memory, same hook order,
sharded (DCP) checkpoints that resume exactly and load at another world size.

Each test's torchrun ranks run the scenario function written above it (``conftest.run_beside``),
all in one launch (``on_two_ranks``) after the one-rank save the resharding test loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from common import (
    LogsMetrics,
    Wide,
    WideExport,
    exact_validation,
    read_results,
    run_scenario,
    run_scenarios,
    write_result,
)
from conftest import run_beside, shared_run
from test_lifecycle import expected_fit, recorded_fit

import disttrain
from disttrain import ModelCheckpoint, Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced


# -- FSDP against DDP ----------------------------------------------------------------------
def fsdp_vs_ddp(outdir):
    """The same seed and data under DDP and FSDP: loss curves, parameter bytes per rank; then
    the golden run (``test_lifecycle.recorded_fit``) under FSDP, its calls recorded."""

    result = {}
    runs = {
        "ddp": {"strategy": "ddp"},
        "fsdp": {"strategy": "fsdp"},
        "fsdp_bf16_ac": {
            "strategy": "fsdp",
            "precision": "bf16-mixed",
            "activation_checkpointing": True,
        },
    }
    for run, options in runs.items():
        disttrain.seed_everything(0)
        module = Wide()
        trainer = Trainer(
            max_epochs=2,
            num_sanity_val_steps=1,
            enable_checkpointing=False,
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            **options,
        )
        trainer.fit(module)
        local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            for p in module.parameters()
        )
        result[run] = {"losses": module.losses, "param_elements": local}
    recorder, trainer = recorded_fit(strategy="fsdp", enable_checkpointing=False)
    result["fsdp_calls"] = recorder.calls
    write_result(outdir, trainer.global_rank, result)


@pytest.mark.timeout(900)  # with the fixture's run (or the wait for it)
def test_fsdp_matches_ddp_shards_parameters_and_keeps_the_hook_order(launched):
    for rank, result in enumerate(read_results(launched / "fsdp_vs_ddp", 2)):
        ddp, fsdp = result["ddp"], result["fsdp"]
        assert len(fsdp["losses"]) == len(ddp["losses"]) == 8
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-4, abs=1e-6), rank
        # each rank holds its dim-0 shard of every parameter (the 1-row output layer is not
        # split evenly): 1793 and 1280 elements against 3073 under DDP
        assert fsdp["param_elements"] < 0.6 * ddp["param_elements"], (rank, fsdp, ddp)
        bf16 = result["fsdp_bf16_ac"]["losses"]  # bf16 compute, recomputed activations
        assert bf16 == pytest.approx(ddp["losses"], rel=5e-2) and bf16 != ddp["losses"]
        calls = [c for c in result["fsdp_calls"] if "checkpoint" not in c]
        golden = [c for c in expected_fit(rank, 2, 2, 2, 1) if "checkpoint" not in c]
        assert calls == golden, rank


# -- sharded checkpoints -------------------------------------------------------------------
def _fsdp_run(root, name, **options):
    """``WideExport`` under FSDP for 2 epochs (8 steps at 2 ranks), run directory
    ``root/RUN`` (``run``, default ``name``), its final weights exported to ``root/NAME.pt``;
    returns the steps it trained."""
    disttrain.seed_everything(0)
    module = WideExport(str(Path(root) / f"{name}.pt"))
    Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        strategy="fsdp",
        seed=1,
        default_root_dir=str(Path(root) / options.pop("run", name)),
        **options,
    ).fit(module)
    return len(module.losses)


def fsdp_resume(outdir):
    """Sharded checkpoints: stop after step 6 (mid-epoch), resume, compare with a full run."""

    def kept():  # every checkpoint: the test reads step 6's after the resumed run
        return [ModelCheckpoint(keep_last_k=5)]

    steps = {
        "full": _fsdp_run(outdir, "full"),
        "stopped": _fsdp_run(outdir, "at_step_6", run="stopped", max_steps=6, callbacks=kept()),
        "resumed": _fsdp_run(outdir, "resumed", run="stopped", resume="auto", callbacks=kept()),
    }
    write_result(outdir, int(os.environ["RANK"]), steps)


def fsdp_save_one_rank(outdir):
    """A sharded checkpoint written at world size 1 (the test loads it at 2)."""
    _fsdp_run(outdir, "one_rank", max_steps=3)
    write_result(outdir, 0, {"done": True})


def fsdp_load(outdir):
    """Evaluate the checkpoint named by $CKPT at this world size; export what was loaded."""
    disttrain.seed_everything(123)  # other initial weights: only the checkpoint can match
    module = Wide()
    trainer = Trainer(
        strategy="fsdp",
        resume=os.environ["CKPT"],
        enable_checkpointing=False,
        default_root_dir=str(outdir),
    )

    class Export(disttrain.Callback):
        def on_post_performance_check(self, trainer, m):
            trainer.export_weights(Path(outdir) / "loaded.pt")

    trainer.callbacks.append(Export())
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, {"done": True})


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def on_two_ranks(outdir):
    """The 2-rank scenarios of this file in one launch, each in its own directory
    (``OUTDIR/NAME``); ``fsdp_load`` loads what ``fsdp_save_one_rank`` wrote before it."""
    run_scenarios(outdir, fsdp_vs_ddp, fsdp_resume, fsdp_load, fsdp_uneven_eval)


@pytest.fixture(scope="session")
def launched(tmp_path_factory) -> Path:
    """The one-rank save, then ``on_two_ranks``: two launches, once in the test session
    (``conftest.shared_run``) for the tests that read them."""

    def run(outdir: Path) -> None:
        one = outdir / "fsdp_save_one_rank"
        run_beside(__file__, "fsdp_save_one_rank", one, nproc=1, timeout=180)
        (written,) = (one / "one_rank" / "checkpoints").glob("epoch=*-step=3.ckpt")
        run_beside(__file__, "on_two_ranks", outdir, timeout=720, CKPT=written)  # 810 s before

    return shared_run(tmp_path_factory, "fsdp-launched", run)


@pytest.mark.timeout(900)  # with the fixture's run (or the wait for it)
def test_sharded_checkpoints_resume_exactly_and_reshard(launched):
    outdir = launched / "fsdp_resume"
    for steps in read_results(outdir, 2):  # the resumed run trained only what was left
        assert steps == {"full": 8, "stopped": 6, "resumed": 2}
    _assert_equal(_weights(outdir / "resumed.pt"), _weights(outdir / "full.pt"))
    ckpts = outdir / "stopped" / "checkpoints"
    sharded = ckpts / "epoch=1-step=6.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").exists()
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert checkpoint.load(sharded)["progress"]["next_batch"] == 2
    # 2 -> 1: the debug mode (one process, unsharded) evaluates the 2-rank checkpoint
    module = Wide()
    Trainer(resume=str(sharded), enable_checkpointing=False).validate(module)
    _assert_equal({k: v for k, v in module.state_dict().items()}, _weights(outdir / "at_step_6.pt"))
    # 1 -> 2: written by one FSDP rank, loaded by two
    one, two = launched / "fsdp_save_one_rank", launched / "fsdp_load"
    _assert_equal(_weights(two / "loaded.pt"), _weights(one / "one_rank.pt"))


def test_an_incomplete_sharded_checkpoint_is_skipped(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "epoch=0-step=9.ckpt").mkdir(parents=True)  # no .metadata: never completed
    (directory / ".epoch=0-step=10.ckpt.tmp").mkdir()
    assert most_advanced(directory) is None
    assert not (directory / ".epoch=0-step=10.ckpt.tmp").exists()


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused(tmp_path):
    import pickle

    directory = tmp_path / "epoch=0-step=1.ckpt"
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps({"x": RunsCode()}))
    with pytest.raises(checkpoint.CheckpointError, match=r"refused: GLOBAL posix\.system"):
        checkpoint.load(directory)
    assert not (tmp_path / "pwned").exists()


# -- uneven evaluation shards --------------------------------------------------------------
def fsdp_uneven_eval(outdir):
    """FSDP, 2 ranks, 9 validation samples in batches of 4: rank 0 holds 2 batches, rank 1
    one. Every sample must be evaluated once, with no rank left waiting in an all-gather (a
    short collective timeout makes a hang fail in seconds instead of 30 minutes)."""

    class Counts(LogsMetrics):
        def validation_step(self, batch, batch_idx):
            self.val_seen.extend(batch[2].tolist())
            return super().validation_step(batch, batch_idx)

    disttrain.seed_everything(0)
    module = Counts(n_train=8, n_val=9, batch_size=4)
    trainer = Trainer(
        strategy="fsdp",
        max_epochs=1,
        num_sanity_val_steps=2,  # the first forwards of the run are an uneven evaluation
        enable_checkpointing=False,
        logger=None,
        timeout=20.0,
        default_root_dir=str(outdir),
    )

    class Export(disttrain.Callback):
        def on_fit_end(self, trainer, m):
            trainer.export_weights(Path(outdir) / "weights.pt")

    trainer.callbacks.append(Export())
    trainer.fit(module)
    seen = list(module.val_seen)
    write_result(outdir, trainer.global_rank, {"val_seen": seen, **trainer.callback_metrics})


@pytest.mark.timeout(900)  # with the fixture's run (or the wait for it)
def test_uneven_evaluation_shards_under_fsdp_finish_and_stay_exact(launched):
    """9 validation samples, batches of 4, 2 ranks: 2 batches on rank 0, 1 on rank 1. The
    old evaluation all-gathered per batch and rank 0 waited for rank 1 until the timeout."""
    outdir = launched / "fsdp_uneven_eval"
    results = read_results(outdir, 2)
    seen = [i for result in results for i in result["val_seen"]]
    # the sanity check (2 batches: each rank's whole shard) and one validation epoch
    assert sorted(results[0]["val_seen"]) == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    assert sorted(results[1]["val_seen"]) == [1, 1, 3, 3, 5, 5, 7, 7]
    assert sorted(seen) == sorted(2 * list(range(9)))
    module = LogsMetrics(n_val=9)
    module.load_state_dict(_weights(outdir / "weights.pt"))
    exact = exact_validation(module, 9)
    for result in results:
        for key, value in exact.items():
            assert result[key] == pytest.approx(value, rel=1e-5), key


if __name__ == "__main__":
    run_scenario(globals())
