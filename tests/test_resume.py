"""Exact resume: a run stopped after step k and resumed ends bitwise equal to an unbroken run.

The runs are ``resume_runs`` below: in this process, and on 2 torchrun ranks (the scenario
``resume_bitwise``, launched by ``conftest.run_beside``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from common import Resumable, read_results, run_scenario, write_result
from conftest import run_beside

import disttrain
from disttrain import Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced


def _train(run_dir, **options):
    """``Resumable`` (24 samples, batches of 2: dropout, shuffling, momentum, a step-wise
    schedule) in ``run_dir``; returns its final weights."""
    disttrain.seed_everything(0)
    module = Resumable()
    trainer = Trainer(default_root_dir=str(run_dir), num_sanity_val_steps=1, seed=5, **options)
    trainer.fit(module)
    return {k: v.clone() for k, v in module.state_dict().items()}


def resume_runs(root, world_size):
    """Stop after step k, resume with resume="auto", compare with an uninterrupted run: k in
    the middle of epoch 1 (2 batches into it), and k at the end of epoch 0."""
    root = Path(root)
    per_epoch = 24 // (2 * world_size)
    full = _train(root / "full", max_epochs=3)
    results = {}
    for name, stop_after in {"mid_epoch": per_epoch + 2, "epoch_boundary": per_epoch}.items():
        run_dir = root / name
        _train(run_dir, max_epochs=3, max_steps=stop_after)
        newest = most_advanced(run_dir / "checkpoints")
        progress = checkpoint.load(newest)["progress"]
        resumed = _train(run_dir, max_epochs=3, resume="auto")
        results[name] = {
            "bitwise": all(torch.equal(full[k], resumed[k]) for k in full),
            "progress": progress,
        }
    return results


def resume_bitwise(outdir):
    results = resume_runs(Path(outdir) / "runs", int(os.environ["WORLD_SIZE"]))
    write_result(outdir, int(os.environ["RANK"]), results)


def _check(results, per_epoch):
    assert results["mid_epoch"]["progress"]["epoch_finished"] is False
    assert results["mid_epoch"]["progress"]["next_batch"] == 2
    assert results["mid_epoch"]["progress"]["global_step"] == per_epoch + 2
    assert results["epoch_boundary"]["progress"]["epoch_finished"] is True
    assert results["epoch_boundary"]["progress"]["global_step"] == per_epoch
    assert results["mid_epoch"]["bitwise"], "mid-epoch resume differs from the uninterrupted run"
    assert results["epoch_boundary"]["bitwise"], "epoch-boundary resume differs"


def test_a_resumed_run_ends_bitwise_equal_to_an_unbroken_one_in_one_process(tmp_path):
    _check(resume_runs(tmp_path, world_size=1), per_epoch=12)


def test_a_resumed_run_ends_bitwise_equal_to_an_unbroken_one_on_two_ranks(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "resume_bitwise", outdir, nproc=2, timeout=180)
    for result in read_results(outdir, 2):
        _check(result, per_epoch=6)


if __name__ == "__main__":
    run_scenario(globals())
