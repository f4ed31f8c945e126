"""A long ``prepare_data`` on real torchrun ranks: the others wait as long as the preparing
rank's heartbeat goes on in the store, and fail within seconds, naming it, once it stops.

The intervals are short here (0.2 s between beats, silent after 1.5 s); by default they are
5 s and 60 s. Each test's ranks run the scenario written above it (``conftest.run_beside``)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch.distributed
from common import Regressor, read_results, run_scenario, write_result
from conftest import run_beside

from disttrain import ConfigError, HookFailed, Trainer
from disttrain.dist.heartbeat import HeartbeatTimes, PeerSilent, beating, wait_for_beats

FAST = {"prepare_data_heartbeat": 0.2, "prepare_data_heartbeat_timeout": 1.5}
SHORT_RUN = {
    "max_epochs": 1,
    "limit_train_batches": 2,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "logger": None,
}


class TimedPrepare(Regressor):
    """Records, on every rank, how long after fit began ``setup`` ran."""

    def __init__(self, outdir: str) -> None:
        super().__init__()
        self.outdir, self.began = outdir, time.monotonic()

    def setup(self, stage: str) -> None:
        self.setup_after = time.monotonic() - self.began


# -- (a) longer than any fixed timeout of the job, and the other rank waited ---------------
class SlowPrepare(TimedPrepare):
    def prepare_data(self) -> None:
        time.sleep(4.0)  # longer than the job's collective timeout and the heartbeat's


def slow_prepare(outdir):
    trainer = Trainer(timeout=2, **FAST, **SHORT_RUN)
    module = SlowPrepare(outdir)
    trainer.fit(module)
    write_result(outdir, trainer.global_rank, {"setup_after": module.setup_after})


def test_a_prepare_data_longer_than_every_timeout_of_the_job_succeeds_while_it_beats(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "slow_prepare", outdir, timeout=90)
    for rank, result in enumerate(read_results(outdir, 2)):
        assert result["setup_after"] >= 4.0, rank  # rank 1 waited for rank 0's 4 s


# -- (b) the preparing rank dies: the others fail within seconds, naming it ----------------
class DiesInPrepare(TimedPrepare):
    def prepare_data(self) -> None:
        time.sleep(0.5)  # the other rank is waiting by now
        Path(self.outdir, "died").write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)


def rank_zero_dies(outdir):
    trainer = Trainer(**FAST, **SHORT_RUN)
    try:
        trainer.fit(DiesInPrepare(outdir))
    except HookFailed as err:
        died = float(Path(outdir, "died").read_text())
        after = time.time() - died
        write_result(outdir, trainer.global_rank, {"error": str(err), "after": after})
        raise


def test_rank_zero_killed_in_prepare_data_fails_the_others_within_seconds_naming_it(tmp_path):
    outdir = tmp_path / "out"
    # The agent here watches both ranks and would stop rank 1 as soon as rank 0 died. On
    # several nodes, rank 0's death is seen by its own node's agent only: the agent here is
    # made as slow to look (20 s) as one that cannot see it, so rank 1 finds out by itself.
    start = time.monotonic()
    proc = run_beside(
        __file__,
        "rank_zero_dies",
        outdir,
        expect_ok=False,
        timeout=90,
        launcher_args=("--monitor-interval=20",),
    )
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert time.monotonic() - start < 60
    assert not (outdir / "rank0.json").exists()  # it died without a word
    result = read_results_of(outdir, 1)
    assert "hook 'prepare_data' failed on rank 0" in result["error"], result
    assert "rank 0 stopped sending its prepare_data heartbeat" in result["error"], result
    assert result["after"] < 1.5 + 2.0, result  # silent for 1.5 s, then at most a poll or so


class FreezesInPrepare(TimedPrepare):
    def prepare_data(self) -> None:
        time.sleep(0.5)
        Path(self.outdir, "died").write_text(str(time.time()))  # frozen from here on
        import ctypes

        ctypes.PyDLL(None).sleep(60)  # C code that keeps the GIL: no thread of it runs


def rank_zero_freezes(outdir):
    trainer = Trainer(**FAST, **SHORT_RUN)
    try:
        trainer.fit(FreezesInPrepare(outdir))
    except HookFailed as err:
        died = float(Path(outdir, "died").read_text())
        after = time.time() - died
        write_result(outdir, trainer.global_rank, {"error": str(err), "after": after})
        raise


def test_rank_zero_frozen_in_prepare_data_fails_the_job_within_seconds_naming_it(tmp_path):
    """Alive to the agent, silent to the store: only the heartbeat tells."""
    outdir = tmp_path / "out"
    start = time.monotonic()
    proc = run_beside(__file__, "rank_zero_freezes", outdir, expect_ok=False, timeout=90)
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert time.monotonic() - start < 45  # not the 60 s of rank 0's freeze
    result = read_results_of(outdir, 1)
    assert "rank 0 stopped sending its prepare_data heartbeat" in result["error"], result
    assert result["after"] < 1.5 + 2.0, result


def read_results_of(outdir: Path, rank: int) -> dict:
    return json.loads((outdir / f"rank{rank}.json").read_text())


# -- the wait itself, on a real store in this process -------------------------------------
def test_a_wait_ends_when_the_running_rank_is_done_and_not_before():
    store, times = torch.distributed.HashStore(), HeartbeatTimes(0.05, 0.3)
    done = threading.Event()

    def run_hook() -> None:
        with beating(store, "prepare_data", 0, times):
            time.sleep(0.8)  # beyond the silence allowed: the beats keep the wait going
        done.set()

    thread = threading.Thread(target=run_hook)
    thread.start()
    wait_for_beats(store, "prepare_data", 0, times)
    thread.join()
    assert done.is_set()


def test_a_rank_that_beats_but_never_finishes_is_bounded_by_prepare_data_timeout():
    store, times = torch.distributed.HashStore(), HeartbeatTimes(0.05, 0.3, limit=0.6)
    with beating(store, "prepare_data", 0, times), pytest.raises(PeerSilent) as silent:
        wait_for_beats(store, "prepare_data", 0, times)
    assert "rank 0's prepare_data still runs after" in str(silent.value)
    assert "(prepare_data_timeout=0.6)" in str(silent.value)


def test_a_rank_that_never_beats_is_silent():
    times = HeartbeatTimes(0.05, 0.3)
    with pytest.raises(PeerSilent, match="rank 3 stopped sending its prepare_data heartbeat"):
        wait_for_beats(torch.distributed.HashStore(), "prepare_data", 3, times)


# -- the debug mode: nothing waits and nothing beats ---------------------------------------
class SeesThreads(Regressor):
    def prepare_data(self) -> None:
        names = [t.name for t in threading.enumerate()]
        assert not any("heartbeat" in name for name in names), names


def test_in_one_process_prepare_data_runs_without_a_heartbeat(tmp_path):
    Trainer(default_root_dir=str(tmp_path), **FAST, **SHORT_RUN).fit(SeesThreads())


# -- the options -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"prepare_data_heartbeat": 0}, "prepare_data_heartbeat: must be a positive number"),
        (
            {"prepare_data_heartbeat_timeout": -1},
            "prepare_data_heartbeat_timeout: must be a positive number",
        ),
        (
            {"prepare_data_heartbeat": 5, "prepare_data_heartbeat_timeout": 5},
            "prepare_data_heartbeat_timeout: must be longer than prepare_data_heartbeat",
        ),
        ({"prepare_data_timeout": 0}, "prepare_data_timeout: must be a positive number"),
        ({"prepare_data_heartbeat": "often"}, "prepare_data_heartbeat: expected float"),
    ],
)
def test_the_heartbeat_options_are_checked_naming_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(**options)


def test_prepare_data_timeout_defaults_to_no_fixed_bound():
    assert Trainer().config.prepare_data_timeout is None


if __name__ == "__main__":
    run_scenario(globals())
