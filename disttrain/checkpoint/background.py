"""Checkpoints written in the background (``Trainer(async_checkpointing=True)``).

A save copies the state off the model into host memory (DDP: global zero clones every tensor
of the gathered state; FSDP: DCP's ``async_save`` stages each rank's shards), and training
goes on while a writer thread of each rank writes it; global zero then completes the
checkpoint (renamed into place, or its marker written last) and only then does the file work
that follows a save (``last.ckpt``, deleting checkpoints no longer kept). So:

* a crash during a background write leaves the previous checkpoint complete and chosen by
  ``resume="auto"``: the new one never became complete, and nothing older was deleted yet;
* there is never more than one write in flight: the next save first waits for the last one
  (a write that failed on any rank stops the run there, named, on every rank: under FSDP in a
  verdict, for DDP's files in the gather every checkpoint makes anyway, so that an async
  save of DDP costs that one collective and no other);
* a stop (signal, ``max_time``) and the end of ``fit`` wait for the write before saying that
  a checkpoint was written, so what a message names exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from disttrain.ranks.dispatch import error_text

log = logging.getLogger("disttrain.checkpoint")

_HEAD_START = 0.01  # seconds the training loop has to get back into its step before a write


class CheckpointWrites:
    """This rank's checkpoint writes in flight: run in order, on one thread of their own; and
    the host memory a save copies its state into, kept from one save to the next (a fresh
    allocation's page faults would cost more than the copy itself)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future | None = None
        self._host: list[torch.Tensor] = []

    def start(self, job: Callable[[], Any]) -> None:
        """Run ``job`` on the writer thread, after every job started before it, and after
        ``_HEAD_START``: a writer that pickles at once takes the GIL from the training loop
        while it is still on its way out of the save (Python code, 3 ms of its stall at 2
        ranks here); a moment later the loop is in its step, whose tensor operations release
        the GIL, and the write overlaps them."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="disttrain-checkpoint")
        self._last = self._executor.submit(_after_head_start, job)

    def wait(self) -> None:
        """Return once every job started has finished; raise the error of one that failed."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def finished(self) -> str:
        """``wait``, with the error of a job that failed as text (empty if none): what a
        checkpoint's gather tells every rank."""
        try:
            self.wait()
        except Exception as error:
            return error_text(error)
        return ""

    def holds_failure(self) -> bool:
        """Whether ``fail`` kept an error that no ``wait`` has raised yet."""
        last = self._last
        return last is not None and last.done() and last.exception() is not None

    def fail(self, error: Exception) -> None:
        """Keep ``error`` as the outcome of the writes in flight (the next ``wait`` raises it):
        a save that failed before its write started is told as a write that failed."""
        failed: Future = Future()
        failed.set_exception(error)
        self._last = failed

    def close(self) -> None:
        """At the end of a session, also a failed one: let a write in flight finish (a
        complete checkpoint is worth the wait), and say if it failed."""
        try:
            self.wait()
        except Exception as err:  # the run is ending with its own error, or after this one
            log.error("a checkpoint written in the background failed: %s", err)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._host.clear()

    def to_host(self, state: Any) -> Any:
        """``state`` with every tensor copied to host memory: what the writer thread writes
        while the optimizer steps on the originals. Only once the last write has finished
        (``wait``): its buffers are reused, matched by the order the walk meets tensors in
        (a state dict's order is the same from save to save)."""
        buffers = self._host
        met = 0
        tensor, plain_dict = torch.Tensor, dict

        def copied(value: Any) -> Any:  # per element of the state: kept lean
            nonlocal met
            if isinstance(value, tensor):
                host = buffers[met] if met < len(buffers) else None
                if host is None or host.dtype != value.dtype or host.shape != value.shape:
                    host = torch.empty(value.shape, dtype=value.dtype)
                    buffers[met : met + 1] = [host]
                met += 1
                return host.copy_(value.detach())
            kind = type(value)
            if kind is plain_dict:
                return {k: copied(v) for k, v in value.items()}
            if isinstance(value, plain_dict):  # an OrderedDict (a module's state dict)
                return kind({k: copied(v) for k, v in value.items()})
            if kind is list or kind is tuple:
                return kind([copied(v) for v in value])
            return value

        return copied(state)


def _after_head_start(job: Callable[[], Any]) -> Any:
    time.sleep(_HEAD_START)
    return job()
