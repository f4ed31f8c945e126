"""The logging setup: the one place that decides which ranks print.

Everything disttrain (and its examples) says goes through the ``disttrain`` logger. Only global
rank 0 prints unless ``DISTTRAIN_LOG_ALL_RANKS=1``; every line carries its rank.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("disttrain")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks: bool) -> None:
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or writes_run_output(self.rank)


def writes_run_output(rank: int) -> bool:
    """Whether this rank writes what a person reads: log files, the progress bar."""
    return rank == 0


def configure_logging(rank: int) -> None:
    """Install the rank-aware handler once per process (later calls update the rank)."""
    all_ranks = os.environ.get("DISTTRAIN_LOG_ALL_RANKS", "0") == "1"
    for handler in logger.handlers:
        if getattr(handler, "_disttrain", False):
            handler.filters = [_RankFilter(rank, all_ranks)]
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._disttrain = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank, all_ranks))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
