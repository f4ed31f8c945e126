"""Faults on real processes: killed ranks, preemption, torn writes, bad files, failing hooks."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from common import read_results
from conftest import disttrain_cli, worker_env

import disttrain
from disttrain import CheckpointError
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced

ENV = worker_env()


def job_config(tmp_path: Path, cls: str = "common.FaultyJob", **init_args) -> Path:
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    config = {
        "model": {"class_path": cls, "init_args": {"report_dir": str(report), **init_args}},
        "trainer": {
            "max_epochs": 3,
            "num_sanity_val_steps": 1,
            "callbacks": [
                {
                    "class_path": "disttrain.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_steps": 2, "keep_last_k": 2},
                }
            ],
        },
        "launch": {"nproc_per_node": 2},
        "seed": 5,
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(
    config: Path, *extra: str, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    return disttrain_cli("launch", *extra, "fit", "--config", str(config), timeout=timeout, env=env)


def final_weights(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "report" / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    proc = launch(job_config(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return final_weights(tmp_path)


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("attempt", [1, 2, 3])  # repeated: a restart must form its group every time
def test_sigkill_of_rank_one_restarts_and_ends_with_the_uninterrupted_weights(
    tmp_path, uninterrupted, attempt
):
    config = job_config(tmp_path, signal_at=5, signal_name="SIGKILL")
    start = time.time()
    proc = launch(config, "--max-restarts", "1")
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = tmp_path / "report"
    killed = float((report / "signalled").read_text())
    restarted = float((report / "start-rank0-attempt1").read_text())
    print(f"SIGKILL at +{killed - start:.1f}s; training resumed {restarted - killed:.1f}s later")
    assert "resumed from" in proc.stderr
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigterm_to_one_rank_checkpoints_exits_75_and_the_same_command_resumes(
    tmp_path, uninterrupted
):
    config = job_config(tmp_path, signal_at=5, signal_name="SIGTERM")
    proc = launch(config, env=worker_env(DISTTRAIN_LOG_ALL_RANKS="1"))  # both ranks' words
    assert proc.returncode == disttrain.EXIT_PREEMPTED == 75, proc.stderr[-6000:]
    # voted at step 5 on rank 1, agreed in step 6's gradient all-reduce: both stop after it
    assert "[rank 0] stopped on SIGTERM after step 6 (every rank" in proc.stderr
    assert "[rank 1] stopped on SIGTERM after step 6 (every rank" in proc.stderr
    resume = f"To resume: disttrain launch fit --config {config}"
    assert resume in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "epoch=0-step=6.ckpt").exists()
    assert not (tmp_path / "report" / "final.pt").exists()
    again = launch(config)
    assert again.returncode == 0, again.stderr[-6000:]
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigterm_to_the_launcher(tmp_path, uninterrupted):
    config = job_config(tmp_path, n_train=96)  # long enough to be caught mid-run
    full = launch(config)
    assert full.returncode == 0
    expected = final_weights(tmp_path)
    (tmp_path / "report" / "final.pt").unlink()
    run_dir = tmp_path / "run"
    for path in run_dir.iterdir():
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
    cmd = [sys.executable, "-m", "disttrain", "launch", "fit", "--config", str(config)]
    launcher = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # training is under way
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 75, err[-6000:]
    again = launch(config)
    assert again.returncode == 0, again.stderr[-6000:]
    assert_same_weights(final_weights(tmp_path), expected)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    proc = launch(job_config(tmp_path, cls="common.TornWrite"))
    assert proc.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    leftovers = list(ckpts.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".epoch=0-step=4.ckpt.")
    assert [p.name for p in ckpts.glob("*.ckpt")] == ["epoch=0-step=2.ckpt"] or sorted(
        p.name for p in ckpts.glob("*.ckpt")
    ) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    checkpoint.load(ckpts / "epoch=0-step=2.ckpt")  # complete and loadable
    again = launch(job_config(tmp_path), "--set", "trainer.resume=auto")
    assert again.returncode == 0, again.stderr[-6000:]
    assert "of a checkpoint write that never completed" in again.stderr, again.stderr[-3000:]
    assert not list(ckpts.glob(".*.tmp"))
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_exception_in_on_batch_end_on_rank_one_ends_the_job_naming_rank_and_hook(tmp_path):
    start = time.monotonic()
    proc = launch(job_config(tmp_path, raise_at=3), "--set", "trainer.timeout=20")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 20 + 15, elapsed
    assert "rank 1: hook 'on_batch_end' raised ValueError: broken batch at step 3" in proc.stderr
    assert "rank 1 failed first" in proc.stderr


def test_early_stopping_seen_on_one_rank_stops_every_rank_together(scenario):
    _, outdir = scenario("early_stop_one_rank")
    rank0, rank1 = read_results(outdir, 2)
    assert rank1["stopped_epoch"] == 1 and rank0["stopped_epoch"] is None
    assert rank0["epoch"] == rank1["epoch"] == 1
    assert rank0["step"] == rank1["step"] == 8


# -- files that must be refused ------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _real_checkpoint(tmp_path: Path) -> Path:
    from common import Regressor

    trainer = disttrain.Trainer(max_epochs=1, default_root_dir=str(tmp_path / "ok"))
    trainer.fit(Regressor())
    (path,) = (tmp_path / "ok" / "checkpoints").glob("epoch=0-step=*.ckpt")
    return path


def test_bad_files_are_refused_naming_the_file_and_nothing_runs(tmp_path):
    good = _real_checkpoint(tmp_path)
    checkpoint.load(good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupted = tmp_path / "corrupted.ckpt"
    corrupted.write_bytes(bytes(range(256)) * 40)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(2)}, foreign)
    malicious = tmp_path / "malicious.ckpt"
    payload = RunsCode()
    payload.marker = tmp_path / "pwned"
    torch.save({"format": checkpoint.FORMAT, "module": payload}, malicious)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(payload, f)
    cases = {
        truncated: "not a readable checkpoint",
        corrupted: "not a readable checkpoint",
        foreign: "not a disttrain checkpoint",
        malicious: "refused: it holds objects other than tensors and plain data",
        tmp_path / "plain.pkl": "",
        tmp_path / "missing.ckpt": "no such checkpoint file",
    }
    for path, reason in cases.items():
        with pytest.raises(CheckpointError) as err:
            checkpoint.load(path)
        assert str(path) in str(err.value) and reason in str(err.value), str(err.value)
    assert not payload.marker.exists(), "loading a checkpoint ran code"


def test_auto_resume_skips_a_bad_newest_file_with_a_warning(tmp_path, caplog):
    good = _real_checkpoint(tmp_path)
    logging.getLogger("disttrain").addHandler(caplog.handler)  # disttrain does not propagate
    bad = good.parent / "epoch=9-step=99.ckpt"
    bad.write_bytes(b"garbage")
    os.utime(bad, (time.time() + 60, time.time() + 60))
    assert most_advanced(good.parent) in (str(good), str(good.parent / "last.ckpt"))
    assert f"skipping {bad}" in caplog.text


@pytest.mark.parametrize(
    ("precision", "compile_", "nproc"),
    [("32", "0", 2), ("16-mixed", "0", 2), ("32", "1", 1)],
    ids=["fp32", "fp16-scaled", "compiled"],
)
def test_a_vote_cast_on_a_micro_step_stops_every_rank_after_the_same_step(
    scenario, precision, compile_, nproc
):
    # asked on batch 4 (inside step 3's window), cast after step 3, carried by step 4's
    # no_sync micro-step and then its synchronised backward: every rank stops after step 4
    timeout = 300 if compile_ == "1" else 120
    _, outdir = scenario(
        "vote_on_a_micro_step", nproc=nproc, timeout=timeout, PRECISION=precision, COMPILE=compile_
    )
    assert [r["stopped_after"] for r in read_results(outdir, nproc)] == [4] * nproc
