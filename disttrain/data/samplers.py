"""Samplers for a distributed run: every evaluation sample once, training resumable anywhere."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

data_log = logging.getLogger("disttrain.data")


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes indices ``r, r+n, r+2n, ...``: every sample exactly once.

    ``DistributedSampler`` pads the dataset to a multiple of the world size, so an evaluation
    would count some samples twice; this one does not, and ranks may get one batch more or
    less than others (evaluation runs no collective per batch, so that is safe).
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch part-way, after a resume (at the same
    world size: this rank's shard from ``skip``; at another: see ``reshard``)."""

    skip = 0  # samples of this epoch's shard already trained
    resharded: tuple[int, list[int]] | None = None  # (epoch, what is left of its order)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def reshard(self, epoch: int, consumed: int) -> None:
        """Start ``epoch`` after the first ``consumed`` samples of its order (trained by the
        checkpoint's ranks, at any world size): the rest is split over this run's ranks as
        ``DistributedSampler`` splits a whole epoch, so each is trained exactly once."""
        self.resharded = (epoch, self._rest(epoch, consumed))

    def __iter__(self) -> Iterator[int]:
        if self.resharded is not None and self.resharded[0] == self.epoch:
            return iter(self.resharded[1][self.rank :: self.num_replicas])
        indices = super().__iter__()
        return itertools.islice(indices, self.skip, None) if self.skip else indices

    def __len__(self) -> int:
        if self.resharded is not None and self.resharded[0] == self.epoch:
            return len(range(self.rank, len(self.resharded[1]), self.num_replicas))
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


def reshard(loader: Any, progress: Any, saved_world_size: int, world_size: int) -> int:
    """After a resume at another world size: the batch of ``progress.epoch`` to go on from
    at this one. A loader disttrain shards goes on with the rest of the epoch's samples,
    each trained once; any other starts the epoch's remaining batch count afresh."""
    sampler = getattr(loader, "sampler", None)
    if progress.epoch_finished or not progress.next_batch:
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
    consumed = progress.next_batch * loader.batch_size * saved_world_size
    sampler.set_epoch(progress.epoch)
    full = len(loader)
    sampler.reshard(progress.epoch, consumed)
    data_log.info(
        "epoch %d goes on at world size %d: its remaining %d samples split over the ranks",
        progress.epoch,
        world_size,
        len(sampler.resharded[1]) if sampler.resharded else 0,
    )
    return full - len(loader)
