"""Exact resume: a run stopped after step k and resumed ends bitwise equal to an unbroken run."""

from __future__ import annotations

from common import read_results
from scenarios import resume_runs


def _check(results, per_epoch):
    assert results["mid_epoch"]["progress"]["epoch_finished"] is False
    assert results["mid_epoch"]["progress"]["next_batch"] == 2
    assert results["mid_epoch"]["progress"]["global_step"] == per_epoch + 2
    assert results["epoch_boundary"]["progress"]["epoch_finished"] is True
    assert results["epoch_boundary"]["progress"]["global_step"] == per_epoch
    assert results["mid_epoch"]["bitwise"], "mid-epoch resume differs from the uninterrupted run"
    assert results["epoch_boundary"]["bitwise"], "epoch-boundary resume differs"


def test_bitwise_resume_world_size_one(tmp_path):
    _check(resume_runs(tmp_path, world_size=1), per_epoch=12)


def test_bitwise_resume_world_size_two(scenario):
    _, outdir = scenario("resume_bitwise", nproc=2, timeout=180)
    for result in read_results(outdir, 2):
        _check(result, per_epoch=6)
