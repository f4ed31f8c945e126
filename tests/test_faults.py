"""Faults on real processes: killed ranks, preemption, torn writes, bad files, failing hooks."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from common import FaultyJob, Regressor
from conftest import assert_same_weights, final_weights, job_config, launch

import disttrain
from disttrain import CheckpointError
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced


# (the chaos test below restarts five times in one run); "resume-null": a config that starts
# fresh (trainer.resume: null) still goes on from its checkpoints after an elastic restart
@pytest.mark.parametrize("attempt", [1, "resume-null"])
def test_sigkill_of_rank_one_restarts_and_ends_with_the_uninterrupted_weights(
    tmp_path, uninterrupted, attempt
):
    config = job_config(tmp_path, signal_at=5, signal_name="SIGKILL")
    if attempt == "resume-null":
        raw = yaml.safe_load(config.read_text())
        raw["trainer"]["resume"] = None
        config.write_text(yaml.safe_dump(raw))
    start = time.time()
    proc = launch(config, "--max-restarts", "1")
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = tmp_path / "report"
    killed = float((report / "signalled").read_text())
    restarted = float((report / "start-rank0-attempt1").read_text())
    print(f"SIGKILL at +{killed - start:.1f}s; training resumed {restarted - killed:.1f}s later")
    assert "resumed from" in proc.stderr
    # the launcher names the rank that died, and says the job restarts
    restart = "disttrain: rank 1 was killed by SIGKILL; restarting every rank from the last "
    assert f"{restart}checkpoint (restart 1 of 1)" in proc.stderr, proc.stderr[-4000:]
    assert "[rank 0] failed" not in proc.stderr  # rank 0 only lost its peer: not the cause
    assert_same_weights(final_weights(tmp_path), uninterrupted)


@pytest.mark.parametrize("seed", [2026])
def test_five_random_kills_in_one_run_end_with_the_uninterrupted_weights(
    tmp_path, uninterrupted, seed
):
    """Chaos, bounded: random ranks SIGKILLed at random steps, five times in one run (one kill
    per restart attempt), under --max-restarts 5; prints kill-to-training-again times."""
    config = job_config(tmp_path, "common.ChaoticJob", chaos_seed=seed)
    proc = launch(config, "--max-restarts", "5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = tmp_path / "report"
    back = []
    for attempt in range(5):
        killed = float((report / f"killed-{attempt}").read_text())
        restarted = float((report / f"start-rank0-attempt{attempt + 1}").read_text())
        back.append(restarted - killed)
    print("kill -> training again (s): " + ", ".join(f"{t:.1f}" for t in back))
    assert proc.stderr.count("resumed from") == 5, proc.stderr[-6000:]
    assert "(restart 5 of 5)" in proc.stderr
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_a_sigkilled_rank_is_named_as_the_one_that_died(tmp_path):
    proc = launch(job_config(tmp_path, signal_at=3, signal_name="SIGKILL"))
    assert proc.returncode != 0
    err = proc.stderr
    assert "disttrain: rank 1 was killed by SIGKILL, without an error of its own" in err, err
    assert "(rank 0 then lost its connection to it: a consequence)" in err, err
    assert "rank 0 failed first" not in err and "[rank 0] failed" not in err


class TornWrite(FaultyJob):
    """Global rank 0 dies (SIGKILL) half-way through writing its second checkpoint."""

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.global_rank != 0:
            return
        import io

        real_save, saves = torch.save, []

        def torn(obj, f, *args, **kwargs):
            if not isinstance(f, io.BufferedWriter):  # torch.save also pickles into buffers
                return real_save(obj, f, *args, **kwargs)
            saves.append(1)
            if len(saves) == 2:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = torn


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    proc = launch(job_config(tmp_path, cls="test_faults.TornWrite"))
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


class AnotherModel(Regressor):
    """Not the model of the checkpoint: a layer of another width, one fewer, one more."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 1)


def _as_sharded(path: Path) -> Path:
    """The checkpoint at ``path`` as FSDP writes one: a directory of DCP shards (written here
    by one process) and the rest in its ``meta.pt``."""
    from disttrain.dist.fsdp import dcp_save

    content = checkpoint.load(path)
    module = Regressor()
    module.load_state_dict(content["module"])
    sharded = path.with_name("sharded.ckpt")
    checkpoint.begin_sharded(sharded)
    dcp_save(module, [], checkpoint.sharded_staging(sharded))
    checkpoint.finish_sharded(sharded, {**content, "module": {}, "optimizers": []})
    return sharded


@pytest.mark.parametrize("kind", ["file", "sharded"])
@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_a_checkpoint_of_another_model_is_refused_naming_the_file_and_the_first_keys(
    tmp_path, stage, kind
):
    good = _real_checkpoint(tmp_path)
    good = good if kind == "file" else _as_sharded(good)
    trainer = disttrain.Trainer(default_root_dir=str(tmp_path / "other"), resume=str(good))
    with pytest.raises(CheckpointError) as failed:
        getattr(trainer, stage)(AnotherModel())
    message = str(failed.value)
    assert message.startswith(f"{good}: its weights do not fit AnotherModel"), message
    assert "missing 2: head.weight, head.bias" in message, message
    assert "unexpected 2: net.2.weight, net.2.bias" in message, message
    assert "net.0.weight (checkpoint [8, 4], module [16, 4])" in message, message
    assert "Error(s) in loading state_dict" not in message
    disttrain.Trainer(default_root_dir=str(tmp_path / "same"), resume=str(good)).validate(
        Regressor()
    )  # the model it was written by still loads it


def test_auto_resume_skips_a_bad_newest_file_with_a_warning(tmp_path, caplog):
    good = _real_checkpoint(tmp_path)
    logging.getLogger("disttrain").addHandler(caplog.handler)  # disttrain does not propagate
    bad = good.parent / "epoch=9-step=99.ckpt"
    bad.write_bytes(b"garbage")
    os.utime(bad, (time.time() + 60, time.time() + 60))
    assert most_advanced(good.parent) in (str(good), str(good.parent / "last.ckpt"))
    assert f"skipping {bad}" in caplog.text
