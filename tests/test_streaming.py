"""Streaming datasets at any world size (``disttrain/data/streams.py``): each sample read by
exactly one (rank, loader worker) per pass, shard order reshuffled per epoch alike on every
rank, plain IterableDatasets accepted with one warning, and limits on streams of no length.

The torchrun tests, in the last section, each run the scenario function written above it
on their ranks (``conftest.run_beside``)."""

from __future__ import annotations

import io
import logging
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from common import Regressor, read_results, run_scenario, write_result
from conftest import run_beside
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from disttrain import Trainer
from disttrain.callbacks.progress import ProgressBar
from disttrain.data import loaders
from disttrain.data.loaders import batch_indices, limit_batches, train_loader
from disttrain.data.positions import StatefulStream
from disttrain.data.streams import ShardedStream
from disttrain.observe.console import configure_logging


def _shard(shard):
    return range(shard * 100, shard * 100 + 3 + shard % 4)


@pytest.fixture
def data_warnings():
    """What ``disttrain.data`` warns (its parent logger may not propagate to caplog)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("disttrain.data")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# -- the split, in one process -------------------------------------------------------------
def _read_as_rank(stream, rank, world_size, monkeypatch):
    """What ``stream`` yields in a process that torchrun started as ``rank`` of
    ``world_size`` (no loader workers: each rank is one reader)."""
    torchrun_env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size}
    for key, value in {**torchrun_env, "MASTER_ADDR": "localhost", "MASTER_PORT": 1}.items():
        monkeypatch.setenv(key, str(value))
    return list(stream)


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 7, 12])
@pytest.mark.parametrize("readers", [1, 2, 3, 4, 6])
def test_every_sample_is_read_by_exactly_one_reader(n_shards, readers, monkeypatch):
    stream = ShardedStream(list(range(n_shards)), _shard, seed=4)
    stream.set_epoch(2)
    order = stream.shard_order(epoch=2)
    read = [_read_as_rank(stream, r, readers, monkeypatch) for r in range(readers)]
    everything = [s for shard in range(n_shards) for s in _shard(shard)]
    assert Counter(s for share in read for s in share) == Counter(everything)
    if n_shards >= readers:  # whole shards, in the epoch's order
        for r in range(readers):
            assert read[r] == [s for i in order[r::readers] for s in _shard(i)]


def test_shard_order_is_a_permutation_per_epoch_from_the_seed():
    stream = ShardedStream(list(range(12)), _shard)
    stream.set_seed(5)
    orders = [stream.shard_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert ShardedStream(list(range(12)), _shard, seed=5).shard_order(1) == orders[1]
    own = ShardedStream(list(range(12)), _shard, seed=6)
    own.set_seed(5)  # the run's seed does not override a seed given by the user
    assert own.seed == 6
    assert ShardedStream(list(range(4)), _shard, shuffle_shards=False).shard_order(3) == [
        0,
        1,
        2,
        3,
    ]


def test_shuffle_buffer_reorders_each_epoch_and_keeps_every_sample():
    stream = ShardedStream(list(range(4)), _shard, shuffle_shards=False, shuffle_buffer=5)
    plain = [s for shard in range(4) for s in _shard(shard)]
    passes = []
    for epoch in (0, 0, 1):
        stream.set_epoch(epoch)
        passes.append(list(stream))
    assert passes[0] == passes[1] != passes[2]
    assert sorted(passes[0]) == sorted(passes[2]) == plain != passes[0]


def test_a_stream_needs_a_reader_and_shards():
    with pytest.raises(TypeError, match="read_shard"):
        ShardedStream([1, 2])
    with pytest.raises(ValueError, match="no shards"):
        ShardedStream([], _shard)

    class Own(ShardedStream):
        def read_shard(self, shard):
            return iter([shard])

    assert sorted(Own([3, 1, 2])) == [1, 2, 3]


# -- what the trainer accepts at world size 2 ----------------------------------------------
def test_loaders_that_shard_themselves_are_accepted_silently(data_warnings):
    class Declared(IterableDataset):
        shards_by_rank = True

        def __iter__(self):
            return iter(range(4))

    loader = DataLoader(Declared(), batch_size=2)
    assert train_loader(loader, 1, 2, 0, "M.train_dataloader()") is loader
    stream = ShardedStream(list(range(8)), _shard)  # it has state: read with its position
    got = train_loader(DataLoader(stream, batch_size=2), 1, 2, 0, "M.train_dataloader()")
    assert isinstance(got.dataset, StatefulStream) and got.dataset.dataset is stream
    sampler = DistributedSampler(range(8), num_replicas=2, rank=1)
    batched = DataLoader(range(8), batch_sampler=BatchSampler(sampler, 2, False))
    assert train_loader(batched, 1, 2, 0, "M") is batched
    assert data_warnings == []


def test_a_plain_iterable_dataset_is_accepted_with_one_warning(data_warnings):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    for where in ("M.train_dataloader()", "M.val_dataloader()"):
        loader = DataLoader(Stream(), batch_size=2)
        assert train_loader(loader, 0, 2, 0, where) is loader
    assert len(data_warnings) == 1
    assert "every rank may read the same data" in data_warnings[0]
    assert "shards_by_rank = True" in data_warnings[0] and "ShardedStream" in data_warnings[0]
    loader = DataLoader(Stream(), batch_size=2)
    assert train_loader(loader, 0, 1, 0, "M") is loader


def test_other_custom_batch_samplers_are_still_refused_at_world_size_two():
    loader = DataLoader(range(8), batch_sampler=BatchSampler(range(8), 2, False))
    with pytest.raises(ValueError, match="would give every rank the same data"):
        train_loader(loader, 0, 2, 0, "M.train_dataloader()")
    assert train_loader(loader, 0, 1, 0, "M") is loader


def test_the_epoch_reaches_workers_of_a_map_dataset_with_set_epoch():
    class Epochs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

        def set_epoch(self, epoch):
            pass

    loader = DataLoader(Epochs(), batch_size=2, num_workers=1)
    assert not train_loader(loader, 0, 1, 0, "M").persistent_workers


def test_an_epoch_that_cannot_reach_persistent_workers_is_warned_about(data_warnings):
    class Epochs(IterableDataset):
        def __iter__(self):
            return iter(range(4))

        def set_epoch(self, epoch):
            pass

    loader = DataLoader(Epochs(), batch_size=2, num_workers=1, persistent_workers=True)
    assert train_loader(loader, 0, 1, 0, "M") is loader
    assert len(data_warnings) == 1 and "persistent_workers=False" in data_warnings[0]
    stream = ShardedStream(list(range(4)), _shard)  # shares its epoch with the workers
    train_loader(DataLoader(stream, num_workers=1, persistent_workers=True), 0, 1, 0, "M")
    assert len(data_warnings) == 1


def test_fewer_shards_than_readers_warn_once(data_warnings):
    stream = ShardedStream([0, 1], _shard)
    loader = DataLoader(stream, batch_size=2, num_workers=2)
    for _ in range(2):
        train_loader(loader, 0, 2, 0, "M")
    list(stream)
    assert len(data_warnings) == 1 and "2 shards for 4 readers" in data_warnings[0]


# -- no length -----------------------------------------------------------------------------
def test_limits_and_progress_without_a_length():
    loader = DataLoader(ShardedStream(list(range(3)), _shard), batch_size=2)
    assert limit_batches(loader, 1.0, "limit_train_batches") == math.inf
    assert limit_batches(loader, 4, "limit_train_batches") == 4
    with pytest.raises(ValueError, match="give a batch count"):
        limit_batches(loader, 0.5, "limit_train_batches")
    assert list(zip(batch_indices(2, math.inf), "abc")) == [(2, "a"), (3, "b"), (4, "c")]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    class Run:
        num_training_batches, current_epoch, global_step, at_step_boundary = math.inf, 0, 0, True

        def progress_bar_metrics(self):
            return {"train_loss": 0.5}

    bar, run = ProgressBar(every_n_steps=1, stream=Tty()), Run()
    bar.on_epoch_start(run, None)
    assert bar.bar is not None and bar.bar.total is None
    for _ in range(3):
        run.global_step += 1
        bar.on_batch_end(run, None)
    assert bar.bar.n == 3
    bar.on_epoch_end(run, None)


# -- real torchrun processes ---------------------------------------------------------------
def _stream_sample(shard, k):
    """Sample ``k`` of ``shard`` (an (id, size) pair): (x, y, sample id, loader worker)."""
    sid = shard[0] * 100 + k
    x = torch.tensor([sid % 7, sid % 5, sid % 3, 1.0]) / 7
    worker = torch.utils.data.get_worker_info()
    return x, x.sum(), sid, -1 if worker is None else worker.id


def read_stream_shard(shard):
    return (_stream_sample(shard, k) for k in range(shard[1]))


def _stream_loader(shards, workers, shuffle_buffer=0, batch_size=2):
    stream = ShardedStream(shards, read_stream_shard, shuffle_buffer=shuffle_buffer)
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )


def stream_counts(outdir):
    """Without a trainer: the trainer's loader preparation and epoch start, then every
    (sample, worker) this rank reads in epochs 0 and 1, for many shards and for fewer shards
    than readers, with 0 and 2 loader workers (persistent: the epoch must reach them)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    configure_logging(rank)
    result = {}
    for workers in (0, 2):
        readers = world * max(1, workers)
        few = max(1, readers - 2)
        for kind, shards, buffer in (
            ("many", [(s, 3 + s % 3) for s in range(12)], 0),
            ("few", [(s, 5 + s) for s in range(few)], 3),
        ):
            loader = _stream_loader(shards, workers, buffer)
            loader = loaders.train_loader(loader, rank, world, 7, "S")
            for epoch in (0, 1):
                read = []
                loaders.set_epoch(loader, epoch)
                with loaders.epoch_batches(loader, epoch, 0) as batches:
                    for _, _, sid, worker in batches:
                        read += zip(sid.tolist(), worker.tolist())
                result[f"{kind}/{workers}/{epoch}"] = {
                    "read": read,
                    "order": loader.dataset.shard_order(epoch),
                    "sizes": [size for _, size in shards],
                }
    write_result(outdir, rank, result)


def _readers(results, key, world, workers):
    """{reader: [sample, ...]} in reading order, for one configuration of stream_counts."""
    per_reader: dict[int, list[int]] = {}
    for rank, result in enumerate(results):
        for sample, worker in result[key]["read"]:
            assert (worker == -1) == (workers == 0)
            per_reader.setdefault(rank * max(1, workers) + max(worker, 0), []).append(sample)
    return per_reader


def _in_order(samples, kind):
    return samples if kind == "many" else sorted(samples)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_sample_read_once_per_rank_and_worker_on_torchrun(tmp_path, world):
    outdir = tmp_path / "out"
    proc = run_beside(__file__, "stream_counts", outdir, nproc=world, timeout=120)
    results = read_results(outdir, world)
    warned = 0
    for workers in (0, 2):
        readers = world * max(1, workers)
        for kind in ("many", "few"):
            orders = []
            for epoch in (0, 1):
                key = f"{kind}/{workers}/{epoch}"
                order, sizes = results[0][key]["order"], results[0][key]["sizes"]
                assert all(r[key]["order"] == order for r in results), key  # same on every rank
                orders.append(order)
                shards = {i: [i * 100 + k for k in range(n)] for i, n in enumerate(sizes)}
                got = _readers(results, key, world, workers)
                everything = sorted(s for samples in shards.values() for s in samples)
                assert sorted(s for share in got.values() for s in share) == everything, key
                n = len(order)
                for reader in range(readers):
                    if n >= readers:  # whole shards, in the epoch's order
                        expected = [s for i in order[reader::readers] for s in shards[i]]
                        if kind == "few":  # through a shuffle buffer
                            expected = sorted(expected)
                        assert _in_order(got.get(reader, []), kind) == expected, (key, reader)
                    else:  # shared shards: every k-th sample (through a shuffle buffer)
                        group = len(range(reader % n, readers, n))
                        mine = shards[order[reader % n]][reader // n :: group]
                        assert sorted(got.get(reader, [])) == mine, (key, reader)
            if kind == "many":
                assert orders[0] != orders[1]
            warned += len(sizes) < readers
    assert proc.stdout.count("readers share shards") == warned  # once per stream, rank 0


class StreamRegressor(Regressor):
    """Trains from a ShardedStream of 8 shards of 4 samples, 2 loader workers."""

    def __init__(self, shards=8):
        super().__init__(batch_size=2)
        self.shards = [(s, 4) for s in range(shards)]
        self.per_epoch: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, sid, _ = batch
        self.per_epoch.setdefault(self.current_epoch, []).extend(sid.tolist())
        return torch.nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return _stream_loader(self.shards, workers=2)


def stream_limits(outdir):
    """Whole epochs of a stream, then limit_train_batches=3 and max_steps=10 on a stream
    without a length: every rank's steps and samples per epoch."""
    result = {}
    for name, options in {
        "full": {"max_epochs": 2},
        "limit": {"max_epochs": 2, "limit_train_batches": 3},
        "max_steps": {"max_epochs": 3, "max_steps": 10},
    }.items():
        module = StreamRegressor()
        trainer = Trainer(
            num_sanity_val_steps=0,
            limit_val_batches=0,
            enable_checkpointing=False,
            default_root_dir=str(Path(outdir) / name),
            seed=3,
            **options,
        )
        trainer.fit(module)
        result[name] = {
            "steps": trainer.global_step,
            "per_epoch": module.per_epoch,
            "num_training_batches": str(trainer.num_training_batches),
        }
    write_result(outdir, int(os.environ["RANK"]), result)


def test_a_stream_trains_and_stops_at_limits_on_every_rank(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "stream_limits", outdir, nproc=2, timeout=150)
    results = read_results(outdir, 2)
    full = [r["full"] for r in results]
    for epoch in ("0", "1"):  # 8 shards of 4 samples over 2 ranks x 2 workers
        assert sorted(full[0]["per_epoch"][epoch] + full[1]["per_epoch"][epoch]) == [
            s * 100 + k for s in range(8) for k in range(4)
        ]
    assert full[0]["per_epoch"]["0"] != full[0]["per_epoch"]["1"]  # a new shard order
    for result in results:
        assert result["full"]["steps"] == 16 and result["full"]["num_training_batches"] == "inf"
        limited = result["limit"]
        assert limited["steps"] == 6 and limited["num_training_batches"] == "3"
        assert [len(limited["per_epoch"][e]) for e in ("0", "1")] == [6, 6]  # 3 batches of 2
        assert result["max_steps"]["steps"] == 10
        assert [len(v) for v in result["max_steps"]["per_epoch"].values()] == [16, 4]


class PlainStream(torch.utils.data.IterableDataset):
    """An IterableDataset that does not shard: every rank reads all 8 samples."""

    def __iter__(self):
        return (_stream_sample((0, 8), k)[:3] for k in range(8))


class PlainStreamRegressor(Regressor):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(PlainStream(), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(PlainStream(), batch_size=2)


def plain_stream(outdir):
    """A plain IterableDataset at world size 2, for training and validation: it trains."""
    module = PlainStreamRegressor()
    trainer = Trainer(max_epochs=2, num_sanity_val_steps=1, enable_checkpointing=False)
    trainer.fit(module)
    write_result(outdir, trainer.global_rank, {"steps": trainer.global_step, "seen": module.seen})


def test_a_plain_iterable_dataset_trains_at_world_size_two_with_one_warning(tmp_path):
    outdir = tmp_path / "out"
    proc = run_beside(__file__, "plain_stream", outdir, nproc=2, timeout=120)
    assert proc.stdout.count("every rank may read the same data") == 1, proc.stdout[-3000:]
    for result in read_results(outdir, 2):
        assert result["steps"] == 8
        assert sorted(result["seen"]) == sorted(list(range(8)) * 2)


if __name__ == "__main__":
    run_scenario(globals())
