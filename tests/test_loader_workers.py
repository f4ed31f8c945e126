"""DataLoader worker processes on real processes: a failure with workers alive ends every
rank within seconds; samplers, ``worker_init_fn`` sharding and the user's loader options
reach the workers as torch documents them.

The scenarios run on torchrun ranks (``conftest.run_beside``) or as one plain debug-mode
process (``conftest.run_alone``); they are the functions at the end of this file.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from common import IndexedData, Regressor, read_results, write_result
from conftest import run_alone, run_beside
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    get_worker_info,
)
from torch.utils.data._utils import signal_handling

import disttrain
from disttrain.data import loaders
from disttrain.data.workers import ended
from disttrain.dist.env import DistEnv
from disttrain.examples.regression import Regression
from disttrain.loop import sources

HERE = Path(__file__)

# far longer than any test here waits: a rank that waits for it fails the test, not the job
COLLECTIVE_TIMEOUT = 300


# -- a failure with loader workers alive ---------------------------------------------------
FAILURES = {  # what breaks: (the error, the message the output must name)
    "train": ("ValueError", "sample 65 is broken"),
    "val": ("ValueError", "sample 33 is broken"),
    "validate": ("ValueError", "sample 33 is broken"),  # Trainer.validate
    "step": ("TypeError", "a dict with 'loss'; got NoneType"),  # loss_of's message
}


def _assert_named(proc, where: str) -> None:
    error, message = FAILURES[where]
    assert proc.returncode != 0
    assert error in proc.stdout and message in proc.stdout, proc.stdout[-6000:]


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent"])
@pytest.mark.parametrize("where", ["train", "val", "step", "validate"])
def test_a_failure_with_loader_workers_ends_the_debug_run_within_seconds(
    tmp_path, where, persistent
):
    start = time.monotonic()
    proc = run_alone(
        HERE, "fails", tmp_path, timeout=60, expect_ok=False, BREAK=where, PERSISTENT=persistent
    )
    elapsed = time.monotonic() - start
    _assert_named(proc, where)
    assert elapsed < 30, elapsed


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent"])
@pytest.mark.parametrize("where", ["train", "val", "step"])
def test_a_failure_with_loader_workers_on_one_rank_ends_every_rank_within_seconds(
    tmp_path, where, persistent
):
    start = time.monotonic()
    proc = run_beside(
        HERE, "fails", tmp_path, timeout=60, expect_ok=False, BREAK=where, PERSISTENT=persistent
    )
    elapsed = time.monotonic() - start
    _assert_named(proc, where)
    assert elapsed < 45, elapsed


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent"])
def test_workers_no_loop_ended_do_not_hold_the_process_at_its_exit(tmp_path, persistent):
    """The backstop: a training loader's workers (which ignore SIGTERM) left running by an
    iterator the loop never owned, referenced by the traceback of an error."""
    start = time.monotonic()
    proc = run_alone(HERE, "leaks", tmp_path, timeout=60, expect_ok=False, PERSISTENT=persistent)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and "RuntimeError: left with workers running" in proc.stdout
    assert elapsed < 30, elapsed


def test_a_signal_while_workers_start_stops_the_run_after_an_agreed_step(tmp_path):
    """SIGTERM to the process group (as a launcher sends it) while a new loader worker is
    still starting, after torch's worker loop installed its own SIGTERM handler and before
    any ``worker_init_fn`` ran: the run stops after an agreed step with its checkpoint, and
    the worker does not die of it. (That moment is short; the scenario makes it a second.)"""
    marker = tmp_path / "starting"

    def signal_when_a_worker_starts(proc) -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)

    proc = run_alone(
        HERE,
        "slow_starts",
        tmp_path,
        timeout=90,
        expect_ok=False,
        meanwhile=signal_when_a_worker_starts,
        MARKER=marker,
    )
    assert proc.returncode == disttrain.EXIT_PREEMPTED, proc.stdout[-6000:]
    assert "stopped on SIGTERM after step" in proc.stdout
    assert "killed by signal" not in proc.stdout


class Breaks(Dataset):
    """``samples`` (a dataset of ``(x, y)``) whose sample ``bad`` raises ValueError."""

    def __init__(self, samples, bad: int = -1) -> None:
        self.samples, self.bad = samples, bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"sample {i} is broken")
        return self.samples[i]


class FailsWithWorkers(Regression):
    """Regression (192 training samples, 64 validation samples, batches of 16) read by 2
    loader workers; ``where`` breaks: a training sample (65: rank 1's third batch at world
    size 2), a validation sample (33: rank 1's second batch; "val" in fit, "validate" in
    ``Trainer.validate``), or ``training_step``, which returns None on the last rank at its
    third batch."""

    def __init__(self, where: str, persistent: bool) -> None:
        super().__init__()
        self.where, self.persistent = where, persistent

    def training_step(self, batch, batch_idx):
        last_rank = self.global_rank == self.trainer.world_size - 1
        if self.where == "step" and last_rank and batch_idx == 2:
            return None
        return super().training_step(batch, batch_idx)

    def _loader(self, samples, bad: int) -> DataLoader:
        return DataLoader(
            Breaks(samples, bad),
            batch_size=self.batch_size,
            num_workers=2,
            persistent_workers=self.persistent,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, 65 if self.where == "train" else -1)

    def val_dataloader(self):
        return self._loader(self.val_set, 33 if self.where in ("val", "validate") else -1)


# -- a worker whose fork never returns -------------------------------------------------------
def test_a_loader_worker_stuck_in_its_fork_is_forked_again_and_the_run_is_unchanged(tmp_path):
    """A forked worker stuck inside ``fork`` (as CPython gh-112275 leaves one before 3.12,
    emulated by an at-fork hook that never returns in the first child) is forked again after
    ``_START_TIMEOUT`` (1 s here) with the same id, seed and queues: the fit ends, and it read
    the same batches and ends with the same weights as a fit whose workers all started."""
    proc = run_alone(HERE, "stuck_fork", tmp_path, timeout=90)
    result = read_results(tmp_path, 1)[0]
    assert (tmp_path / "hung-fork").exists()  # the first worker's fork did hang
    assert "loader worker 0" in proc.stdout and "did not start within 1 s" in proc.stdout
    assert result["stuck"] == result["unbroken"]
    assert len(result["stuck"]["seen"]) == 2 * 24


# -- a user's sampler chain ----------------------------------------------------------------
@pytest.mark.parametrize("chain", ["torch's", "user's"])
def test_every_sampler_of_a_users_batch_sampler_gets_each_epoch(tmp_path, chain):
    """``BatchSampler(DistributedSampler(shuffle=True))``, and the same with the user's own
    sampler between the two: each epoch's order is DistributedSampler's for that epoch."""
    run_beside(HERE, "batch_samplers", tmp_path, timeout=120, CHAIN=chain)
    for rank, result in enumerate(read_results(tmp_path, 2)):
        orders = [result[str(epoch)] for epoch in range(3)]
        assert len({tuple(order) for order in orders}) == 3, orders
        for epoch, order in enumerate(orders):
            expected = _distributed_order(epoch, rank)
            if chain == "user's":  # Reversing reverses odd epochs
                expected = expected[::-1] if epoch % 2 else expected
            assert order == expected, (rank, epoch)


SAMPLER_SEED = 11


def _distributed_order(epoch: int, rank: int, n: int = 24) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, seed=SAMPLER_SEED)
    sampler.set_epoch(epoch)
    return list(sampler)


class Reversing(Sampler):
    """A user's sampler with ``set_epoch``: ``sampler``'s order, reversed in odd epochs."""

    def __init__(self, sampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:  # does not pass it on: disttrain must
        self.epoch = epoch

    def __iter__(self):
        order = list(self.sampler)
        return iter(order[::-1] if self.epoch % 2 else order)

    def __len__(self) -> int:
        return len(self.sampler)


class OwnBatchSampler(Regressor):
    """24 samples in batches of 4 from a user's ``BatchSampler`` (2 loader workers);
    ``trained[epoch]`` lists the samples in the order trained."""

    def __init__(self, chain: str) -> None:
        super().__init__(n_train=24)
        self.chain = chain
        self.trained: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.trained.setdefault(self.current_epoch, []).extend(batch[2].tolist())
        return super().training_step(batch, batch_idx)

    def train_dataloader(self):
        data = IndexedData(self.n_train)
        sampler = DistributedSampler(data, shuffle=True, seed=SAMPLER_SEED)
        if self.chain == "user's":
            sampler = Reversing(sampler)
        batches = BatchSampler(sampler, batch_size=4, drop_last=False)
        return DataLoader(data, batch_sampler=batches, num_workers=2)


# -- torch's worker_init_fn sharding -------------------------------------------------------
STOP = 5  # steps of the stopped run: after an odd batch, the second worker reads next


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent"])
def test_torchs_worker_init_fn_sharding_reads_each_sample_once_also_after_a_resume(
    tmp_path, persistent
):
    """torch's documented range stream split in ``worker_init_fn`` (by rank and worker),
    with ``state_dict``/``load_state_dict``: unbroken, and stopped after step 5 and
    resumed, each epoch trains each sample once, the resumed run the unbroken run's
    batches (and in the next epoch, workers seeded alike)."""
    run_beside(HERE, "range_streams", tmp_path, timeout=180, PERSISTENT=persistent)
    results = read_results(tmp_path, 2)
    for epoch in (0, 1):
        trained = [i for r in results for b in r["unbroken"] if b[0] == epoch for i in b[1:]]
        assert sorted(trained) == list(range(48)), epoch
    broken = [b for r in results for run in ("stopped", "resumed") for b in r[run] if b[0] == 0]
    assert sorted(i for b in broken for i in b[1:]) == list(range(48))
    per_epoch = 12
    for result in results:
        assert result["stopped"] == result["unbroken"][:STOP]
        assert result["resumed"] == result["unbroken"][STOP:]
        # the epoch after the resumed one is read by workers seeded as the unbroken run's
        epoch1 = result["unbroken seeds"][per_epoch:]
        assert result["resumed seeds"][per_epoch - STOP :] == epoch1
    inits = (tmp_path / "inits").read_text().split()
    assert inits and set(inits) == {"ok"}, inits


class RangeStream(IterableDataset):
    """torch's documented example (``IterableDataset``, example 2): samples ``start`` to
    ``end``, split over the loader workers by ``worker_init_fn``; here with a state."""

    shards_by_rank = True  # the worker_init_fn splits by rank too

    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = start, end
        self.data = IndexedData(end)
        self.now, self.resume_at = start, None

    def state_dict(self) -> dict:
        return {"next": self.now}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = state["next"]

    def __iter__(self):
        first = self.start if self.resume_at is None else self.resume_at
        self.resume_at = None
        for i in range(first, self.end):
            self.now = i + 1
            yield (*self.data[i], torch.initial_seed())  # the reading worker's seed


def split_by_rank_and_worker(worker_id: int) -> None:
    """torch's documented ``worker_init_fn``, the readers being (rank, worker); it notes in
    ``INITS`` whether ``worker_id`` and the dataset it sees are what torch says."""
    worker_info = get_worker_info()
    dataset = worker_info.dataset  # the dataset copy in this worker process
    overall_start, overall_end = dataset.start, dataset.end
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    readers = world * worker_info.num_workers
    per_reader = int(math.ceil((overall_end - overall_start) / float(readers)))  # noqa: RUF046
    reader = rank * worker_info.num_workers + worker_info.id
    dataset.start = overall_start + reader * per_reader
    dataset.end = min(dataset.start + per_reader, overall_end)
    ok = worker_id == worker_info.id and isinstance(dataset, RangeStream)
    with open(os.environ["INITS"], "a") as notes:
        notes.write("ok\n" if ok else f"{worker_id}/{worker_info.id}/{type(dataset)}\n")


class RangeJob(Regressor):
    """48 samples of ``RangeStream`` in batches of 2, 2 loader workers; ``batches`` lists
    ``[epoch, *samples]`` per trained batch, ``seeds`` the seeds of the workers."""

    def __init__(self, persistent: bool) -> None:
        super().__init__(n_train=48)
        self.persistent = persistent
        self.batches: list[list[int]] = []
        self.seeds: list[list[int]] = []  # per batch: the seeds of the workers that read it

    def training_step(self, batch, batch_idx):
        self.batches.append([self.current_epoch, *batch[2].tolist()])
        self.seeds.append(batch[3].tolist())
        return super().training_step(batch[:3], batch_idx)

    def train_dataloader(self):
        return DataLoader(
            RangeStream(0, self.n_train),
            batch_size=2,
            num_workers=2,
            worker_init_fn=split_by_rank_and_worker,
            persistent_workers=self.persistent,
        )


def test_a_worker_init_fn_sets_up_the_users_own_map_dataset(tmp_path):
    """A map-style dataset read by 2 workers through a file handle its ``worker_init_fn``
    opens on ``get_worker_info().dataset`` (debug mode: one process, real workers)."""
    run_alone(HERE, "handles", tmp_path, timeout=60)
    (result,) = read_results(tmp_path, 1)
    assert sorted(result["read"]) == [7 * i for i in range(16)]


class LinesOnDisk(Dataset):
    """Sample i: ``IndexedData``'s, with the number on line i of ``path`` (7 i) as its
    index, read through ``handle``, which ``open_handle`` opens in each worker."""

    def __init__(self, path: str, n: int) -> None:
        self.path, self.data = path, IndexedData(n)
        self.handle = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y, _ = self.data[i]
        self.handle.seek(8 * i)
        return x, y, int(self.handle.read(8))


def open_handle(worker_id: int) -> None:
    dataset = get_worker_info().dataset
    assert isinstance(dataset, LinesOnDisk), type(dataset)
    dataset.handle = open(dataset.path)  # noqa: SIM115 (open as long as the worker)


class ReadsLines(Regressor):
    """16 samples of ``LinesOnDisk``; ``read`` lists the numbers read."""

    def __init__(self, path: str) -> None:
        super().__init__(n_train=16, shuffle=True)
        self.path = path
        self.read: list[int] = []

    def training_step(self, batch, batch_idx):
        self.read.extend(batch[2].tolist())
        return super().training_step(batch, batch_idx)

    def train_dataloader(self):
        data = LinesOnDisk(self.path, self.n_train)
        return DataLoader(
            data, batch_size=2, shuffle=True, num_workers=2, worker_init_fn=open_handle
        )


# -- the user's loader options -------------------------------------------------------------
def test_rebuilt_loaders_keep_the_users_worker_options(tmp_path):
    """``persistent_workers`` and ``pin_memory`` as the user set them, also where a GPU
    would have had them forced (the training, evaluation and stream loaders)."""
    for persistent, pin in [(False, False), (True, False), (False, True)]:
        module = UserOptions(persistent, pin)
        run = SimpleNamespace(  # what sources reads
            seed=0, env=DistEnv(), datamodule=None, data_rank=0, data_world_size=1
        )
        built = [
            sources.train_loader_for(run, module),
            sources.eval_loader_for(run, module, "val_dataloader", "validation_step"),
        ]
        module.stream = True
        built.append(sources.train_loader_for(run, module))
        for loader in built:
            assert (loader.persistent_workers, loader.pin_memory) == (persistent, pin)
            assert (loader.prefetch_factor, loader.timeout) == (3, 7.0)


class UserOptions(Regressor):
    """Loaders with 2 workers, ``persistent_workers`` and ``pin_memory`` as given."""

    def __init__(self, persistent: bool, pin: bool, val_workers: int = 2) -> None:
        super().__init__(n_train=16)
        self.options = {
            "num_workers": 2,
            "persistent_workers": persistent,
            "pin_memory": pin,
            "prefetch_factor": 3,
            "timeout": 7.0,
        }
        self.val_workers, self.stream = val_workers, False
        self.alive_in_validation: list[int] = []

    def train_dataloader(self):
        if self.stream:
            return DataLoader(RangeStream(0, self.n_train), batch_size=2, **self.options)
        return DataLoader(IndexedData(self.n_train), batch_size=2, shuffle=True, **self.options)

    def val_dataloader(self):
        options = {**self.options, "num_workers": self.val_workers}
        if not self.val_workers:
            options = {"pin_memory": options["pin_memory"]}
        return DataLoader(IndexedData(self.n_val), batch_size=2, **options)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.alive_in_validation.append(len(multiprocessing.active_children()))
        return super().validation_step(batch, batch_idx)


class EpochOnly(Dataset):
    """Each sample is the epoch its worker's copy was last given."""

    def __init__(self) -> None:
        self.epoch = -1

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return self.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_the_epoch_reaches_a_map_datasets_persistent_workers():
    """Persistent workers, as the user set them, read each epoch with their copy's
    ``set_epoch`` called (2 real workers in this process)."""
    built = DataLoader(EpochOnly(), batch_size=2, num_workers=2, persistent_workers=True)
    loader = loaders.train_loader(built, 0, 1, 0, "M.train_dataloader()")
    assert loader.persistent_workers
    with ended(loader):
        for epoch in range(3):
            loaders.set_epoch(loader, epoch)
            with loaders.epoch_batches(loader, epoch, 0) as batches:
                assert {v for batch in batches for v in batch.tolist()} == {epoch}


def test_training_workers_are_not_kept_alive_through_validation_unless_persistent(tmp_path):
    """Counted from ``validation_step`` at world size 2 (the validation loader has no
    workers): the training loader's 2 workers are alive only if they are persistent."""
    run_beside(HERE, "alive_in_validation", tmp_path, timeout=120)
    for result in read_results(tmp_path, 2):
        assert result == {"False": [0, 0], "True": [2, 2]}


def _trainer(outdir: str | Path, **options) -> disttrain.Trainer:
    options.setdefault("timeout", COLLECTIVE_TIMEOUT)
    return disttrain.Trainer(
        default_root_dir=str(Path(outdir) / "run"), enable_progress_bar=False, **options
    )


# -- the scenarios -------------------------------------------------------------------------
def fails(outdir: str) -> None:
    """2 epochs of ``FailsWithWorkers`` (``BREAK``, ``PERSISTENT``); validation after the
    first epoch, no sanity check (or ``Trainer.validate`` first)."""
    module = FailsWithWorkers(os.environ["BREAK"], os.environ["PERSISTENT"] == "True")
    trainer = _trainer(outdir, max_epochs=2, num_sanity_val_steps=0)
    if module.where == "validate":
        trainer.validate(module)
    trainer.fit(module)


class ShuffledWithWorkers(Regressor):
    """24 training samples in batches of 4, shuffled, read by 2 loader workers."""

    def __init__(self) -> None:
        super().__init__(n_train=24, batch_size=4, shuffle=True)

    def train_dataloader(self):
        data = IndexedData(self.n_train)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, num_workers=2)

    def val_dataloader(self):
        return None


def stuck_fork(outdir: str) -> None:
    """Two fits of ``ShuffledWithWorkers`` from one seed: in the first, the process's first
    fork (a loader worker's) never returns from its at-fork hook; the second is unbroken."""
    from disttrain.data import workers

    workers._START_TIMEOUT = 1.0
    marker = Path(outdir) / "hung-fork"

    def stick_the_first_fork() -> None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        time.sleep(3600)

    os.register_at_fork(after_in_child=stick_the_first_fork)
    results = {}
    for name in ("stuck", "unbroken"):
        disttrain.seed_everything(0)
        module = ShuffledWithWorkers()
        _trainer(Path(outdir) / name, max_epochs=2, num_sanity_val_steps=0).fit(module)
        weights = [p.tolist() for p in module.parameters()]
        results[name] = {"seen": module.seen, "weights": weights}
    write_result(outdir, 0, results)


def leaks(outdir: str) -> None:
    """A training loader (2 workers, ``PERSISTENT``) read by a plain ``iter`` and left
    running by an error."""
    data = DataLoader(
        IndexedData(64),
        batch_size=2,
        shuffle=True,
        num_workers=2,
        persistent_workers=os.environ["PERSISTENT"] == "True",
    )
    batches = iter(loaders.train_loader(data, 0, 1, 0, "leaks"))
    next(batches)
    raise RuntimeError(f"left with workers running: {batches}")


def slow_starts(outdir: str) -> None:
    """Many epochs of 32 samples read by 2 loader workers, each of which takes a second to
    start once torch installed its SIGTERM handler (it touches ``MARKER`` then)."""
    install = signal_handling._set_worker_signal_handlers

    def slowly() -> None:  # runs in the worker, first thing in torch's worker loop
        install()
        Path(os.environ["MARKER"]).touch()
        time.sleep(1.0)

    signal_handling._set_worker_signal_handlers = slowly
    module = UserOptions(persistent=False, pin=False, val_workers=0)
    _trainer(outdir, max_epochs=100, num_sanity_val_steps=0).fit(module)


def batch_samplers(outdir: str) -> None:
    """3 epochs of ``OwnBatchSampler(CHAIN)``; writes the order of each epoch."""
    module = OwnBatchSampler(os.environ["CHAIN"])
    _trainer(outdir, max_epochs=3).fit(module)
    write_result(outdir, int(os.environ["RANK"]), module.trained)


def range_streams(outdir: str) -> None:
    """``RangeJob`` (``PERSISTENT``) for 2 epochs unbroken, then stopped after ``STOP``
    steps and resumed; writes each run's batches."""
    persistent = os.environ["PERSISTENT"] == "True"
    os.environ["INITS"] = str(Path(outdir) / "inits")  # for the workers
    runs = {}
    for name, options in [("unbroken", {}), ("stopped", {"max_steps": STOP}), ("resumed", {})]:
        module = RangeJob(persistent)
        directory = Path(outdir) / ("unbroken" if name == "unbroken" else "broken")
        resume = "auto" if name == "resumed" else None
        _trainer(directory, max_epochs=2, resume=resume, **options).fit(module)
        runs[name] = module.batches
        runs[f"{name} seeds"] = module.seeds
    write_result(outdir, int(os.environ["RANK"]), runs)


def handles(outdir: str) -> None:
    """One epoch of ``ReadsLines`` over a file of 16 lines, 7 i on line i."""
    path = Path(outdir) / "lines.txt"
    path.write_text("".join(f"{7 * i:07d}\n" for i in range(16)))
    module = ReadsLines(str(path))
    _trainer(outdir, max_epochs=1).fit(module)
    write_result(outdir, 0, {"read": module.read})


def alive_in_validation(outdir: str) -> None:
    """2 epochs of ``UserOptions`` without and with persistent training workers; writes the
    live child processes counted in each validation."""
    result = {}
    for persistent in (False, True):
        module = UserOptions(persistent, pin=False, val_workers=0)
        _trainer(Path(outdir) / str(persistent), max_epochs=2, num_sanity_val_steps=0).fit(module)
        result[str(persistent)] = module.alive_in_validation
    write_result(outdir, int(os.environ["RANK"]), result)


if __name__ == "__main__":
    from common import run_scenario

    torch.set_num_threads(1)
    run_scenario(globals())
