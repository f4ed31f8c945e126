"""How disttrain starts a DataLoader's worker processes."""

from __future__ import annotations

import signal
from collections.abc import Callable


class WorkerInit:
    """A loader worker's start: it ignores SIGINT and SIGTERM, then runs the user's
    ``worker_init_fn``. Launchers signal a rank's whole process group (torchrun's agent,
    SLURM, a terminal's Ctrl-C): the rank stops after an agreed step and shuts its workers
    down itself, where a worker killed by the signal would fail the rank instead. (A class,
    not a closure: spawned workers receive it pickled.)"""

    def __init__(self, user_init: Callable[[int], object] | None) -> None:
        self.user_init = user_init

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.user_init is not None:
            self.user_init(worker_id)
