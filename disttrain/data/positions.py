"""Mid-epoch resume of a stream that has state: which loader worker read each batch, and where.

An ``IterableDataset`` with ``state_dict()`` and ``load_state_dict(state)`` is wrapped in a
``StatefulStream``. In each loader worker (or the main process without workers) the batch
leaves the worker in an ``Envelope`` with the worker's id and the stream's ``state_dict()``
taken right after the batch's samples were read. The main process keeps, per worker, the
state of the last batch *trained* (not merely read ahead) and which worker reads next; that
goes into the checkpoint.

On resume, worker ``k`` of the new loader takes the role of worker ``(k + next) % workers`` of
the old one and loads that worker's state: the DataLoader hands batches out round-robin from
worker 0, so the roles turn to make the batch after the checkpoint the one the unbroken run
would train next. The role is in place before the user's ``worker_init_fn`` runs: it is the
``worker_id`` the function receives and what ``get_worker_info().id`` says (``WorkerInit``).
The resumed epoch of a loader with persistent workers is read by a one-off copy of it
(``resumed_epoch_loader``), so that its own workers start at the next epoch in their roles.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from disttrain.data.workers import Wrapper, rebuilt

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


class StatefulStream(Wrapper, IterableDataset):
    """``dataset`` read by loader workers in turned roles, its state loaded on resume.

    Its attributes are the user's stream's (``Wrapper``), read and written; in a loader
    worker ``get_worker_info()`` says the role and gives the user's stream (``WorkerInit``).
    """

    _own = frozenset({"dataset", "_epoch", "plan", "positions", "seed_state"})

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset: Any = dataset  # with state_dict and load_state_dict (has_state)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # reaches workers
        self.plan: ResumePlan | None = None
        self.positions: StreamPositions | None = None  # main process only
        self.seed_state: torch.Tensor | None = None  # main process only: resumed_epoch_loader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "positions": None}  # a worker needs no bookkeeping

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def worker_role(self, worker: int, workers: int) -> int:
        """In the epoch a resume goes on in, worker ``k`` reads as ``(k + next) % workers``
        (the module's docstring); in any other epoch, as itself."""
        plan = self.plan
        if plan is not None and plan.epoch == int(self._epoch[0]):
            return (worker + plan.next_worker) % workers
        return worker

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        role = 0 if info is None else info.id  # in a worker, WorkerInit set the role
        epoch, plan = int(self._epoch[0]), self.plan
        if info is not None and hasattr(self.dataset, "set_epoch"):  # a persistent worker
            self.dataset.set_epoch(epoch)  # keeps the copy it started with: give it the epoch
        if plan is not None and plan.epoch == epoch and role in plan.states:
            self.dataset.load_state_dict(plan.states[role])
        self.plan = None  # once: the next epoch starts from its beginning
        return iter(self.dataset)


class EnvelopingCollate:
    """The loader's ``collate_fn``, then the envelope: reading worker and stream state."""

    def __init__(self, collate: Callable[[Any], Any], stream: StatefulStream) -> None:
        self.collate, self.stream = collate, stream

    def __call__(self, samples: Any) -> Envelope:
        info = get_worker_info()  # in a worker: the role, and the user's stream (WorkerInit)
        stream: Any
        role, stream = (0, self.stream.dataset) if info is None else (info.id, info.dataset)
        return Envelope(self.collate(samples), role, stream.state_dict())


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


def resumed_epoch_loader(loader: DataLoader) -> DataLoader:
    """The loader to read the epoch a resume goes on in: ``loader`` itself, or for persistent
    workers a one-off copy whose workers end with the epoch. Workers read that epoch in
    turned roles (the module's docstring) and a ``worker_init_fn`` runs once per worker
    start: the persistent workers then start at the next epoch, in their own roles."""
    if not loader.persistent_workers:
        return loader
    stream = loader.dataset
    assert isinstance(stream, StatefulStream)  # stateful_loader built it
    # the copy's workers draw their seed where the unbroken run's persistent ones did
    stream.seed_state = _seed_source(loader).get_state()
    return rebuilt(loader, persistent_workers=False)


def opened(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``. The persistent workers of a loader whose resumed epoch a one-off
    copy read start one epoch later than the unbroken run's: they draw their seed from the
    state the copy drew from (the unbroken run's), and the generator is left as it was, so
    that the run's random numbers go on as in the unbroken run."""
    stream = loader.dataset
    if not loader.persistent_workers or not isinstance(stream, StatefulStream):
        return iter(loader)  # the one-off copy too: it is not persistent
    state, stream.seed_state = stream.seed_state, None
    if state is None:
        return iter(loader)
    source = _seed_source(loader)
    now = source.get_state()
    source.set_state(state)
    try:
        return iter(loader)
    finally:
        source.set_state(now)


def _seed_source(loader: DataLoader) -> torch.Generator:
    """The generator a loader's iterator draws its workers' base seed from."""
    return loader.generator if loader.generator is not None else torch.default_generator


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
