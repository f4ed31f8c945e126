"""A user's first hour, as real commands: no numpy, Ctrl-C once and twice, rerun and resume,
wrong resume files, a failing rank (where a run says its files went: test_examples.py's
smoke run). Each test runs the ``disttrain`` command in real processes on real files and
signals."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE, WORKERS, disttrain_cli, worker_env

import disttrain


def test_a_two_rank_run_needs_no_numpy(tmp_path):
    """torch's object collectives need numpy, which torch does not declare; disttrain's own
    collectives must not. Two epoch ends, validation and checkpoints, numpy unimportable."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(WORKERS / "without_numpy.py"),
            "fit",
            "--config",
            SMOKE,
            f"run_dir={run_dir}",
            "trainer.max_epochs=3",
        ],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Numpy is not available" not in proc.stderr
    assert (run_dir / "checkpoints" / "epoch=2-step=9.ckpt").exists()
    assert "epoch 2 done" in proc.stderr  # three epoch ends, each with a reduction


def test_disttrain_calls_none_of_torchs_object_collectives():
    banned = {"all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"}
    for path in (ROOT / "disttrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in banned:
                assert not (isinstance(node.value, ast.Name) and node.value.id == "dist"), (
                    f"{path}:{node.lineno}: dist.{node.attr} needs numpy"
                )


def test_auto_resume_picks_the_most_advanced_checkpoint_not_the_newest_file(tmp_path):
    run_dir = tmp_path / "run"
    first = disttrain_cli("fit", "--config", SMOKE, f"run_dir={run_dir}", "trainer.max_epochs=3")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    advanced = checkpoints / "epoch=2-step=18.ckpt"
    # an earlier state written later (a rerun's first epoch): newer mtime, less progress
    early = checkpoints / "epoch=0-step=6.ckpt"
    state = torch.load(advanced, weights_only=True)
    state["progress"].update(epoch=0, global_step=6, next_batch=6)
    torch.save(state, early)
    future = time.time() + 3600
    os.utime(early, (future, future))
    (checkpoints / "notes.ckpt").write_text("hello")  # not a checkpoint: skipped, named
    again = disttrain_cli("fit", "--config", SMOKE, f"run_dir={run_dir}", "trainer.max_epochs=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {advanced}: epoch 2, step 18" in again.stderr
    assert f"skipping {checkpoints / 'notes.ckpt'}" in again.stderr


def test_a_fresh_fit_among_an_earlier_runs_checkpoints_is_refused_before_any_worker(tmp_path):
    run_dir = tmp_path / "run"
    first = disttrain_cli("fit", "--config", SMOKE, f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    fresh = disttrain_cli(
        "launch", "fit", "--config", SMOKE, f"run_dir={run_dir}", "trainer.resume=null"
    )
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    assert "trainer.resume: null (start fresh), but" in fresh.stderr
    assert "[rank" not in fresh.stderr  # no worker started
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    ("content", "problem"),
    [("hello", "not a readable checkpoint"), (None, "no such checkpoint file")],
    ids=["text", "missing"],
)
def test_a_resume_path_that_is_no_checkpoint_is_refused_by_name_before_any_worker(
    tmp_path, content, problem
):
    path = tmp_path / "text.ckpt"
    if content is not None:
        path.write_text(content)
    proc = disttrain_cli(
        "launch", "fit", "--config", SMOKE, f"run_dir={tmp_path / 'run'}", f"trainer.resume={path}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"trainer.resume: {path}: {problem}" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_resume_file_of_another_format_is_refused_by_name_in_the_worker(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"weight": torch.ones(2)}, path)  # a torch file, not a disttrain checkpoint
    proc = disttrain_cli("fit", "--config", SMOKE, f"run_dir={tmp_path}", f"trainer.resume={path}")
    assert proc.returncode == 1
    assert f"{path}: not a disttrain checkpoint" in proc.stderr


def test_a_failing_rank_is_summarised_and_its_traceback_kept_in_the_run_directory(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        Path(SMOKE)
        .read_text()
        .replace("disttrain.examples.regression.Regression", "common.FailsOnRankOne")
    )
    run_dir = tmp_path / "run"
    proc = disttrain_cli("launch", "fit", "--config", str(config), f"run_dir={run_dir}")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    tail = proc.stderr.strip().splitlines()[-6:]  # where the eye lands
    assert any("rank 1 failed first" in line for line in tail), proc.stderr
    assert any("on_fit_start exploded on rank 1" in line for line in tail), proc.stderr
    log = (run_dir / "logs" / "rank1-error.log").read_text()
    assert log.startswith("Traceback") and "on_fit_start exploded on rank 1" in log


def test_the_printed_resume_command_parses_whatever_overrides_it_repeats(tmp_path, capsys):
    import yaml

    from disttrain.cli import main as cli
    from disttrain.config import runfile as runconfig

    argv = ["fit", "--config", SMOKE, "--set", "trainer.resume=null", "trainer.max_epochs=3"]
    run = runconfig.load(SMOKE, ["trainer.resume=null", "trainer.max_epochs=3"])
    # _resume_command makes the command a stop prints: only a run stopped by a signal prints
    # it (test_stopping's Ctrl-C test runs that end to end, without --set), so it is the unit
    command = cli._resume_command(["disttrain", *argv], run).split()
    assert command[command.index("--set") + 1 :] == [
        "trainer.resume=null",
        "trainer.max_epochs=3",
        "trainer.resume=auto",
    ]
    # the disttrain command reads those overrides in that order: the last resume wins
    assert cli.main(["print-config", *command[2:]]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert resolved["resume"] == "auto" and resolved["max_epochs"] == 3


def test_an_evaluation_says_what_it_measured_and_on_which_weights(tmp_path):
    run_dir = tmp_path / "run"
    fit = disttrain_cli("fit", "--config", SMOKE, f"run_dir={run_dir}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = disttrain_cli("test", "--config", SMOKE, f"run_dir={run_dir}")
    assert test.returncode == 0, test.stderr[-3000:]
    last = test.stderr.strip().splitlines()[-1]
    assert last.startswith("[rank 0] test at epoch 1, step 12: test_loss "), last


def test_a_script_fit_twice_in_one_directory_trains_again_and_says_so(tmp_path, caplog):
    """The README's minimal module runs as `python x.py`, then under torchrun: in Python a
    fresh fit among an earlier run's checkpoints trains, naming them (a config run refuses)."""
    import logging

    from common import Regressor

    logging.getLogger("disttrain").addHandler(caplog.handler)  # disttrain does not propagate
    for _ in range(2):
        trainer = disttrain.Trainer(max_epochs=1, num_sanity_val_steps=0, seed=0)
        trainer.fit(Regressor(n_train=16))
        assert trainer.global_step == 8
    assert "holds checkpoints of an earlier run (the most advanced: epoch=0-step=8.ckpt)" in (
        caplog.text
    )
