"""How disttrain starts a DataLoader's worker processes, and how it ends them.

Workers ignore SIGINT and SIGTERM (``WorkerInit``), so that a signal stops the rank after
an agreed step instead of killing its data; the two signals are held back while ``reading``
starts (forks) workers, so that a worker is not killed before it ignores them. The price:
multiprocessing's exit handler, which SIGTERMs a process's daemonic children and then joins
them, would wait forever for workers nobody shut down. Two things make sure nobody waits:

- the loop reads every loader through ``reading``, which shuts the workers down when its
  block ends however it ends (an exception, ``Preempted``, a break, the epoch's end), and
  ``ended``, which ends persistent workers when fit, validate or test ends;
- a backstop at the process's exit (``_end_daemonic_children``), for workers a path the
  loop does not own left running: it runs before multiprocessing's handler and kills
  (SIGKILL) the daemonic children that outlive a SIGTERM by a second.

A forked worker can also never start: on Python before 3.12 (CPython gh-112275) a fork made
while another thread of the rank holds the interpreter's thread-list lock leaves the child
stuck inside ``fork`` for ever, and torch's loader then waits for its batch for ever (seen
once in about a hundred 2-rank starts on a loaded machine). ``reading`` therefore waits for
each newly forked worker to say it started (``WorkerInit`` marks its slot first thing), and
forks a worker that has not within ``_START_TIMEOUT`` again with the same arguments: the
same worker id, seed and index queue, so the batches are those of a worker that started at
once.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.sharedctypes
import multiprocessing.util  # registers multiprocessing's exit handler (before ours)
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data._utils import signal_handling
from torch.utils.data._utils import worker as torch_worker

log = logging.getLogger("disttrain.data")

_GRACE = 1.0  # seconds a daemonic child has at exit to end on SIGTERM before SIGKILL

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # what launchers send a rank's process group

_START_TIMEOUT = 10.0  # seconds a forked worker has to reach its worker loop, however loaded
_START_ATTEMPTS = 3  # forks of one worker before the rank gives up with an error


class WorkerInit:
    """A loader worker's start: it ignores SIGINT and SIGTERM, then runs the user's
    ``worker_init_fn``. Launchers signal a rank's whole process group (torchrun's agent,
    SLURM, a terminal's Ctrl-C): the rank stops after an agreed step and shuts its workers
    down itself, where a worker killed by the signal would fail the rank instead. (A class,
    not a closure: spawned workers receive it pickled.)

    Where disttrain wraps the dataset (``Wrapper``), the user's function sees what torch
    documents: ``get_worker_info().dataset`` is the user's own dataset object (this worker's
    copy, to read and to set up), and ``get_worker_info().id``, like the ``worker_id`` it is
    called with, is the worker whose part this one reads: itself, or after a mid-epoch
    resume the worker whose place it takes (``positions.py``)."""

    def __init__(self, user_init: Callable[[int], object] | None, workers: int = 0) -> None:
        self.user_init = user_init
        # each worker's pid once it started, in memory its forked workers share (reading)
        self.started: Any = multiprocessing.sharedctypes.RawArray("q", workers) if workers else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:  # not a worker's start:
            state["started"] = None  # shared memory passes to new processes only
        return state

    def __call__(self, worker_id: int) -> None:
        for stop in _STOP_SIGNALS:  # one that came while the worker started is dropped
            signal.signal(stop, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # see _workers_starting
        info = get_worker_info()
        if self.started is not None and info is not None and info.id < len(self.started):
            self.started[info.id] = os.getpid()
        wrapper = getattr(info, "dataset", None)
        if info is not None and isinstance(wrapper, Wrapper):
            worker_id = wrapper.worker_role(info.id, info.num_workers)
            _act_as(info, worker_id, wrapper.dataset)
        if self.user_init is not None:
            self.user_init(worker_id)


class Wrapper:
    """Base of disttrain's wrappers of a user's dataset (``SeededSamples``,
    ``StatefulStream``): every attribute the wrapper does not own (``_own``) is the user's
    dataset's, to read and to write, so code written for the user's dataset (a
    ``worker_init_fn`` setting ``dataset.start``) reaches it."""

    _own: ClassVar[frozenset[str]] = frozenset({"dataset"})
    dataset: Any  # the user's dataset

    def __getattr__(self, name: str) -> Any:  # only for names not found on the wrapper
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self._own:
            object.__delattr__(self, name)
        else:
            delattr(self.dataset, name)

    def worker_role(self, worker: int, workers: int) -> int:
        """The worker whose part loader worker ``worker`` of ``workers`` reads: itself."""
        return worker


def _act_as(info: Any, role: int, dataset: Any) -> None:
    """Make ``get_worker_info()`` in this worker say ``role`` and ``dataset``. torch's
    ``WorkerInfo`` is frozen, and ``get_worker_info`` reads a module global, which its
    worker loop sets before calling ``worker_init_fn``: the global is replaced."""
    changed: Any
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        changed = dataclasses.replace(info, id=role, dataset=dataset)
    else:  # torch before WorkerInfo became a dataclass
        changed = type(info)(id=role, num_workers=info.num_workers, seed=info.seed, dataset=dataset)
    torch_worker._worker_info = changed


def rebuilt(loader: Any, **changes: Any) -> DataLoader:
    """A ``DataLoader`` with ``loader``'s options but ``changes`` (``dataset``, ``sampler``,
    ``collate_fn``, ``persistent_workers``): the user's ``num_workers``,
    ``persistent_workers``, ``pin_memory`` and the rest are kept as set. Its workers start
    with ``WorkerInit`` (the user's ``worker_init_fn`` inside it)."""
    init = loader.worker_init_fn
    options: dict[str, Any] = {
        "dataset": loader.dataset,
        "batch_size": loader.batch_size,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        **worker_start(
            init, loader.multiprocessing_context, changes.get("num_workers", loader.num_workers)
        ),
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
        "in_order": loader.in_order,
        **changes,
    }
    if not options["num_workers"]:
        options["prefetch_factor"] = None  # torch refuses one without workers
    return DataLoader(**options)


@contextlib.contextmanager
def reading(loader: Any, opener: Callable[[Any], Iterator[Any]] = iter) -> Iterator[Iterator[Any]]:
    """``opener(loader)`` (``iter``) for the ``with`` block; its worker processes are shut
    down when the block ends. A loader's persistent workers stay for its next epoch after a
    block that ended without an exception (``ended`` ends them); after an exception they
    end too."""
    with _workers_starting():  # no signal kills a worker before it ignores them
        batches = opener(loader)
    failed = True
    try:
        _forked_workers_started(loader, batches)
        yield batches
        failed = False
    finally:
        if failed or not getattr(loader, "persistent_workers", False):
            end_workers(loader, batches)


@contextlib.contextmanager
def ended(*loaders: Any) -> Iterator[None]:
    """The persistent workers of ``loaders`` (None: no loader) end when the block ends."""
    try:
        yield
    finally:
        for loader in loaders:
            if loader is not None:
                # where torch keeps a loader's persistent iterator (no public accessor)
                end_workers(loader, getattr(loader, "_iterator", None))


def end_workers(loader: Any, batches: Any) -> None:
    """Shut down the worker processes of ``batches``, an iterator of ``loader``.

    torch's multi-process iterator has no public way to do this: its workers end when it is
    exhausted or garbage-collected, and an exception's traceback (or a generator around the
    iterator) keeps it alive past the interpreter's exit. ``_shutdown_workers`` is what its
    own ``__del__`` calls: it sends each worker its end-of-work sentinel and joins it.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is batches and batches is not None:
        loader._iterator = None  # a persistent loader's next iter() starts new workers


def _forked_workers_started(loader: Any, batches: Any) -> None:
    """Return once every worker ``batches`` forked has started (marked its slot of
    ``WorkerInit.started`` with its pid); fork one that has not within ``_START_TIMEOUT``
    again, up to ``_START_ATTEMPTS`` times (the module's docstring says why). Workers that
    start by spawn or forkserver exec a fresh interpreter, which that fork bug cannot
    reach, and take seconds to start: they are not waited for."""
    init = getattr(loader, "worker_init_fn", None)
    workers = getattr(batches, "_workers", None)  # torch's list of this iterator's workers
    if not isinstance(init, WorkerInit) or init.started is None or not workers:
        return
    if not all(isinstance(w, _RestartableForkProcess) for w in workers):
        return  # spawn or forkserver (a fresh interpreter: no such fork), or the user's own
    for attempt in range(1, _START_ATTEMPTS + 1):
        stuck = _not_started(init.started, workers, time.monotonic() + _START_TIMEOUT)
        if not stuck:
            return
        if attempt == _START_ATTEMPTS:
            pids = ", ".join(str(workers[i].pid) for i in stuck)
            raise RuntimeError(
                f"loader worker(s) {stuck} (pid {pids}) never started, forked "
                f"{_START_ATTEMPTS} times, {_START_TIMEOUT:g} s each: their fork hangs "
                "(a lock held at fork time in this process)"
            )
        with _workers_starting():
            for i in stuck:
                log.warning(
                    "loader worker %d (pid %d) did not start within %g s of its fork (stuck "
                    "inside fork: CPython gh-112275 before Python 3.12); forking it again",
                    i,
                    workers[i].pid,
                    _START_TIMEOUT,
                )
                _fork_again(batches, i)


class _RestartableForkProcess(multiprocessing.context.ForkProcess):
    """A forked process that keeps what it was started with (``BaseProcess.start`` drops
    it), so that ``_fork_again`` can start the same process once more."""

    recipe: tuple[Any, tuple, dict] | None = None

    def start(self) -> None:
        self.recipe = (self._target, self._args, self._kwargs)  # type: ignore[attr-defined]
        super().start()


class _RestartableForkContext(multiprocessing.context.ForkContext):
    Process = _RestartableForkProcess


_RESTARTABLE_FORK = _RestartableForkContext()


def worker_start(init: Any, context: Any, workers: int) -> dict[str, Any]:
    """A loader's ``worker_init_fn`` and ``multiprocessing_context`` as disttrain starts its
    ``workers``: ``WorkerInit`` around the user's function (signals; the start mark
    ``reading`` waits for), and a fork context whose workers can be forked again."""
    return {
        "worker_init_fn": init if isinstance(init, WorkerInit) else WorkerInit(init, workers),
        "multiprocessing_context": _restartable_context(context, workers),
    }


def _restartable_context(context: Any, workers: int) -> Any:
    """The fork context whose workers ``reading`` can fork again, where the user left the
    context unset (or chose fork) and the platform forks; the user's own otherwise."""
    if not workers:
        return context
    if context is None:
        context = multiprocessing.get_context()
    elif isinstance(context, str):
        context = multiprocessing.get_context(context)
    if type(context) is multiprocessing.context.ForkContext:
        return _RESTARTABLE_FORK
    return context


def _not_started(started: Any, workers: list, deadline: float) -> list[int]:
    """The workers that have not marked their slot by ``deadline`` (and are alive: one that
    died is torch's to report, as its loader does)."""
    pause = 1e-3
    while True:
        stuck = [i for i, w in enumerate(workers) if started[i] != w.pid and w.is_alive()]
        if not stuck or time.monotonic() >= deadline:
            return stuck
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def _fork_again(batches: Any, i: int) -> None:
    """Replace worker ``i`` of torch's iterator ``batches`` by a new fork of the same
    process (target, arguments: its id, seed and queues), before it read anything. torch's
    child watch forgets this iterator's workers before the stuck one is killed, so that its
    death is not taken for a worker's failure, and learns them again, the new pid with them."""
    stuck = batches._workers[i]
    target, args, kwargs = stuck.recipe
    again = _RestartableForkProcess(target=target, args=args, kwargs=kwargs, daemon=True)
    signal_handling._remove_worker_pids(id(batches))
    stuck.kill()  # stuck inside fork with the stop signals still blocked: only SIGKILL ends it
    stuck.join()
    again.start()
    batches._workers[i] = again
    signal_handling._set_worker_pids(id(batches), tuple(w.pid for w in batches._workers))


@contextlib.contextmanager
def _workers_starting() -> Iterator[None]:
    """SIGINT and SIGTERM held back (blocked) in this thread while the block starts loader
    workers: a forked worker starts with them blocked, so that it gets one only after
    ``WorkerInit`` made it ignore them (torch's worker loop first installs its own SIGTERM
    handler, which ends the worker). A spawned worker starts with an empty mask: it can
    still be killed while it starts. In this process a signal that comes meanwhile is taken
    by another thread, or waits for the block's end; it is never lost (no handler changes
    here: the disposition is the process's, for every thread)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _end_daemonic_children() -> None:
    """What multiprocessing's exit handler does to daemonic children, with a deadline: each
    gets SIGTERM, and those alive a second later (loader workers that ignore it) SIGKILL."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + _GRACE
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join()


# Exit handlers run newest first. Registered when disttrain is imported, after
# multiprocessing's (imported above) and before torch's own for persistent workers with
# pinned memory (registered with the first such loader iterator), ours runs between the
# two: torch shuts its workers down cleanly, then ours ends what is left, then
# multiprocessing joins nothing. (``multiprocessing.util.get_logger()`` moves
# multiprocessing's handler to the front; call it before importing disttrain, if at all.)
atexit.register(_end_daemonic_children)
