"""Dataloaders as a distributed run needs them: sharded training data, exact evaluation data."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from disttrain.data.positions import (
    StatefulStream,
    has_state,
    opened,
    resumed_epoch_loader,
    stateful_loader,
)
from disttrain.data.sample_seeds import SeededSamples
from disttrain.data.samplers import ResumableDistributedSampler, UnpaddedDistributedSampler
from disttrain.data.streams import ShardedStream, shards_itself
from disttrain.data.workers import WorkerInit, reading, rebuilt, worker_start

data_log = logging.getLogger("disttrain.data")


def set_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch(epoch)`` on every sampler of ``loader``'s chain that has one (a user's
    ``BatchSampler(DistributedSampler(...))`` included) and on its dataset (a stream's shard
    order, ``streams.py``): before ``on_epoch_start``, which may read them."""
    for chained in sampling_chain(loader):
        if callable(getattr(chained, "set_epoch", None)):
            chained.set_epoch(epoch)
    dataset: Any = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


@contextlib.contextmanager
def epoch_batches(loader: Any, epoch: int, first_batch: int) -> Iterator[Iterator[Any]]:
    """Start ``epoch`` of ``loader`` (after ``set_epoch``) at batch ``first_batch``: the same
    order, nothing repeated. The batches are read in a ``with`` block, whose end shuts the
    loader's workers down (``workers.reading``).

    Samplers disttrain built skip without loading anything; other loaders load and drop the
    batches already trained.
    """
    sampler: Any = getattr(loader, "sampler", None)
    dataset: Any = getattr(loader, "dataset", None)
    dropped, source = first_batch, loader  # batches read again and dropped; what reads
    if first_batch and isinstance(sampler, ResumableDistributedSampler):
        if sampler.resharded is None or sampler.resharded.epoch != epoch:
            sampler.skip = first_batch * loader.batch_size
        dropped = 0
    elif isinstance(dataset, StatefulStream):
        plan = dataset.plan
        if first_batch and plan is not None and plan.epoch == epoch:  # states go on
            dropped, source = 0, resumed_epoch_loader(loader)
    elif first_batch and isinstance(dataset, IterableDataset) and _first("replay", dataset):
        data_log.warning(
            "resuming in the middle of epoch %d: %s has no state_dict/load_state_dict, so the "
            "epoch's first %d batches are read again and dropped. The run goes on as the "
            "unbroken one only if the stream yields the same batches each time it is read "
            "(random draws in its loader workers come out differently); give it "
            "state_dict/load_state_dict for an exact resume.",
            epoch,
            type(dataset).__name__,
            first_batch,
        )
    with reading(source, opened) as batches:
        if dropped:
            batches = itertools.islice(batches, dropped, None)
        yield _unpacked(dataset, batches, epoch, first_batch)


def _unpacked(dataset: Any, batches: Iterator[Any], epoch: int, first: int) -> Iterator[Any]:
    """The batches of a ``StatefulStream`` out of their envelopes (their positions recorded
    where fit tracks them); other loaders' batches as they are."""
    if not isinstance(dataset, StatefulStream):
        return batches
    if dataset.positions is None:  # read outside fit: nothing to record
        return (envelope.batch for envelope in batches)
    return dataset.positions.batches(batches, epoch, first)


def train_loader(loader: Any, rank: int, world_size: int, seed: int, where: str) -> Any:
    """``loader`` with its sampler replaced by a ``DistributedSampler`` (same shuffle). The
    user's options (``num_workers``, ``persistent_workers``, ``pin_memory``, ...) are kept."""
    sampler = getattr(loader, "sampler", None)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, ShardedStream):
        dataset.set_seed(seed)
    if not _is_plain_loader(loader) or isinstance(sampler, DistributedSampler):
        loader = _checked_custom(loader, world_size, where)
        if has_state(dataset):  # its epoch reaches persistent workers (positions.py)
            return stateful_loader(loader)
        _check_epoch_reaches_workers(loader, dataset, where)
        return loader
    shuffle = isinstance(sampler, RandomSampler)
    new_sampler = ResumableDistributedSampler(
        loader.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=loader.drop_last,
    )
    # each sample's draws from (seed, epoch, index), and its epoch in every worker (in the
    # main process, apart from the rank's own draws): sample_seeds.py
    dataset = SeededSamples(dataset, seed)
    return rebuilt(loader, dataset=dataset, sampler=new_sampler)


def eval_loader(loader: Any, rank: int, world_size: int, where: str) -> Any:
    """``loader`` sharded without padding, in order: each sample evaluated exactly once. The
    user's options are kept."""
    if loader is None:
        return None
    if not _is_plain_loader(loader) or isinstance(loader.sampler, DistributedSampler):
        return _checked_custom(loader, world_size, where)
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError(
            f"{where}: evaluation loaders must not shuffle (got {type(loader.sampler).__name__});"
            " disttrain shards them in order so that each sample is evaluated exactly once"
        )
    sampler = UnpaddedDistributedSampler(len(loader.dataset), rank, world_size)
    return rebuilt(loader, sampler=sampler)


def predict_loader(loader: Any, rank: int, world_size: int, where: str) -> Any:
    """``loader`` for ``Trainer.predict``: each rank one block of the dataset, in order,
    without padding and without ``drop_last``, so every sample is predicted exactly once and
    the ranks' predictions, concatenated in rank order, are in dataset order. Only a loader
    disttrain can shard so (a map-style dataset, a batch size, a sequential sampler): the
    dataset index of every prediction is then known. The user's other options are kept."""
    if not _is_plain_loader(loader) or not isinstance(loader.sampler, SequentialSampler):
        sampler = getattr(loader, "sampler", None)
        raise ValueError(
            f"{where}: predict needs a DataLoader over a map-style dataset with a batch_size "
            f"that must not shuffle (got {type(loader).__name__} with "
            f"{type(sampler).__name__ if sampler is not None else 'no sampler'}); disttrain "
            "shards it in blocks so that each sample is predicted exactly once and the "
            "predictions come back in dataset order"
        )
    sampler = UnpaddedDistributedSampler(len(loader.dataset), rank, world_size, contiguous=True)
    return rebuilt(loader, sampler=sampler, drop_last=False)


def batch_indices(first: int, limit: int | float) -> Iterator[int]:
    """``first``, ``first + 1``, ... up to ``limit`` (without end for a loader of no length)."""
    return itertools.count(first) if limit == math.inf else iter(range(first, int(limit)))


def limit_batches(loader: Any, limit: int | float, option: str) -> int | float:
    """How many batches of ``loader`` to run: an int counts, a float is a fraction."""
    try:
        total = len(loader)
    except TypeError:
        if isinstance(limit, float):
            if limit == 1.0:
                return math.inf  # as long as the loader gives batches
            raise ValueError(
                f"{option}={limit} is a fraction, but the dataloader has no length; "
                "give a batch count (an int)"
            ) from None
        return limit
    if isinstance(limit, float):
        return int(total * limit)
    return min(total, limit)


def _is_plain_loader(loader: Any) -> bool:
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None  # not a custom batch_sampler
    )


def _checked_custom(loader: Any, world_size: int, where: str) -> Any:
    """Loaders disttrain cannot shard itself pass through if they shard themselves; an
    ``IterableDataset`` that does not say so passes with a warning (once per class). Their
    workers, too, ignore SIGINT and SIGTERM (``WorkerInit``)."""
    dataset = getattr(loader, "dataset", None)
    if getattr(loader, "num_workers", 0) > 0 and not isinstance(loader.worker_init_fn, WorkerInit):
        # a signal stops the rank; a worker stuck in its fork is forked again
        start = worker_start(
            loader.worker_init_fn, loader.multiprocessing_context, loader.num_workers
        )
        for option, value in start.items():
            setattr(loader, option, value)
    if isinstance(dataset, IterableDataset):
        _check_stream(loader, dataset, world_size, where)
        return loader
    if world_size > 1 and not _distributed_like(loader):
        sampler = getattr(loader, "sampler", None)
        raise ValueError(
            f"{where}: disttrain shards DataLoaders built with a batch_size and a sequential or "
            f"random sampler; this one ({type(loader).__name__} with "
            f"{type(sampler).__name__ if sampler is not None else 'no sampler'}) would give every "
            "rank the same data. Use such a loader, or shard the data yourself with a "
            "DistributedSampler."
        )
    return loader


def _distributed_like(loader: Any) -> bool:
    """A sampler or batch sampler that takes a rank's share (a DistributedSampler, or one
    with its ``num_replicas`` and ``rank``), or one wrapping such a sampler."""
    return any(
        isinstance(c, (DistributedSampler, UnpaddedDistributedSampler))
        or (hasattr(c, "num_replicas") and hasattr(c, "rank"))
        for c in sampling_chain(loader)
    )


def sampling_chain(loader: Any) -> list[Any]:
    """Every sampler that decides ``loader``'s order, each once: its ``sampler`` and
    ``batch_sampler``, and the ``sampler`` each of them wraps, down the chain (a
    ``BatchSampler`` over a user's sampler over a ``DistributedSampler``)."""
    chain: list[Any] = []
    todo = [getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)]
    while todo:
        sampler = todo.pop(0)
        if sampler is None or any(sampler is seen for seen in chain):
            continue
        chain.append(sampler)
        todo.append(getattr(sampler, "sampler", None))
    return chain


_warned: set[tuple[str, type]] = set()  # (warning, IterableDataset class) already given


def _check_stream(loader: Any, dataset: IterableDataset, world_size: int, where: str) -> None:
    """Say what an ``IterableDataset`` loader will do: see ``disttrain/data/streams.py``."""
    name = type(dataset).__name__
    if isinstance(dataset, ShardedStream):
        dataset.warn_if_few_shards(world_size * max(1, getattr(loader, "num_workers", 0)))
    elif world_size > 1 and not shards_itself(dataset) and _first("unsharded", dataset):
        data_log.warning(
            "%s: %s is an IterableDataset that does not say it shards itself: at world size "
            "%d every rank may read the same data. Derive it from "
            "disttrain.ShardedStream, or read only this rank's and worker's share "
            "(disttrain.data.streams.reader_position() reads RANK, WORLD_SIZE and the loader "
            "worker) and set the class attribute shards_by_rank = True.",
            where,
            name,
            world_size,
        )


def _first(warning: str, dataset: Any) -> bool:
    """Whether ``warning`` is new for ``dataset``'s class in this process (and now given)."""
    key = (warning, type(dataset))
    new = key not in _warned
    _warned.add(key)
    return new


def _check_epoch_reaches_workers(loader: Any, dataset: Any, where: str) -> None:
    """Say it (once per class) where ``set_epoch`` cannot reach a loader's persistent
    workers: a loader disttrain passes on as it is, whose dataset keeps its epoch in the
    worker's own copy (``ShardedStream`` shares its epoch; the loaders disttrain rebuilds
    give the epoch to each worker themselves)."""
    if (
        hasattr(dataset, "set_epoch")
        and getattr(loader, "persistent_workers", False)
        and not isinstance(dataset, ShardedStream)
        and _first("persistent", dataset)
    ):
        data_log.warning(
            "%s: %s has set_epoch, but its loader keeps persistent_workers: the trainer "
            "calls set_epoch in the main process and the workers keep the copy they started "
            "with. Build the loader with persistent_workers=False, or keep the epoch in "
            "shared memory as disttrain.ShardedStream does.",
            where,
            type(dataset).__name__,
        )
