"""Streaming datasets at any world size (``disttrain/data/streams.py``): each sample read by
exactly one (rank, loader worker) per pass, shard order reshuffled per epoch alike on every
rank, plain IterableDatasets accepted with one warning, and limits on streams of no length."""

from __future__ import annotations

import io
import logging
import math
from collections import Counter

import pytest
import torch
from common import read_results
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from disttrain.callbacks.progress import ProgressBar
from disttrain.data.loaders import batch_indices, limit_batches, train_loader
from disttrain.data.positions import StatefulStream
from disttrain.data.streams import ShardedStream


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
@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 7, 12])
@pytest.mark.parametrize("readers", [1, 2, 3, 4, 6])
def test_every_sample_is_read_by_exactly_one_reader(n_shards, readers):
    stream = ShardedStream(list(range(n_shards)), _shard, seed=4)
    order = stream.shard_order(epoch=2)
    read = [list(stream._own_samples(order, r, readers, False)) for r in range(readers)]
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


# -- what the trainer accepts at world size 2 --------------------------------------------
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


# -- no length ------------------------------------------------------------------------------
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


# -- real torchrun processes ------------------------------------------------------------
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
def test_each_sample_read_once_per_rank_and_worker_on_torchrun(scenario, world):
    proc, outdir = scenario("stream_counts", nproc=world, timeout=120)
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


def test_a_stream_trains_and_stops_at_limits_on_every_rank(scenario):
    _, outdir = scenario("stream_limits", nproc=2, timeout=150)
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


def test_a_plain_iterable_dataset_trains_at_world_size_two_with_one_warning(scenario):
    proc, outdir = scenario("plain_stream", nproc=2, timeout=120)
    assert proc.stdout.count("every rank may read the same data") == 1, proc.stdout[-3000:]
    for result in read_results(outdir, 2):
        assert result["steps"] == 8
        assert sorted(result["seen"]) == sorted(list(range(8)) * 2)
