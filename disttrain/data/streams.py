"""Streaming data at any world size: an ``IterableDataset`` that reads its own share.

The contract, for any ``IterableDataset`` a training loader reads at world size > 1:

- **Who am I.** The rank and world size come from torchrun's environment (``RANK``,
  ``WORLD_SIZE``: ``DistEnv.from_environ()``), or under tensor parallelism the data-parallel
  rank and size the trainer publishes (the ``tp`` ranks of a data group read one share:
  ``disttrain.dist.env.data_place``), the loader worker from
  ``torch.utils.data.get_worker_info()`` (``None`` with ``num_workers=0``: one worker, id 0).
  Together they name one of ``world_size * num_workers`` *readers*:
  ``reader = rank * num_workers + worker_id``.
- **Which epoch.** Before each epoch the trainer calls ``dataset.set_epoch(epoch)`` if the
  dataset has that method (in the main process: see ``ShardedStream.set_epoch`` for how the
  epoch reaches the loader workers).
- **Say that you shard.** A dataset that reads only its reader's share derives from
  ``ShardedStream`` or sets the class attribute ``shards_by_rank = True``; the trainer then
  accepts it silently. Any other ``IterableDataset`` is accepted with one warning, since every
  rank may read the same data.

``ShardedStream`` implements the contract for a list of shards (file paths or any objects) and
a ``read_shard(shard)`` that yields a shard's samples: every sample of a pass is read by
exactly one reader.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from disttrain.dist.env import data_place
from disttrain.rng import rng_state, sample_seed, seed_draws, set_rng_state

log = logging.getLogger("disttrain.data")


def reader_position() -> tuple[int, int]:
    """``(reader, readers)``: this process's reader index ``rank * num_workers + worker_id``
    among ``world_size * num_workers``, read from torchrun's environment (the data rank and
    size under tensor parallelism) and the loader worker this runs in (``num_workers=0``
    counts as one worker)."""
    rank, world_size = data_place()
    worker = get_worker_info()
    workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
    return rank * workers + worker_id, world_size * workers


def shards_itself(dataset: Any) -> bool:
    """Whether ``dataset`` says it reads only its reader's share."""
    return isinstance(dataset, ShardedStream) or getattr(dataset, "shards_by_rank", False) is True


class ShardedStream(IterableDataset):
    """Reads the shards of this rank and loader worker, in a per-epoch order.

    - **Split.** The shard order of an epoch is a permutation drawn from ``(seed, epoch)``: the
      same on every rank and worker, so the split is a partition. With at least as many shards
      as readers, reader ``i`` of ``R`` reads shards ``order[i::R]`` whole (readers then hold
      whole shards: their sample counts differ when shards differ in size or ``R`` does not
      divide the shard count). With fewer shards than readers (a warning says so, once), the
      readers share shards: shard ``order[s]`` is read by readers ``s, s + S, s + 2S, ...``
      (``S`` shards), each keeping every ``k``-th sample of it (``k`` readers in the group), so
      each sample is still read once, while a shard is opened ``k`` times.
    - **Shuffle.** ``shuffle_shards=False`` keeps the given order (evaluation data).
      ``shuffle_buffer=n`` yields each reader's samples through a buffer of ``n``, drawn from
      ``(seed, epoch, reader)``.
    - **Seed.** ``seed=None`` takes the run's seed (the trainer's ``seed``, 0 without one).
    - **Random draws.** In a loader worker, the draws ``read_shard`` makes for each sample
      (torch, ``random``, NumPy) are seeded from ``(seed, epoch, shard, position in shard)``:
      the same in whichever worker and rank reads it. ``seed_samples=False`` saves the
      ~8 µs per sample this costs, for a ``read_shard`` that draws nothing.
    - **Resume.** ``state_dict()`` is the pass's position (epoch, reader, samples yielded);
      ``load_state_dict`` makes the next pass go on after it. The trainer saves it per loader
      worker with every checkpoint (``disttrain/data/positions.py``): a mid-epoch resume
      trains the batches the unbroken run would have.

    ``read_shard`` is given, or overridden by a subclass. With loader workers started by
    ``spawn`` it must pickle (a module-level function). The trainer gives no length to a
    stream: a fractional ``limit_train_batches`` is refused, an int counts batches, and an
    epoch ends when every reader's share is read. Ranks whose shares hold different numbers
    of batches all stop at the shortest (README: Uneven inputs).
    """

    shards_by_rank = True

    def __init__(
        self,
        shards: Sequence[Any],
        read_shard: Callable[[Any], Iterable[Any]] | None = None,
        *,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int | None = None,
        seed_samples: bool = True,
    ) -> None:
        super().__init__()
        if read_shard is None and type(self).read_shard is ShardedStream.read_shard:
            raise TypeError(f"{type(self).__name__}: give read_shard= or override read_shard")
        if not shards:
            raise ValueError(f"{type(self).__name__}: no shards")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = list(shards)
        self._read = read_shard
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self._own_seed = seed
        self.seed_samples = seed_samples
        # [seed, epoch] in shared memory: loader workers (persistent ones too) hold a copy of
        # this object, but this tensor is the same memory in every process
        self._state = torch.tensor([seed or 0, 0], dtype=torch.int64).share_memory_()
        self._warned_few_shards = False
        self._loaded: dict[str, int] | None = None  # a position to go on from (once)
        self._position: dict[str, int] = {"epoch": 0, "reader": 0, "readers": 1, "read": 0}

    def read_shard(self, shard: Any) -> Iterable[Any]:
        """The samples of ``shard``, in order."""
        assert self._read is not None  # checked in __init__
        return self._read(shard)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shard order the next pass reads (the trainer calls this before
        each epoch). It lives in shared memory: loader workers, persistent ones too, see it."""
        self._state[1] = epoch

    def set_seed(self, seed: int) -> None:
        """The run's seed, given by the trainer; a ``seed`` given to the constructor wins."""
        if self._own_seed is None:
            self._state[0] = seed

    @property
    def epoch(self) -> int:
        return int(self._state[1])

    @property
    def seed(self) -> int:
        return int(self._state[0])

    def shard_order(self, epoch: int) -> list[int]:
        """The indices of the shards in ``epoch``'s order: the same on every rank."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(f"disttrain-shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def warn_if_few_shards(self, readers: int) -> None:
        """Say once that ``readers`` readers share fewer shards (the trainer calls this)."""
        if len(self.shards) < readers and not self._warned_few_shards:
            self._warned_few_shards = True
            log.warning(
                "%s has %d shards for %d readers (world size x loader workers): readers share "
                "shards, each keeping every k-th sample, so every shard is read k times. Give "
                "at least as many shards as readers to read each shard once.",
                type(self).__name__,
                len(self.shards),
                readers,
            )

    def state_dict(self) -> dict[str, int]:
        """Where this reader's pass stands: its epoch, reader and samples yielded so far.
        (The trainer calls it in the loader worker after each batch; see data/positions.py.)"""
        return dict(self._position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next pass of the same epoch and reader go on after ``state["read"]``
        samples; the skipped samples are read again (their random draws discarded)."""
        self._loaded = dict(state)

    def __iter__(self) -> Iterator[Any]:
        reader, readers = reader_position()
        in_worker = get_worker_info() is not None
        if not in_worker:
            self.warn_if_few_shards(readers)
        seed, epoch = self.seed, self.epoch  # read once: the epoch this pass belongs to
        seeded = in_worker and self.seed_samples
        samples = self._own_samples(self.shard_order(epoch), reader, readers, seeded)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"disttrain-buffer:{seed}:{epoch}:{reader}")
            samples = _buffer_shuffled(samples, self.shuffle_buffer, rng)
        here = {"epoch": epoch, "reader": reader, "readers": readers}
        loaded, self._loaded = self._loaded, None
        skip = 0
        if loaded is not None:
            if {k: loaded.get(k) for k in here} == here:
                skip = loaded["read"]
            else:
                log.warning(
                    "%s: the loaded position %s is not this pass's (%s): reading it whole",
                    type(self).__name__,
                    loaded,
                    here,
                )
        self._position = {**here, "read": skip}
        return self._counted(samples, skip)

    def _counted(self, samples: Iterator[Any], skip: int) -> Iterator[Any]:
        if skip:
            with _generators_kept():
                collections.deque(itertools.islice(samples, skip), maxlen=0)
        position = self._position
        for sample in samples:
            position["read"] += 1
            yield sample

    def _own_samples(
        self, order: list[int], reader: int, readers: int, seeded: bool
    ) -> Iterator[Any]:
        n = len(order)
        if n >= readers:
            for index in order[reader::readers]:
                yield from self._shard_samples(index, seeded)
            return
        group = len(range(reader % n, readers, n))  # the readers sharing this reader's shard
        mine = reader // n  # this reader's place in that group
        for k, sample in enumerate(self._shard_samples(order[reader % n], seeded)):
            if k % group == mine:
                yield sample

    def _shard_samples(self, index: int, seeded: bool) -> Iterator[Any]:
        """Shard ``index``'s samples; in a loader worker each one's random draws are seeded
        from (seed, epoch, shard, position): the same in whichever worker and rank reads it."""
        samples = iter(self.read_shard(self.shards[index]))
        if not seeded:
            yield from samples
            return
        seed, epoch = self.seed, self.epoch
        for k in itertools.count():
            seed_draws(sample_seed(seed, epoch, index, k))
            sample = next(samples, _END)
            if sample is _END:
                return
            yield sample


_END = object()


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """Random draws inside leave the global generators (those a checkpoint saves) as found."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _buffer_shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """``samples`` through a buffer of ``size``: each new one swaps out a random held one."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
