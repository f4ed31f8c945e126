"""Exact resume with loader workers (issue 13, point 3) on real torchrun processes.

Random augmentation is drawn inside two loader workers; a run stopped mid-epoch and resumed
ends with weights bitwise equal to the unbroken run's: map-style data (each sample's draws
seeded from the run's seed, the epoch and the sample's index), a stream with
``state_dict``/``load_state_dict``, and a ``ShardedStream`` with a shuffle buffer. A stream
without them resumes with a warning that says what it cannot restore. Then resume at another
world size (point 5) and three SIGKILLs with elastic restarts (point 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from common import read_results
from conftest import WORKERS, assert_same_weights, final_weights, job_config, launch, torchrun

from disttrain.data.sample_seeds import SeededSamples
from disttrain.data.streams import ShardedStream


def run(tmp_path, kinds: str, nproc: int):
    outdir = tmp_path / "out"
    outdir.mkdir()
    script = WORKERS / "data_resume.py"
    proc = torchrun(script, "resume", str(outdir), kinds, nproc=nproc, timeout=240)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc, read_results(outdir, nproc)


@pytest.mark.parametrize("nproc", [1, 2])
def test_mid_epoch_resume_with_two_workers_is_bitwise(tmp_path, nproc):
    _, results = run(tmp_path, "map,stream,sharded,persistent", nproc)
    for result in results:
        assert result["map"]["bitwise"], "map-style data with 2 workers"
        assert result["map"]["same_with_one_worker"]
        assert result["stream"]["bitwise"], "a stream with state_dict, 2 workers"
        assert result["sharded"]["bitwise"], "a ShardedStream with a buffer, 2 workers"
        assert result["persistent"]["bitwise"], "the same, its workers persistent"


def test_a_stream_without_state_says_what_resume_cannot_restore(tmp_path):
    proc, results = run(tmp_path, "forgetful", 2)
    assert "ForgetfulStream has no state_dict" in proc.stdout, proc.stdout[-4000:]
    # and indeed: its workers' draws differ after the resume (what state_dict would fix)
    assert not any(result["forgetful"]["bitwise"] for result in results)


def reshard(tmp_path, stage: str, nproc: int) -> list[dict]:
    outdir = tmp_path / f"{stage}{nproc}"
    outdir.mkdir()
    args = (stage, str(tmp_path / "run"))
    script = WORKERS / "data_resume.py"
    proc = torchrun(script, "reshard", str(outdir), *args, nproc=nproc, timeout=120)
    assert proc.returncode == 0, proc.stdout[-8000:]
    return proc, read_results(outdir, nproc)


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_resume_at_another_world_size_sees_every_remaining_sample_once(tmp_path, new_world_size):
    """48 samples, batches of 2: at world size 2 an epoch is 12 steps; the first run trains
    3 of epoch 1 (12 samples), the resumed one the other 36, split over its ranks."""
    _, before = reshard(tmp_path, "first", 2)
    proc, after = reshard(tmp_path, "rest", new_world_size)
    assert "from world size 2 at world size" in proc.stdout
    seen_before = [i for r in before for i in r["epoch1"]]
    seen_after = [i for r in after for i in r["epoch1"]]
    assert len(seen_before) == 12
    padding = -36 % new_world_size  # as DistributedSampler: the last batch filled up
    assert len(seen_after) == 36 + padding
    assert sorted(set(seen_before + seen_after)) == list(range(48))
    assert len(set(seen_after)) == 36 and not set(seen_before) & set(seen_after)
    # each sample's augmentation is a function of (seed, epoch, index): the same at any
    # world size, in whichever loader worker reads it
    from common import Augmented

    data = SeededSamples(Augmented(48), seed=5)
    for rows in (before, after):
        for key, row in (item for r in rows for item in r["samples"].items()):
            epoch, index = map(int, key.split("/"))
            data.set_epoch(epoch)
            assert data[index][0].tolist() == row, key


# -- repeated restarts (issue 13, point 4) --------------------------------------------------
KILLS = "5:1,16:0,29:1"  # step:rank; checkpoints every 3 steps, 12 steps an epoch


def killed_thrice_config(tmp_path: Path, kind: str, strategy: str, kills: str) -> Path:
    config = job_config(tmp_path, cls="data_resume.KilledThrice", kind=kind, kills=kills)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"].pop("report_dir")
    raw["model"]["init_args"]["report_dir"] = str(tmp_path / "report")
    raw["trainer"]["strategy"] = strategy
    raw["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = 3
    raw["trainer"]["timeout"] = 60
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["map", "sharded"])
def test_three_sigkills_and_restarts_end_bitwise_equal(tmp_path, kind, strategy):
    """World size 2, 2 loader workers per rank, random augmentation in the workers: a run
    whose ranks are SIGKILLed at steps 5, 16 and 29 (each time going on from the checkpoint
    of step 3, 15 or 27, where the second worker reads next) ends with the unbroken run's
    weights, bit for bit."""
    unbroken = tmp_path / "unbroken"
    unbroken.mkdir()
    proc = launch(killed_thrice_config(unbroken, kind, strategy, "0:0"), timeout=150)
    assert proc.returncode == 0, proc.stderr[-6000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    config = killed_thrice_config(killed, kind, strategy, KILLS)
    proc = launch(config, "--max-restarts", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = killed / "report"
    assert sorted(p.name for p in report.glob("killed-at-*")) == [
        "killed-at-16",
        "killed-at-29",
        "killed-at-5",
    ]
    assert (report / "start-rank0-attempt3").exists()  # three restarts
    assert proc.stderr.count("resumed from") >= 3
    assert_same_weights(final_weights(killed), final_weights(unbroken))


def test_a_samples_draws_depend_on_seed_epoch_and_index_only():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.randn(1).item()

    data = SeededSamples(torch.utils.data.Subset(Noise(), range(10)), seed=3)
    batch = data.__getitems__([4, 2, 7])
    assert data.__getitems__([2]) == [batch[1]]  # alone or in any batch: the same draw
    assert data[7] == batch[2]
    data.set_epoch(1)
    assert data[2] != batch[1]  # another epoch, other draws
    assert SeededSamples(Noise(), seed=4)[2] != batch[1]  # another run seed


def read_noise(shard):
    return (torch.randn(1) for _ in range(3))


@pytest.mark.parametrize("seed_samples", [True, False])
def test_a_sharded_stream_seeds_each_samples_draws_in_a_worker_unless_told_not_to(seed_samples):
    stream = ShardedStream([0, 1], read_noise, seed_samples=seed_samples)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    first, second = torch.cat(list(loader)), torch.cat(list(loader))  # new worker seeds
    assert torch.equal(first, second) is seed_samples
