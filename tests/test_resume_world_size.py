"""Resume at another world size after a ``max_steps`` stop in the middle of an epoch: the rest
of the epoch is trained, each remaining sample once (plus ``DistributedSampler``'s padding
at the new world size), with and without shuffling, under DDP and FSDP, and the resumed run
writes checkpoints that load -- also over a checkpoint of the other layout at the same name
(a DCP directory of the 2-rank FSDP run, a file of the 1-process run that does not shard).

The epoch: 256 samples, batches of 16 per rank; at 2 ranks 8 steps, stopped after 4 (128
samples trained). Each launch runs one small fit per case, each in its own run directory:
2 ranks first, then 3 ranks and one process (no torchrun) going on from copies of those
directories. A chain of resumes inside one epoch (2 ranks → 3 → 3 again, as elastic restarts
do; and 2 → 3 → 1) must also train each sample once: the count of samples trained goes
into the checkpoint, where a batch index at the new world size cannot say it.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
from common import Regressor, run_scenario
from conftest import run_beside, shared_run

from disttrain import Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced

N, BATCH = 256, 16
CASES = [f"{strategy}-{order}" for strategy in ("ddp", "fsdp") for order in ("ordered", "shuffled")]


class Counted(Regressor):
    """Records every sample index it trains (``seen``); one epoch of ``N`` samples."""

    def __init__(self, shuffle: bool) -> None:
        super().__init__(n_train=N, batch_size=BATCH, shuffle=shuffle)


def _fit(run_dir: Path, case: str, stage: str, **options) -> None:
    """One fit of ``case`` in ``run_dir``; each rank writes the samples it trained."""
    strategy, order = case.split("-")
    module = Counted(shuffle=order == "shuffled")
    trainer = Trainer(
        max_epochs=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        logger=None,
        strategy=strategy,
        timeout=20,
        seed=3,
        default_root_dir=str(run_dir),
        **options,
    )
    trainer.fit(module)
    rank = trainer.global_rank
    record = {"seen": module.seen, "global_step": trainer.global_step}
    (run_dir / f"{stage}-rank{rank}.json").write_text(json.dumps(record))


def first_runs(outdir):
    """2 ranks: every case stops after step 4 of 8."""
    for case in CASES:
        _fit(Path(outdir) / case, case, "first", max_steps=4)


def resumed_at_three(outdir):
    """3 ranks, from copies the test made of the first runs: ``rest`` goes on to the epoch's
    end; ``chain`` stops after one step (step 5), is copied for the test (``chain-at-5``),
    then resumed at 3 ranks again to the end."""
    for case in CASES:
        _fit(Path(outdir) / case / "rest", case, "rest", resume="auto")
        chain = Path(outdir) / case / "chain"
        _fit(chain, case, "chain1", resume="auto", max_steps=5)
        if int(os.environ["RANK"]) == 0:
            shutil.copytree(chain, Path(outdir) / case / "chain-at-5")
        _fit(chain, case, "chain2", resume="auto")


def _seen(run_dir: Path, stage: str) -> list[int]:
    """Every rank's trained samples of one fit, together."""
    return [i for f in sorted(run_dir.glob(f"{stage}-rank*.json")) for i in _read(f)["seen"]]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_each_sample_once(trained: list[int], padding: int) -> None:
    """Every sample of the epoch, each once, but for ``padding`` repeats at the end."""
    counts = collections.Counter(trained)
    assert sorted(counts) == list(range(N)), sorted(set(range(N)) - set(counts))
    assert len(trained) == N + padding, collections.Counter(counts.values())


def _assert_ends_with_a_loadable_checkpoint(run_dir: Path, step: int) -> None:
    chosen = most_advanced(run_dir / "checkpoints")
    assert chosen is not None and Path(chosen).name == f"epoch=0-step={step}.ckpt", chosen
    assert checkpoint.load(chosen)["progress"]["global_step"] == step


@pytest.fixture(scope="session")
def first(tmp_path_factory) -> Path:
    """The 2-rank runs, once in the test session for the module's tests (on whichever test
    worker: ``conftest.shared_run``): never resumed in place."""

    def run(outdir: Path) -> None:
        run_beside(__file__, "first_runs", outdir, nproc=2, timeout=240)

    outdir = shared_run(tmp_path_factory, "resume_world_size-first", run)
    for case in CASES:
        assert len(_seen(outdir / case, "first")) == 128
    return outdir


def _copy(first: Path, case: str, to: Path) -> Path:
    shutil.copytree(first / case, to)
    return to


@pytest.mark.timeout(400)
def test_a_two_rank_run_resumed_at_three_trains_the_rest_of_its_epoch_once(first, tmp_path):
    outdir = tmp_path / "out"
    for case in CASES:
        _copy(first, case, outdir / case / "rest")
        _copy(first, case, outdir / case / "chain")
    run_beside(__file__, "resumed_at_three", outdir, nproc=3, timeout=360)
    for case in CASES:
        before = _seen(first / case, "first")
        rest = outdir / case / "rest"
        # 128 left: 43 a rank at 3 ranks (one sample twice), 3 batches: steps 5 to 7
        _assert_each_sample_once(before + _seen(rest, "rest"), padding=1)
        _assert_ends_with_a_loadable_checkpoint(rest, step=7)
        chain = outdir / case / "chain"
        # step 5 trains 48 of the 128; the second resume the other 80 (27 a rank: one twice)
        chained = _seen(chain, "chain1") + _seen(chain, "chain2")
        assert len(_seen(chain, "chain1")) == 48
        _assert_each_sample_once(before + chained, padding=1)
        _assert_ends_with_a_loadable_checkpoint(chain, step=7)
        # and the chain's middle checkpoint resumed in one process: the other 80, once each
        at_one = outdir / case / "chain-at-5"
        _fit(at_one, case, "one", resume="auto")  # FSDP does not shard in one process
        _assert_each_sample_once(before + _seen(chain, "chain1") + _seen(at_one, "one"), 0)


@pytest.mark.parametrize("case", CASES)
def test_a_two_rank_run_resumed_in_one_process_trains_the_rest_of_its_epoch_once(
    first, tmp_path, case
):
    """In this very process, as a debug run is (no torchrun): FSDP does not shard here, so
    its checkpoints are files where the 2-rank run wrote DCP directories."""
    run_dir = _copy(first, case, tmp_path / "rest")
    _fit(run_dir, case, "rest", resume="auto")
    _assert_each_sample_once(_seen(first / case, "first") + _seen(run_dir, "rest"), padding=0)
    _assert_ends_with_a_loadable_checkpoint(run_dir, step=12)  # 8 more batches of 16
    # nothing left to train (max_steps=4 again): the fit still saves step 4, a file where
    # the 2-rank FSDP run wrote a directory of that name
    again = _copy(first, case, tmp_path / "again")
    _fit(again, case, "again", resume="auto", max_steps=4)
    assert _seen(again, "again") == []
    _assert_ends_with_a_loadable_checkpoint(again, step=4)
    assert (again / "checkpoints" / "epoch=0-step=4.ckpt").is_file()


def test_a_checkpoint_written_before_the_sample_count_still_loads_its_progress():
    saved = {"epoch": 1, "global_step": 9, "next_batch": 3, "epoch_finished": False}
    progress = checkpoint.Progress.from_dict({**saved, "gone": 1})
    assert progress == checkpoint.Progress(1, 9, 3, False) and progress.samples is None


if __name__ == "__main__":
    run_scenario(globals())
