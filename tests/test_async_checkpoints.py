"""``Trainer(async_checkpointing=True)``: training goes on while a checkpoint is written (the
state copied to host memory first, so the file holds the weights of its step, not later
ones), never two writes at once, and a crash in the middle of a background write leaves the
previous checkpoint complete: the restarted run resumes from it to the very weights of an
unbroken run. Resuming exactly from asynchronous checkpoints at a URL, and under FSDP, is in
``test_remote_checkpoints.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from common import WideExport, read_results, run_scenario, run_scenarios, write_result
from conftest import run_beside, shared_launch

import disttrain
from disttrain import Callback, ModelCheckpoint, Trainer
from disttrain.checkpoint import background, snapshot
from disttrain.checkpoint import format as checkpoint
from disttrain.storage.location import Location

SLOW_WRITE = 1.0  # seconds each checkpoint write takes here: far longer than a step


def _trainer(outdir: str, name: str, **options) -> Trainer:
    every_2_steps = ModelCheckpoint(every_n_train_steps=2, every_n_epochs=None, keep_last_k=5)
    return Trainer(
        max_epochs=2,  # 8 steps at 2 ranks
        num_sanity_val_steps=0,
        seed=1,
        logger=None,
        enable_progress_bar=False,
        default_root_dir=str(Path(outdir) / name),
        callbacks=[every_2_steps, *options.pop("callbacks", [])],
        timeout=60,
        **options,
    )


class WatchesWrites(Callback):
    """Counts the steps that end while a checkpoint write is in flight, and keeps a copy of
    the weights at each step."""

    def __init__(self, writes: dict) -> None:
        self.writes, self.weights = writes, {}

    def on_batch_end(self, trainer, module):
        if self.writes["active"]:
            self.writes["steps_during_a_write"] += 1
        state = module.state_dict()
        self.weights[trainer.global_step] = {k: v.clone() for k, v in state.items()}


def writes_in_background(outdir: str, async_checkpointing: bool) -> None:
    writes = {"active": 0, "most_at_once": 0, "steps_during_a_write": 0}
    lock = threading.Lock()
    write = snapshot.write

    def slow_write(path, state):
        with lock:
            writes["active"] += 1
            writes["most_at_once"] = max(writes["most_at_once"], writes["active"])
        time.sleep(SLOW_WRITE)
        write(path, state)
        with lock:
            writes["active"] -= 1

    snapshot.write = slow_write
    collectives, uncount = _count_collectives_in_saves()
    head_start = background._HEAD_START
    background._HEAD_START = 0.0  # this model's steps are shorter than the writer's head start
    try:
        disttrain.seed_everything(0)
        module = WideExport(str(Path(outdir) / "final.pt"))
        watch = WatchesWrites(writes)
        options = {"callbacks": [watch], "async_checkpointing": async_checkpointing}
        trainer = _trainer(outdir, "run", **options)
        trainer.fit(module)
    finally:
        snapshot.write = write
        background._HEAD_START = head_start
        uncount()
    directory = Path(outdir) / "run" / "checkpoints"
    same = {}
    for step in (2, 4, 6, 8):
        (path,) = directory.glob(f"epoch=*-step={step}.ckpt")
        saved = checkpoint.load(path)["module"]
        same[step] = all(torch.equal(saved[k], v) for k, v in watch.weights[step].items())
    result = {**writes, "same_weights": same, "collectives": collectives}
    write_result(outdir, trainer.global_rank, result)


def _count_collectives_in_saves() -> tuple[list[int], Callable[[], None]]:
    """How many torch.distributed collectives each ``ModelCheckpoint.save`` calls on this
    rank (DDP's gradient all-reduce runs in C++ and is not among them); and what undoes the
    counting."""
    counts: list[int] = []
    names = ("all_gather", "all_reduce", "broadcast", "barrier", "gather", "scatter")
    originals = {name: getattr(dist, name) for name in names}
    for name, real in originals.items():

        def counted(*args, _real=real, **kwargs):
            if counts and counts[-1] >= 0 and threading.current_thread() is threading.main_thread():
                counts[-1] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counted)
    save = ModelCheckpoint.save

    def counted_save(self, trainer):
        counts.append(0)
        try:
            return save(self, trainer)
        finally:
            counts[-1] = counts[-1]  # settled: later collectives count for no save
            counts.append(-1)

    ModelCheckpoint.save = counted_save

    def uncount() -> None:
        ModelCheckpoint.save = save
        for name, real in originals.items():
            setattr(dist, name, real)

    return counts, uncount


def writes_async(outdir: str) -> None:
    writes_in_background(outdir, async_checkpointing=True)


def writes_sync(outdir: str) -> None:
    writes_in_background(outdir, async_checkpointing=False)


def unbroken(outdir: str) -> None:
    disttrain.seed_everything(0)
    module = WideExport(str(Path(outdir) / "unbroken.pt"))  # before the Trainer, as below
    _trainer(outdir, "unbroken").fit(module)


def on_two_ranks(outdir: str) -> None:
    """The 2-rank runs of this file that end normally, in one launch, each in its own
    directory (``OUTDIR/NAME``): both modes, and the crash test's unbroken run."""
    run_scenarios(outdir, writes_async, writes_sync, unbroken)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "async_checkpoints-two_ranks", __file__, "on_two_ranks", timeout=240
    )


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_training_goes_on_while_a_checkpoint_is_written(two_ranks, mode):
    rank0 = read_results(two_ranks / f"writes_{mode}", 2)[0]
    # each checkpoint holds the weights of its own step, though training went on meanwhile
    assert rank0["same_weights"] == {"2": True, "4": True, "6": True, "8": True}
    assert rank0["most_at_once"] == 1  # never two writes at once
    if mode == "async":  # steps 3, 5 and 7 at least ended while the write before them ran
        assert rank0["steps_during_a_write"] >= 3, rank0
    else:
        assert rank0["steps_during_a_write"] == 0, rank0
    # an async save costs the state's gather only (its first, two: the slot grows), a
    # synchronous one the gather and the write's verdict; alike on every rank
    saves = [n for n in rank0["collectives"] if n >= 0]
    assert saves == ([2, 1, 1, 1] if mode == "async" else [3, 2, 2, 2]), rank0["collectives"]
    assert read_results(two_ranks / f"writes_{mode}", 2)[1]["collectives"] == rank0["collectives"]


def write_fails(outdir: str) -> None:
    """Rank 0's background write of the step-4 checkpoint raises."""
    write = snapshot.write

    def fails_at_step_4(path, state):
        if Location.at(path).name.endswith("step=4.ckpt"):
            raise OSError(28, "No space left on device", str(path))
        write(path, state)

    snapshot.write = fails_at_step_4
    disttrain.seed_everything(0)
    module = WideExport(str(Path(outdir) / "final.pt"))
    trainer = _trainer(outdir, "run", async_checkpointing=True)
    try:
        trainer.fit(module)
    except disttrain.HookFailed as failed:
        write_result(
            outdir, trainer.global_rank, {"step": trainer.global_step, "error": str(failed)}
        )
        raise


def test_a_background_write_that_fails_stops_every_rank_at_the_next_save_naming_it(tmp_path):
    """No collective of its own, yet every rank learns of a failed background write: at the
    next checkpoint's gather (step 6), each raises the same error naming rank 0 and why."""
    proc = run_beside(__file__, "write_fails", tmp_path, timeout=120, expect_ok=False)
    assert proc.returncode != 0
    results = read_results(tmp_path, 2)
    assert results[0] == results[1], results
    assert results[0]["step"] == 6
    error = results[0]["error"]
    assert "'start_checkpoint_write' failed on rank 0" in error, error
    assert "No space left on device" in error and "step=4.ckpt" in error, error
    assert not list((tmp_path / "run" / "checkpoints").glob("*step=4.ckpt"))


def killed_while_writing(outdir: str) -> None:
    """Rank 0's process dies in the middle of writing the step-4 checkpoint (first attempt
    only); torchrun restarts both ranks, which resume from what ``auto`` chooses."""
    write = snapshot.write
    crashed = Path(outdir) / "crashed"

    def dies_half_way(path, state):
        if Location.at(path).name.endswith("step=4.ckpt") and not crashed.exists():
            crashed.touch()

            def half(f):
                f.write(b"PK\x03\x04 the first bytes of a checkpoint")
                f.flush()
                os._exit(17)

            Location.at(path).write_with(half)
        write(path, state)

    snapshot.write = dies_half_way
    disttrain.seed_everything(0)
    module = WideExport(str(Path(outdir) / "resumed.pt"))
    trainer = _trainer(outdir, "run", async_checkpointing=True)
    trainer.fit(module)
    names = sorted(p.name for p in (Path(outdir) / "run" / "checkpoints").iterdir())
    write_result(outdir, trainer.global_rank, {"steps": len(module.losses), "files": names})


@pytest.mark.timeout(600)  # with the fixture's run (240 s at most) or the wait for it
def test_a_crash_during_a_background_write_resumes_from_the_previous_checkpoint(
    tmp_path, two_ranks
):
    outdir = tmp_path / "out"
    run_beside(
        __file__, "killed_while_writing", outdir, timeout=240, launcher_args=("--max-restarts=1",)
    )
    assert (outdir / "crashed").exists()
    for result in read_results(outdir, 2):
        assert result["steps"] == 6, result  # resumed after step 2: step 4's never completed
        assert result["files"] == [f"epoch={s // 5}-step={s}.ckpt" for s in (2, 4, 6, 8)] + [
            "last.ckpt"
        ]
    full = torch.load(two_ranks / "unbroken" / "unbroken.pt", weights_only=True)
    resumed = torch.load(outdir / "resumed.pt", weights_only=True)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


if __name__ == "__main__":
    run_scenario(globals())
