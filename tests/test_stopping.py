"""Every way a run stops early, on real processes (``disttrain/loop/stopping.py``): the -1
agreement, the vote that rides the gradient all-reduce (also from a micro-step, in fp16,
compiled), max_steps, early stopping, SIGTERM to a rank or to the launcher, Ctrl-C once and
twice in the launcher and in the debug mode.

Each test's torchrun ranks run the scenario function written above it
(``conftest.run_beside``; the 2-rank scenarios that end normally share one launch,
``on_two_ranks``); the modules a ``disttrain launch`` config names
(``test_stopping.SlowSave``) are here too, above their tests."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from common import Regressor, read_results, run_scenario, run_scenarios, write_result
from conftest import (
    LONG,
    SMOKE,
    assert_same_weights,
    disttrain_cli,
    final_weights,
    job_config,
    launch,
    launch_two,
    run_beside,
    shared_launch,
    worker_env,
)

import disttrain
from disttrain import Trainer
from disttrain.data.streams import reader_position
from disttrain.examples.regression import Regression
from disttrain.ranks.dispatch import HookRaised


class StopsOnRankOne(Regressor):
    """Rank 1 returns -1 from on_batch_start at batch 3 of epoch 0 only."""

    def __init__(self):
        super().__init__(n_train=16, batch_size=2)
        self.steps: dict[int, list[int]] = {}
        self.val_runs = 0
        self.epoch_ends = 0

    def on_batch_start(self, batch):
        batch_idx = len(self.steps.get(self.current_epoch, []))
        if self.global_rank == 1 and self.current_epoch == 0 and batch_idx == 3:
            return -1
        return None

    def training_step(self, batch, batch_idx):
        self.steps.setdefault(self.current_epoch, []).append(batch_idx)
        return super().training_step(batch, batch_idx)

    def on_post_performance_check(self):
        self.val_runs += 1

    def on_epoch_end(self):
        self.epoch_ends += 1


def stop_on_rank1(outdir):
    """2 epochs of 4 batches per rank (16 samples, batches of 2), no sanity check."""
    module = StopsOnRankOne()
    trainer = Trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "steps": module.steps,
            "val_runs": module.val_runs,
            "epoch_ends": module.epoch_ends,
            "global_step": trainer.global_step,
        },
    )


def test_minus_one_on_rank_one_stops_every_rank_at_the_same_batch(two_ranks):
    for result in read_results(two_ranks / "stop_on_rank1", 2):
        assert result["steps"]["0"] == [0, 1, 2]  # rank 1 said -1 at batch 3 of epoch 0
        assert result["steps"]["1"] == [0, 1, 2, 3]  # the next epoch runs in full
        assert result["val_runs"] == 2 and result["epoch_ends"] == 2
        assert result["global_step"] == 7


def test_minus_one_stops_the_epoch_in_debug_mode():
    class Stop(Regressor):
        def on_batch_start(self, batch):
            return -1 if len(self.seen) == 4 else None  # after two batches of 2

    module = Stop(n_train=16)
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module)
    assert len(module.seen) == 4 and trainer.global_step == 2


def test_max_steps_stops_inside_an_epoch():
    module = Regressor(n_train=16)
    trainer = Trainer(max_epochs=5, max_steps=3, num_sanity_val_steps=0)
    trainer.fit(module)
    assert trainer.global_step == 3 and len(module.seen) == 6


def test_the_stop_vote_leaves_the_loss_exact_and_reads_what_backward_carried():
    from disttrain.loop.vote import StopVote

    vote = StopVote(torch.device("cpu"))
    loss = torch.tensor(0.123456789, requires_grad=True)
    carried = vote.carried_by(loss)
    assert carried.item() == loss.item()  # the zero weight adds exactly nothing
    carried.backward()
    assert loss.grad.item() == 1.0
    assert not vote.agreed(True)  # no ballot carried yet; this rank votes from now on

    out = vote.carried_by({"loss": loss * 2, "extra": 1})
    assert out["extra"] == 1 and out["loss"].item() == (loss * 2).item()
    out["loss"].backward()
    assert vote.agreed(False)  # the ballot reached the weight's gradient
    vote.carried_by(loss).backward()
    assert not vote.agreed(True)  # a backward without a ballot: nothing new
    vote.carried_by(loss).backward()
    assert vote.agreed(False)  # a vote cast again is seen again
    assert vote.carried_by("not a loss") == "not a loss"
    for from_above in (float("nan"), 0.0, float("inf")):  # the ballot arrives as it was cast
        (vote.carried_by(loss) * from_above).backward()
        assert not vote.agreed(True), from_above  # no vote carried: none read
        (vote.carried_by(loss) * from_above).backward()
        assert vote.agreed(False), from_above  # a vote carried: read
    half = torch.tensor(0.5, dtype=torch.bfloat16, requires_grad=True)
    assert vote.carried_by(half).dtype == torch.bfloat16  # the loss keeps its dtype
    frozen = torch.tensor(1.0)
    assert vote.carried_by(frozen) is frozen  # no gradient: left for backward to report


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


def test_sigterm_to_the_launcher_stops_the_run_and_the_same_command_resumes_it(tmp_path):
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
        cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


class SplitOpinion(Regressor):
    """Validation loss improves on rank 0 but worsens on rank 1 from the second epoch."""

    def validation_epoch_end(self, outputs):
        epoch = self.current_epoch
        value = 1.0 / (epoch + 1) if self.global_rank == 0 else (1.0 if epoch == 0 else 2.0)
        return {"val_loss": value}


def early_stop_one_rank(outdir):
    """Up to 6 epochs of 4 steps (16 samples), early stopping with patience 1."""
    module = SplitOpinion(n_train=16)
    stopper = disttrain.EarlyStopping(monitor="val_loss", patience=1)
    trainer = Trainer(
        max_epochs=6, num_sanity_val_steps=0, callbacks=[stopper], enable_checkpointing=False
    )
    trainer.fit(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "stopped_epoch": stopper.stopped_epoch,
        },
    )


def test_early_stopping_seen_on_one_rank_stops_every_rank_together(two_ranks):
    rank0, rank1 = read_results(two_ranks / "early_stop_one_rank", 2)
    assert rank1["stopped_epoch"] == 1 and rank0["stopped_epoch"] is None
    assert rank0["epoch"] == rank1["epoch"] == 1
    assert rank0["step"] == rank1["step"] == 8


def vote_on_a_micro_step(outdir, precision=None, compile_=None):
    """The last rank asks to stop on a micro-step inside an accumulation window (a no_sync
    backward); the vote rides the window's synchronised backward. Precision and compile
    come from the arguments, else from the environment."""
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = True  # a vote must not recompile the model

    class AsksToStop(disttrain.Callback):
        def on_batch_end(self, trainer, module):
            voter = trainer.world_size - 1
            step_two_done = trainer.global_step == 2 and not trainer.at_step_boundary
            if trainer.global_rank == voter and step_two_done:
                trainer.should_stop = True  # batch 4: a micro-step of step 3

    trainer = Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        precision=precision or os.environ["PRECISION"],
        compile=(compile_ or os.environ.get("COMPILE")) == "1",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=[AsksToStop()],
    )

    class Plain(Regressor):
        def training_step(self, batch, batch_idx):  # no Python state: nothing else recompiles
            x, y, _ = batch
            return torch.nn.functional.mse_loss(self(x), y)

    trainer.fit(Plain(n_train=64))
    write_result(outdir, trainer.global_rank, {"stopped_after": trainer.global_step})


def vote_fp32(outdir):
    vote_on_a_micro_step(outdir, "32", "0")


def vote_fp16_scaled(outdir):
    vote_on_a_micro_step(outdir, "16-mixed", "0")


def on_two_ranks(outdir):
    """The 2-rank runs of this file that end normally, in one launch, each in its own
    directory (``OUTDIR/NAME``)."""
    run_scenarios(outdir, stop_on_rank1, early_stop_one_rank, vote_fp32, vote_fp16_scaled)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "stopping-two_ranks", __file__, "on_two_ranks", timeout=240
    )


@pytest.mark.parametrize(
    ("precision", "compile_", "nproc"),
    [("32", "0", 2), ("16-mixed", "0", 2), ("32", "1", 1)],
    ids=["fp32", "fp16-scaled", "compiled"],
)
def test_a_vote_cast_on_a_micro_step_stops_every_rank_after_the_same_step(
    tmp_path, request, precision, compile_, nproc
):
    # asked on batch 4 (inside step 3's window), cast after step 3, carried by step 4's
    # no_sync micro-step and then its synchronised backward: every rank stops after step 4
    if compile_ == "1":  # one rank: a launch of its own
        outdir = tmp_path / "out"
        run_beside(
            __file__,
            "vote_on_a_micro_step",
            outdir,
            nproc=nproc,
            timeout=300,
            PRECISION=precision,
            COMPILE=compile_,
        )
    else:  # in the shared 2-rank launch (the fixture two_ranks)
        case = "vote_fp32" if precision == "32" else "vote_fp16_scaled"
        outdir = request.getfixturevalue("two_ranks") / case
    assert [r["stopped_after"] for r in read_results(outdir, nproc)] == [4] * nproc


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
    args = ["fit", "--config", SMOKE, f"run_dir={run_dir}", *LONG, "trainer.log_every_n_steps=1"]
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
    # the history is kept up to the stop: a row for every step logged (each one here)
    with (run_dir / "metrics.csv").open() as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("train_loss")]
    assert logged == list(range(1, _step_of(Path(written)) + 1))
    resume = stops[0].split("To resume: ")[1]
    assert resume == "disttrain " + " ".join(command)
    # the printed command resumes (run it shortened: a step limit just past the checkpoint)
    step = _step_of(Path(written))
    again = disttrain_cli(*resume.split()[1:], f"trainer.max_steps={step + 2}")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resumed from {written}: epoch" in again.stderr
    assert _step_of(run_dir / "checkpoints" / "last.ckpt") == step + 2


class SlowSave(Regression):
    """Saves take ``seconds`` once ``marker`` exists: a stop's checkpoint is still being
    written when a second Ctrl-C comes."""

    def __init__(self, marker: str, seconds: float = 30.0, **kw) -> None:
        super().__init__(**kw)
        self.marker, self.seconds = marker, seconds

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if Path(self.marker).exists():
            time.sleep(self.seconds)


@pytest.mark.parametrize("mode", ["launch", "debug"])
def test_a_second_ctrl_c_aborts_at_once(tmp_path, mode):
    run_dir, marker = tmp_path / "run", tmp_path / "slow"
    config = tmp_path / "slow.yaml"
    config.write_text(
        Path(SMOKE)
        .read_text()
        .replace("disttrain.examples.regression.Regression", "test_stopping.SlowSave")
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


class LoaderWorkers(Regression):
    """Regression whose training loader has two worker processes."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=2
        )


class _OwnShare(torch.utils.data.IterableDataset):
    """A plain stream (no state) of this reader's share of ``data``."""

    shards_by_rank = True

    def __init__(self, data) -> None:
        self.data = data

    def __iter__(self):
        reader, readers = reader_position()
        return (self.data[i] for i in range(reader, len(self.data), readers))


class StreamWorkers(Regression):
    """Regression whose training data is a plain stream read by two persistent workers."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            _OwnShare(self.train_set),
            batch_size=self.batch_size,
            num_workers=2,
            persistent_workers=True,
        )


@pytest.mark.parametrize("module", ["test_stopping.LoaderWorkers", "test_stopping.StreamWorkers"])
def test_sigterm_to_the_launcher_with_loader_workers_stops_cleanly(tmp_path, module):
    """torchrun's agent signals each rank's whole process group, loader workers included; a
    worker killed by it would fail the rank. The workers ignore it: the rank stops agreed.
    (Map-style data, and a plain stream whose loader disttrain does not rebuild.)"""
    run_dir = tmp_path / "run"
    config = tmp_path / "workers.yaml"
    config.write_text(
        Path(SMOKE).read_text().replace("disttrain.examples.regression.Regression", module)
    )
    proc = _start("launch", "fit", "--config", str(config), f"run_dir={run_dir}", *LONG)
    _when_training(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 75, err[-4000:]
    assert "stopped on SIGTERM after step" in err and "exited unexpectedly" not in err


def test_a_monitored_checkpoint_saves_before_any_validation(tmp_path):
    """max_steps (or a stop) before the first validation: the monitored metric exists on no
    rank yet, and the last checkpoint is still written, unranked."""
    module = Regressor(n_train=16)
    monitor = disttrain.ModelCheckpoint(monitor="val_loss")
    trainer = Trainer(max_steps=2, num_sanity_val_steps=0, callbacks=[monitor])
    trainer.fit(module)
    assert monitor.saved == ["epoch=0-step=2.ckpt"] and monitor.best == []
    assert (Path(trainer.config.default_root_dir) / "checkpoints" / "epoch=0-step=2.ckpt").exists()


def test_a_monitor_the_run_never_logs_stops_every_rank_naming_what_was_logged(tmp_path):
    """A typo in ``monitor`` used to run to the end and exit 0 without a word."""
    callbacks = (
        "trainer.callbacks=[{class_path: disttrain.callbacks.ModelCheckpoint, "
        "init_args: {monitor: val_los}}]"
    )
    proc = launch_two(SMOKE, f"run_dir={tmp_path / 'run'}", "trainer.max_epochs=4", callbacks)
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "ModelCheckpoint(monitor='val_los'): the run never logged 'val_los'" in proc.stderr
    assert "(did you mean 'val_loss'?)" in proc.stderr
    assert "logged: epoch, lr, train_loss, val_loss" in proc.stderr
    assert "epoch=1-step=" not in proc.stderr  # it stopped after the first epoch


@pytest.mark.parametrize("validates", [True, False])
def test_early_stopping_on_a_metric_never_logged_is_an_error_once_validation_ran(
    tmp_path, disttrain_log, validates
):
    module = Regressor(n_train=16)
    stopper = disttrain.EarlyStopping(monitor="val_acc")
    limit = {} if validates else {"limit_val_batches": 0}
    trainer = Trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[stopper], **limit)
    if validates:
        with pytest.raises(HookRaised) as err:
            trainer.fit(module)
        assert "EarlyStopping(monitor='val_acc'): the run never logged 'val_acc'" in str(err.value)
        assert trainer.current_epoch == 1  # raised as epoch 1 started, not at the end
    else:  # no validation ever ran: the metric may just not have come round yet
        trainer.fit(module)
        assert "the run never logged 'val_acc'" in disttrain_log.text
        assert "(no validation ran in this fit)" in disttrain_log.text


class NaNValidation(Regressor):
    """Validation loss NaN from epoch 1 on."""

    def validation_epoch_end(self, outputs):
        value = float("nan") if self.current_epoch >= 1 else 1.0
        return {"val_loss": torch.tensor(value)}


def test_a_nan_metric_stops_early_stopping_and_is_not_ranked_by_checkpoints(
    tmp_path, disttrain_log
):
    module = NaNValidation(n_train=8)
    best = disttrain.ModelCheckpoint(monitor="val_loss", save_top_k=2, keep_last_k=1)
    stopper = disttrain.EarlyStopping(monitor="val_loss", patience=10)
    trainer = Trainer(max_epochs=6, num_sanity_val_steps=0, callbacks=[best, stopper])
    trainer.fit(module)
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 1  # not after 10 more
    assert "EarlyStopping: val_loss is nan at epoch 1: stopping" in disttrain_log.text
    assert [name for _, name in best.best] == ["epoch=0-step=4.ckpt"]  # the NaN one unranked


if __name__ == "__main__":
    run_scenario(globals())
