"""The FSDP2 strategy on CPU/gloo: same losses as DDP, less parameter memory, same hook order,
sharded (DCP) checkpoints that resume exactly and load at another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import read_results
from test_lifecycle import expected_fit

from disttrain import Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced


def test_fsdp_matches_ddp_shards_parameters_and_keeps_the_hook_order(scenario):
    _, outdir = scenario("fsdp_vs_ddp", timeout=240)
    for rank, result in enumerate(read_results(outdir, 2)):
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


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sharded_checkpoints_resume_exactly_and_reshard(scenario, tmp_path):
    _, outdir = scenario("fsdp_resume", timeout=240)
    for steps in read_results(outdir, 2):  # the resumed run trained only what was left
        assert steps == {"full": 8, "stopped": 6, "resumed": 2}
    _assert_equal(_weights(outdir / "resumed.pt"), _weights(outdir / "full.pt"))
    ckpts = outdir / "stopped" / "checkpoints"
    sharded = ckpts / "epoch=1-step=6.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").exists()
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert checkpoint.load(sharded)["progress"]["next_batch"] == 2
    # 2 -> 1: the debug mode (one process, unsharded) evaluates the 2-rank checkpoint
    from common import Wide

    module = Wide()
    Trainer(resume=str(sharded), enable_checkpointing=False).validate(module)
    _assert_equal({k: v for k, v in module.state_dict().items()}, _weights(outdir / "at_step_6.pt"))
    # 1 -> 2: written by one FSDP rank, loaded by two
    _, one = scenario("fsdp_save_one_rank", nproc=1, timeout=180)
    (written,) = (one / "one_rank" / "checkpoints").glob("epoch=*-step=3.ckpt")
    _, two = scenario("fsdp_load", nproc=2, timeout=180, CKPT=written)
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


def test_uneven_evaluation_shards_under_fsdp_finish_and_stay_exact(scenario):
    """9 validation samples, batches of 4, 2 ranks: 2 batches on rank 0, 1 on rank 1. The
    old evaluation all-gathered per batch and rank 0 waited for rank 1 until the timeout."""
    from common import exact_validation

    _, outdir = scenario("fsdp_uneven_eval", timeout=150)
    results = read_results(outdir, 2)
    seen = [i for result in results for i in result["val_seen"]]
    # the sanity check (2 batches: each rank's whole shard) and one validation epoch
    assert sorted(results[0]["val_seen"]) == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    assert sorted(results[1]["val_seen"]) == [1, 1, 3, 3, 5, 5, 7, 7]
    assert sorted(seen) == sorted(2 * list(range(9)))
    from common import LogsMetrics

    module = LogsMetrics(n_val=9)
    module.load_state_dict(_weights(outdir / "weights.pt"))
    exact = exact_validation(module, 9)
    for result in results:
        for key, value in exact.items():
            assert result[key] == pytest.approx(value, rel=1e-5), key
