"""A user's first hour, as real commands: no numpy, Ctrl-C once and twice, rerun and resume,
wrong resume files, a failing rank. Each test runs the ``disttrain`` command in real
processes on real files and signals."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, WORKERS, disttrain_cli, worker_env

SMOKE = str(ROOT / "configs" / "smoke.yaml")
LONG = ["trainer.max_epochs=100000", "trainer.log_every_n_steps=1000"]


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


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "disttrain", *args],
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's foreground group: we signal the leader only
    )


def _when_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"training never started:\n{proc.communicate()[1][-4000:]}")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"did not stop within {timeout}s:\n{proc.communicate()[1][-4000:]}")


def _step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True, mmap=True)["progress"]["global_step"]


@pytest.mark.parametrize("mode", ["launch", "debug"])
def test_ctrl_c_stops_every_rank_checkpoints_and_prints_the_command_that_resumes(tmp_path, mode):
    run_dir = tmp_path / "run"
    args = ["fit", "--config", SMOKE, f"run_dir={run_dir}", *LONG]
    command = ["launch", *args] if mode == "launch" else args
    proc = _start(*command)
    _when_training(proc, run_dir)
    proc.send_signal(signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130, err[-4000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-4000:]
    stops = [line for line in err.splitlines() if "stopped on SIGINT after step" in line]
    assert len(stops) == 1, err[-4000:]  # one message, from global rank 0
    written = stops[0].split("checkpoint written to ")[1].split(". To resume: ")[0]
    assert Path(written).exists() and _step_of(Path(written)) > 0
    resume = stops[0].split("To resume: ")[1]
    assert resume == "disttrain " + " ".join(command)
    # the printed command resumes (run it shortened: a step limit just past the checkpoint)
    step = _step_of(Path(written))
    again = disttrain_cli(*resume.split()[1:], f"trainer.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {written}: epoch" in again.stderr
    assert _step_of(run_dir / "checkpoints" / "last.ckpt") == step + 2


@pytest.mark.parametrize("mode", ["launch", "debug"])
def test_a_second_ctrl_c_aborts_at_once(tmp_path, mode):
    run_dir, marker = tmp_path / "run", tmp_path / "slow"
    config = tmp_path / "slow.yaml"
    config.write_text(
        Path(SMOKE)
        .read_text()
        .replace("disttrain.examples.regression.Regression", "common.SlowSave")
        .replace("init_args:", f"init_args:\n    marker: {marker}", 1)
    )
    args = ["fit", "--config", str(config), f"run_dir={run_dir}", *LONG]
    proc = _start(*(["launch", *args] if mode == "launch" else args))
    _when_training(proc, run_dir)
    marker.touch()  # from now on a checkpoint takes 30 s: the stop cannot finish in time
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    start = time.time()
    proc.send_signal(signal.SIGINT)
    err = _finish(proc, timeout=30)
    assert time.time() - start < 10, err[-3000:]
    assert proc.returncode == 130, err[-3000:]
    assert "second interrupt" in err and "without a checkpoint" in err
    assert "Traceback" not in err and "stopped on SIGINT after step" not in err
    time.sleep(0.5)
    alive = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
    assert alive.stdout.strip() == "", "workers outlived the second Ctrl-C"


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


def test_a_run_says_where_its_files_went(tmp_path):
    run_dir = tmp_path / "run"
    proc = disttrain_cli("launch", "fit", "--config", SMOKE, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert f"[rank 0] run directory: {run_dir}" in lines
    assert f"[rank 0] checkpoints: {run_dir / 'checkpoints' / 'epoch=1-step=6.ckpt'}" in lines
    assert f"[rank 0] metrics: {run_dir / 'metrics.csv'}" in lines
