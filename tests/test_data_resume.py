"""Exact resume with loader workers on real torchrun processes.

Random augmentation is drawn inside two loader workers; a run stopped mid-epoch and resumed
ends with weights bitwise equal to the unbroken run's: map-style data (each sample's draws
seeded from the run's seed, the epoch and the sample's index), a stream with
``state_dict``/``load_state_dict``, and a ``ShardedStream`` with a shuffle buffer. A stream
without them resumes with a warning that says what it cannot restore. Then resume at another
world size, and three SIGKILLs with elastic restarts.

Every run draws random augmentation inside its loader workers (``torch.randn``, ``random``
and NumPy in ``__getitem__`` or in a stream's ``__iter__``) and uses dropout. Each torchrun
test's ranks run the scenario function written above it (``conftest.run_beside``);
``KilledThrice``, the module the SIGKILL test's ``disttrain launch`` config names, is here too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from common import (
    Augmented,
    IndexedData,
    Resumable,
    read_results,
    run_scenario,
    sharded_stream,
    write_result,
)
from conftest import (
    assert_same_weights,
    final_weights,
    job_config,
    launch,
    run_beside,
    shared_run,
)
from torch.utils.data import DataLoader, IterableDataset

import disttrain
from disttrain import Trainer
from disttrain.data.sample_seeds import SeededSamples
from disttrain.data.streams import ShardedStream, reader_position


# -- the data kinds, and the job that trains on them ---------------------------------------
class NoisyStream(IterableDataset):
    """Reads its reader's share of 48 samples (``reader_position``), adding noise from its
    own generator, seeded from the loader worker's seed (new with every loader iterator:
    replaying the epoch would draw other noise) and saved by ``state_dict``."""

    shards_by_rank = True

    def __init__(self, n: int = 48) -> None:
        self.data, self.epoch, self.loaded, self.now = IndexedData(n), 0, None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return dict(self.now)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state

    def __iter__(self):
        reader, readers = reader_position()
        mine = range(reader, len(self.data), readers)
        g = torch.Generator().manual_seed(torch.initial_seed())
        start, self.loaded = (0, None) if self.loaded is None else (self.loaded, None)
        if start:
            start, rng = start["next"], start["rng"]
            g.set_state(rng)
        for k in range(start, len(mine)):
            x, y, idx = self.data[mine[k]]
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            self.now = {"next": k + 1, "rng": g.get_state()}
            yield x, y, idx


class ForgetfulStream(NoisyStream):
    """The same stream drawing from the worker's global generator, without state methods."""

    state_dict = load_state_dict = None  # type: ignore[assignment]

    def __iter__(self):
        reader, readers = reader_position()
        for i in range(reader, len(self.data), readers):
            x, y, idx = self.data[i]
            yield x + 0.1 * torch.randn(x.shape), y, idx


class Job(Resumable):
    """Dropout, momentum, a step-wise schedule, and one of the data kinds above."""

    def __init__(self, kind: str, workers: int) -> None:
        super().__init__(n_train=48)
        self.kind, self.workers = kind, workers
        self.samples: dict[tuple[int, int], list[float]] = {}
        self.trained: list[tuple[int, int]] = []  # (epoch, index) in training order

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        for row, i in zip(x.tolist(), idx.tolist()):
            self.samples[(self.current_epoch, i)] = row
            self.trained.append((self.current_epoch, i))
        return torch.nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        if self.kind == "map":
            data = Augmented(self.n_train)
            return DataLoader(data, batch_size=2, shuffle=True, num_workers=self.workers)
        if self.kind == "persistent":  # workers that live on: later epochs must not turn
            return DataLoader(
                sharded_stream(), batch_size=2, num_workers=2, persistent_workers=True
            )
        kinds = {"stream": NoisyStream, "forgetful": ForgetfulStream, "sharded": sharded_stream}
        stream = kinds[self.kind]()
        return DataLoader(stream, batch_size=2, num_workers=self.workers)


def train(run_dir: Path, kind: str, workers: int = 2, **options) -> tuple[dict, Job]:
    disttrain.seed_everything(0)
    module = Job(kind, workers)
    trainer = Trainer(
        default_root_dir=str(run_dir), num_sanity_val_steps=0, seed=5, timeout=30, **options
    )
    trainer.fit(module)
    return {k: v.clone() for k, v in module.state_dict().items()}, module


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- a mid-epoch stop and resume, for each kind of data ------------------------------------
def resumed_per_data_kind(outdir: str) -> None:
    """For each data kind of ``KINDS``: unbroken 3 epochs against stopped at a mid-epoch step
    (after an odd number of batches: the next batch is the second worker's) and resumed."""
    root, rank = Path(outdir), int(os.environ["RANK"])
    per_epoch = 48 // (2 * int(os.environ["WORLD_SIZE"]))
    result = {}
    for kind in os.environ["KINDS"].split(","):
        full, unbroken = train(root / kind / "full", kind, max_epochs=3)
        train(root / kind / "part", kind, max_epochs=3, max_steps=per_epoch + 3)
        resumed, _ = train(root / kind / "part", kind, max_epochs=3, resume="auto")
        result[kind] = {"bitwise": same(full, resumed)}
        if kind == "map":  # the samples do not depend on the number of loader workers
            _, one_worker = train(root / kind / "one", kind, workers=1, max_epochs=1)
            epoch0 = {k: v for k, v in unbroken.samples.items() if k[0] == 0}
            result[kind]["same_with_one_worker"] = epoch0 == one_worker.samples
            result[kind]["samples"] = {f"{e}/{i}": row for (e, i), row in epoch0.items()}
    write_result(outdir, rank, result)


def _resumed(tmp_path, kinds: str, nproc: int):
    outdir = tmp_path / "out"
    proc = run_beside(
        __file__, "resumed_per_data_kind", outdir, nproc=nproc, timeout=240, KINDS=kinds
    )
    return proc, read_results(outdir, nproc)


@pytest.mark.parametrize("nproc", [1, 2])
def test_mid_epoch_resume_with_two_workers_is_bitwise(tmp_path, nproc):
    _, results = _resumed(tmp_path, "map,stream,sharded,persistent", nproc)
    for result in results:
        assert result["map"]["bitwise"], "map-style data with 2 workers"
        assert result["map"]["same_with_one_worker"]
        assert result["stream"]["bitwise"], "a stream with state_dict, 2 workers"
        assert result["sharded"]["bitwise"], "a ShardedStream with a buffer, 2 workers"
        assert result["persistent"]["bitwise"], "the same, its workers persistent"


def test_a_stream_without_state_says_what_resume_cannot_restore(tmp_path):
    proc, results = _resumed(tmp_path, "forgetful", 2)
    assert "ForgetfulStream has no state_dict" in proc.stdout, proc.stdout[-4000:]
    # and indeed: its workers' draws differ after the resume (what state_dict would fix)
    assert not any(result["forgetful"]["bitwise"] for result in results)


# -- resume at another world size ----------------------------------------------------------
def map_data_in_two_stages(outdir: str) -> None:
    """Map-style data, 2 loader workers, run directory ``RUN_DIR``: ``STAGE=first`` trains 2
    epochs but stops 3 batches into epoch 1; ``STAGE=rest`` goes on from that checkpoint at
    this run's world size. Each rank writes the samples of epoch 1 it trained and the
    augmented samples it saw."""
    stage, run_dir = os.environ["STAGE"], Path(os.environ["RUN_DIR"])
    options: dict = {"max_steps": 48 // 4 + 3} if stage == "first" else {"resume": "auto"}
    _, module = train(run_dir, "map", max_epochs=2, **options)
    epoch1 = [i for (e, i) in module.trained if e == 1]
    rows = {f"{e}/{i}": row for (e, i), row in module.samples.items()}
    write_result(outdir, int(os.environ["RANK"]), {"epoch1": epoch1, "samples": rows})


def _in_stage(tmp_path, stage: str, nproc: int):
    outdir = tmp_path / f"{stage}{nproc}"
    run_dir = tmp_path / "run"
    proc = run_beside(
        __file__, "map_data_in_two_stages", outdir, nproc=nproc, STAGE=stage, RUN_DIR=run_dir
    )
    return proc, read_results(outdir, nproc)


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_resume_at_another_world_size_sees_every_remaining_sample_once(tmp_path, new_world_size):
    """48 samples, batches of 2: at world size 2 an epoch is 12 steps; the first run trains
    3 of epoch 1 (12 samples), the resumed one the other 36, split over its ranks."""
    _, before = _in_stage(tmp_path, "first", 2)
    proc, after = _in_stage(tmp_path, "rest", new_world_size)
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
    data = SeededSamples(Augmented(48), seed=5)
    for rows in (before, after):
        for key, row in (item for r in rows for item in r["samples"].items()):
            epoch, index = map(int, key.split("/"))
            data.set_epoch(epoch)
            assert data[index][0].tolist() == row, key


# -- repeated SIGKILLs and elastic restarts ------------------------------------------------
class KilledThrice(Job):
    """For ``disttrain launch``: 2 loader workers and augmentation, ``kind`` of data; at each
    ``step:rank`` of ``kills`` that rank SIGKILLs itself, once (a marker file remembers)."""

    def __init__(self, report_dir: str, kind: str, kills: str) -> None:
        super().__init__(kind, workers=2)
        self.report_dir = Path(report_dir)
        self.kills = {int(s): int(r) for s, r in (k.split(":") for k in kills.split(","))}

    def on_train_start(self) -> None:
        env = self.trainer.env
        (self.report_dir / f"start-rank{env.rank}-attempt{env.restart_count}").touch()

    def on_batch_end(self) -> None:
        step = self.global_step
        marker = self.report_dir / f"killed-at-{step}"
        if self.kills.get(step) == self.global_rank and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_end(self) -> None:  # every rank: whole tensors also under FSDP
        weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for k, v in self.state_dict().items()
        }
        if self.global_rank == 0:
            torch.save(weights, self.report_dir / "final.pt")


KILLS = "5:1,16:0,29:1"  # step:rank; checkpoints every 3 steps, 12 steps an epoch


def killed_thrice_config(tmp_path: Path, kind: str, strategy: str, kills: str) -> Path:
    config = job_config(tmp_path, cls="test_data_resume.KilledThrice", kind=kind, kills=kills)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"].pop("report_dir")
    raw["model"]["init_args"]["report_dir"] = str(tmp_path / "report")
    raw["trainer"]["strategy"] = strategy
    raw["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = 3
    raw["trainer"]["timeout"] = 60
    config.write_text(yaml.safe_dump(raw))
    return config


CASES = [(kind, strategy) for strategy in ("ddp", "fsdp") for kind in ("map", "sharded")]


def unbroken_runs(outdir: str) -> None:
    """Each case's unbroken run, one after the other in this launch: what a rank of
    ``disttrain launch fit --config OUTDIR/KIND-STRATEGY/job.yaml`` runs (``disttrain fit``
    under torchrun), saving the launch and start-up of each."""
    from disttrain.cli.main import main

    for kind, strategy in CASES:
        config = Path(outdir) / f"{kind}-{strategy}" / "job.yaml"
        assert main(["fit", "--config", str(config)]) == 0, f"the unbroken {kind}-{strategy} run"


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory) -> Path:
    """The unbroken run of every case (``OUTDIR/KIND-STRATEGY``), in one launch in the test
    session (``conftest.shared_run``)."""

    def run(outdir: Path) -> None:
        for kind, strategy in CASES:
            (outdir / f"{kind}-{strategy}").mkdir()
            killed_thrice_config(outdir / f"{kind}-{strategy}", kind, strategy, "0:0")
        run_beside(__file__, "unbroken_runs", outdir, nproc=2, timeout=300)

    return shared_run(tmp_path_factory, "data_resume-unbroken", run)


@pytest.mark.timeout(700)  # the fixture's run (or the wait for it): 300 s at most, then 300
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["map", "sharded"])
def test_three_sigkills_and_restarts_end_bitwise_equal(tmp_path, unbroken, kind, strategy):
    """World size 2, 2 loader workers per rank, random augmentation in the workers: a run
    whose ranks are SIGKILLed at steps 5, 16 and 29 (each time going on from the checkpoint
    of step 3, 15 or 27, where the second worker reads next) ends with the unbroken run's
    weights, bit for bit."""
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
    assert_same_weights(final_weights(killed), final_weights(unbroken / f"{kind}-{strategy}"))


# -- each sample's draws, in one process ---------------------------------------------------
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


if __name__ == "__main__":
    run_scenario(globals())
