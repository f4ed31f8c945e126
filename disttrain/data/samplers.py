"""Samplers for a distributed run: every evaluation sample once, training resumable anywhere."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DistributedSampler, Sampler

data_log = logging.getLogger("disttrain.data")


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes indices ``r, r+n, r+2n, ...``: every sample exactly once.

    ``DistributedSampler`` pads the dataset to a multiple of the world size, so an evaluation
    would count some samples twice; this one does not, and ranks may get one batch more or
    less than others (evaluation runs no collective per batch, so that is safe).
    """

    def __init__(
        self, dataset_len: int, rank: int, world_size: int, contiguous: bool = False
    ) -> None:
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.contiguous = contiguous  # rank r a block of the dataset, ranks in dataset order

    def indices(self) -> range:
        """This rank's indices: strided, or with ``contiguous`` one block (the first
        ``dataset_len % world_size`` ranks one more): concatenated in rank order, the blocks
        are the dataset's order (``Trainer.predict``)."""
        if not self.contiguous:
            return range(self.rank, self.dataset_len, self.world_size)
        share, extra = divmod(self.dataset_len, self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return range(start, start + share + (self.rank < extra))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


class Resharded(NamedTuple):
    """An epoch a resumed run goes on with at another world size than its checkpoint's."""

    epoch: int
    rest: list[int]  # the epoch's order after ``before`` samples, padded to this world size
    before: int  # samples of the epoch's order that earlier runs trained
    first: int  # the batch index this run's first batch of the epoch has


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch part-way, after a resume (at the same
    world size: this rank's shard from ``skip``; at another: see ``reshard``)."""

    skip = 0  # samples of this epoch's shard already trained
    resharded: Resharded | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def reshard(self, epoch: int, consumed: int) -> Resharded:
        """Start ``epoch`` after the first ``consumed`` samples of its order (trained by the
        checkpoint's ranks, at any world size): the rest is split over this run's ranks as
        ``DistributedSampler`` splits a whole epoch, so each is trained exactly once."""
        self.resharded = Resharded(epoch, self._rest(epoch, consumed), consumed, first=0)
        return self.resharded

    def __iter__(self) -> Iterator[int]:
        if self.resharded is not None and self.resharded.epoch == self.epoch:
            return iter(self.resharded.rest[self.rank :: self.num_replicas])
        indices = super().__iter__()
        return itertools.islice(indices, self.skip, None) if self.skip else indices

    def __len__(self) -> int:
        if self.resharded is not None and self.resharded.epoch == self.epoch:
            return len(range(self.rank, len(self.resharded.rest), self.num_replicas))
        return self.num_samples - self.skip

    def _rest(self, epoch: int, consumed: int) -> list[int]:
        """``epoch``'s order after its first ``consumed`` samples, cut or padded (from its own
        start) to a multiple of the world size, as ``DistributedSampler`` does a whole one."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:  # DistributedSampler's permutation of the epoch
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        rest = order[consumed:]
        if self.drop_last:
            return rest[: len(rest) - len(rest) % self.num_replicas]
        pad = -len(rest) % self.num_replicas
        return rest + (rest * math.ceil(pad / max(1, len(rest))))[:pad]


def reshard(loader: Any, progress: Any, saved_world_size: int | None, world_size: int) -> int:
    """After a resume: the batch of ``progress.epoch`` to go on from. At the checkpoint's
    world size that is its ``next_batch`` (each rank's sampler skips its own shard's trained
    samples), unless the checkpoint's run had itself resharded the epoch. Otherwise a loader
    disttrain shards goes on with the rest of the epoch's samples, each trained once (how
    many were trained: ``progress.samples``, else ``next_batch`` batches of every rank); any
    other loader starts the epoch's remaining batch count afresh."""
    sampler = getattr(loader, "sampler", None)
    elsewhere = saved_world_size not in (None, world_size) or progress.samples is not None
    if progress.epoch_finished or not progress.next_batch or not elsewhere:
        return progress.next_batch
    if not isinstance(sampler, ResumableDistributedSampler):
        data_log.warning(
            "resuming epoch %d at world size %d (the checkpoint's: %d): this training loader "
            "is not one disttrain shards, so the samples of the rest of the epoch are not "
            "known; training goes on from batch %d of each rank's new share",
            progress.epoch,
            world_size,
            saved_world_size,
            progress.next_batch,
        )
        return progress.next_batch
    consumed = progress.samples
    if consumed is None:  # the checkpoint's run had the whole epoch: as many batches a rank
        consumed = progress.next_batch * loader.batch_size * saved_world_size
    sampler.set_epoch(progress.epoch)
    full = len(loader)
    resharded = sampler.reshard(progress.epoch, consumed)
    first = full - len(loader)  # this run's batches of the epoch are numbered on from here
    sampler.resharded = resharded._replace(first=first)
    data_log.info(
        "epoch %d goes on at world size %d: its remaining %d samples split over the ranks",
        progress.epoch,
        world_size,
        len(resharded.rest),
    )
    return first


def sample_counter(loader: Any) -> Callable[[int, int], int | None]:
    """For checkpoints: ``count(epoch, next_batch)``, how many samples of ``epoch``'s order
    every rank together trained before batch ``next_batch``, where this run resharded the
    epoch (a batch index cannot say it then); None where the checkpoint's ``next_batch`` and
    world size say it. It holds the sampler, never the loader: a loader's persistent workers
    must end with the fit, not live on with whatever keeps the counter."""
    sampler, batch_size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)

    def count(epoch: int, next_batch: int) -> int | None:
        resharded = getattr(sampler, "resharded", None)
        if not isinstance(resharded, Resharded) or resharded.epoch != epoch or not batch_size:
            return None
        per_batch = batch_size * sampler.num_replicas  # type: ignore[union-attr]
        done = resharded.before + (next_batch - resharded.first) * per_batch
        return min(done, len(sampler.dataset))  # type: ignore[union-attr]  # padding: no more

    return count
