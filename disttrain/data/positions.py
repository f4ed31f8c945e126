"""Mid-epoch resume of a stream that has state: which loader worker read each batch, and where.

An ``IterableDataset`` with ``state_dict()`` and ``load_state_dict(state)`` is wrapped in a
``StatefulStream``. In each loader worker (or the main process without workers) the batch
leaves the worker in an ``Envelope`` with the worker's id and the stream's ``state_dict()``
taken right after the batch's samples were read. The main process keeps, per worker, the
state of the last batch *trained* (not merely read ahead) and which worker reads next; that
goes into the checkpoint.

On resume, worker ``k`` of the new loader takes the role of worker ``(k + next) % workers`` of
the old one (``get_worker_info().id`` says the role) and loads that worker's state: the
DataLoader hands batches out round-robin from worker 0, so the roles turn to make the batch
after the checkpoint the one the unbroken run would train next.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils import worker as worker_info_module

from disttrain.data.workers import rebuilt

data_log = logging.getLogger("disttrain.data")


def has_state(dataset: Any) -> bool:
    """Whether ``dataset`` is a stream whose position can be saved and loaded."""
    return (
        isinstance(dataset, IterableDataset)
        and callable(getattr(dataset, "state_dict", None))
        and callable(getattr(dataset, "load_state_dict", None))
    )


class Envelope(NamedTuple):
    batch: Any
    worker: int  # the role of the worker that read it
    state: Any  # the stream's state_dict() after this batch


class ResumePlan(NamedTuple):
    epoch: int
    next_worker: int
    states: dict[int, Any]  # by worker role


class StatefulStream(IterableDataset):
    """``dataset`` read by loader workers in turned roles, its state loaded on resume."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset: Any = dataset  # with state_dict and load_state_dict (has_state)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # reaches workers
        self.plan: ResumePlan | None = None
        self.role = 0  # the worker this copy reads as, set when iteration starts
        self.positions: StreamPositions | None = None  # main process only

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "positions": None}  # a worker needs no bookkeeping

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:  # the stream's own attributes
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:  # a persistent worker's id may say an earlier epoch's role
            worker = self.__dict__.setdefault("_worker", worker)
        epoch, plan = int(self._epoch[0]), self.plan
        resuming = plan is not None and plan.epoch == epoch
        self.role = (worker + plan.next_worker) % workers if resuming and plan else worker
        if info is not None:
            _act_as(info, self.role)
            if hasattr(self.dataset, "set_epoch"):  # a persistent worker's own copy
                self.dataset.set_epoch(epoch)
        if resuming and plan is not None and self.role in plan.states:
            self.dataset.load_state_dict(plan.states[self.role])
        self.plan = None  # once: the next epoch starts from its beginning
        return iter(self.dataset)


def _act_as(info: Any, role: int) -> None:
    """Make ``get_worker_info().id`` say ``role`` in this worker, so that a stream sharding
    itself by worker id reads the share of the worker whose state it loaded."""
    if info.id != role:
        worker_info_module._worker_info = type(info)(
            id=role, num_workers=info.num_workers, seed=info.seed, dataset=info.dataset
        )


class EnvelopingCollate:
    """The loader's ``collate_fn``, then the envelope: reading worker and stream state."""

    def __init__(self, collate: Callable[[Any], Any], stream: StatefulStream) -> None:
        self.collate, self.stream = collate, stream

    def __call__(self, samples: Any) -> Envelope:
        info = get_worker_info()
        stream: Any = self.stream if info is None else info.dataset  # the worker's own copy
        return Envelope(self.collate(samples), stream.role, stream.dataset.state_dict())


class StreamPositions:
    """The main process's record: per worker role, the state after its last trained batch."""

    def __init__(self, stream: StatefulStream, workers: int, trained: Callable[[], int]):
        self.stream, self.workers, self.trained = stream, max(1, workers), trained
        self.epoch, self.last = 0, -1
        self.states: dict[int, Any] = {}
        self._read: collections.deque[tuple[int, int, Any]] = collections.deque()

    def resume(self, saved: dict[str, Any]) -> None:
        """Go on from ``saved`` (a checkpoint's ``position()``) in its epoch."""
        plan = ResumePlan(saved["epoch"], saved["next_worker"], saved["states"])
        self.stream.plan = plan
        self.epoch, self.states = plan.epoch, dict(plan.states)
        self.last = (plan.next_worker - 1) % self.workers

    def batches(self, envelopes: Iterator[Envelope], epoch: int, first: int) -> Iterator[Any]:
        """The batches of ``envelopes`` (batch ``first`` on), their positions recorded."""
        if epoch != self.epoch or not first:
            self.epoch, self.last, self.states = epoch, -1, {}
        self._read.clear()
        trained, read = self.trained, self._read
        for index, (batch, worker, state) in enumerate(envelopes, first):
            read.append((index, worker, state))
            self._fold(trained())
            yield batch

    def position(self) -> dict[str, Any]:
        """Where the stream stands after the last trained batch (for a checkpoint)."""
        self._fold(self.trained())
        return {
            "epoch": self.epoch,
            "workers": self.workers,
            "next_worker": (self.last + 1) % self.workers,
            "states": dict(self.states),
        }

    def _fold(self, next_batch: int) -> None:
        read = self._read
        while read and read[0][0] < next_batch:
            _, self.last, state = read.popleft()
            self.states[self.last] = state


def stateful_loader(loader: DataLoader) -> DataLoader:
    """A stream with state, read so that its position is known after every batch (the
    user's options kept)."""
    assert isinstance(loader.dataset, IterableDataset)  # has_state said so
    stream = StatefulStream(loader.dataset)
    return rebuilt(loader, dataset=stream, collate_fn=EnvelopingCollate(loader.collate_fn, stream))


def track_positions(
    loader: Any, trained: Callable[[], int], saved: dict | None
) -> Callable[[], dict] | None:
    """For a stream with state: start recording its position (going on from ``saved``, a
    checkpoint's record for this rank); returns what a checkpoint asks for. None otherwise."""
    stream = getattr(loader, "dataset", None)
    if not isinstance(stream, StatefulStream):
        return None
    positions = stream.positions = StreamPositions(stream, loader.num_workers, trained)
    if saved is not None and saved["workers"] != positions.workers:
        data_log.warning(
            "the checkpoint's %s was read by %d loader workers, this run has %d: its position "
            "cannot be restored, so the epoch's first batches are read again and dropped",
            type(stream.dataset).__name__,
            saved["workers"],
            positions.workers,
        )
    elif saved is not None:
        positions.resume(saved)
    return positions.position
