"""Waiting for a hook that runs on some ranks only (``prepare_data``) without a fixed timeout.

A download may take hours, so no collective timeout fits it. The ranks that run the hook beat
instead: a background thread adds one to a counter in the job's store every ``interval``
seconds while the hook runs, and a done key is set when it returns or raises. The others poll
the store: they wait as long as the counter moves, and fail once it has stood still for
``silent_after`` seconds, naming the rank. Each rank times the silence on its own clock, so
machines' clocks never have to agree.

What a beat proves: the process is alive and its Python threads run. A ``prepare_data`` that
waits forever on a socket or a lock keeps it beating; ``limit``, when set, bounds the whole
wait for that case.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeartbeatTimes:
    """How often the running ranks beat, how long a silence ends the wait, and an optional
    bound on the whole wait (None: as long as the beat goes on)."""

    interval: float = 5.0
    silent_after: float = 60.0
    limit: float | None = None


class PeerSilent(RuntimeError):
    """The rank this one waited for stopped beating, or ran past the wait's bound."""

    def __init__(self, rank: int, message: str) -> None:
        self.rank = rank
        super().__init__(message)


def _keys(name: str, rank: int) -> tuple[str, str]:
    """``rank``'s keys for hook ``name``, in a store of one session (see ``connect``)."""
    base = f"disttrain/heartbeat/{name}/rank{rank}/"
    return base + "beats", base + "done"


@contextlib.contextmanager
def beating(store: Any, name: str, rank: int, times: HeartbeatTimes) -> Iterator[None]:
    """Beat for ``rank`` while the body runs; say it is done however it ends."""
    beats, done = _keys(name, rank)
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # the store gone: the waiters see silence
                store.add(beats, 1)
            if stop.wait(times.interval):
                return

    thread = threading.Thread(target=beat, name=f"disttrain-heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # not to hide the hook's own error
            store.add(done, 1)


def wait_for_beats(
    store: Any,
    name: str,
    rank: int,
    times: HeartbeatTimes,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once ``rank`` is done with hook ``name``; raise ``PeerSilent`` if its beat
    stands still for ``times.silent_after`` seconds, or the wait outlasts ``times.limit``."""
    beats, done = _keys(name, rank)
    start = last_change = clock()
    seen = -1
    while True:
        try:
            if store.add(done, 0):
                return
            count = store.add(beats, 0)
        except Exception as lost:  # the store's host went away: the job is gone
            raise PeerSilent(
                rank,
                f"lost the job's store while waiting for rank {rank}'s {name} "
                f"({type(lost).__name__}: {lost})",
            ) from lost
        now = clock()
        if count != seen:
            seen, last_change = count, now
        silent = now - last_change
        if silent > times.silent_after:
            raise PeerSilent(
                rank,
                f"rank {rank} stopped sending its {name} heartbeat {silent:.1f} s ago (it died "
                f"or hangs); waited {now - start:.1f} s in all "
                f"({name}_heartbeat_timeout={times.silent_after:g})",
            )
        if times.limit is not None and now - start > times.limit:
            raise PeerSilent(
                rank,
                f"rank {rank}'s {name} still runs after {now - start:.0f} s "
                f"({name}_timeout={times.limit:g})",
            )
        time.sleep(min(times.interval, 1.0))
