"""Every way a run stops early, decided in one place: the decisions. (The gradient-borne
vote they cast and read is ``disttrain.loop.vote``; the signals they hear,
``disttrain.loop.signals``; ``EpochEnd`` names why an epoch's batches end.)

- ``on_batch_start`` returning -1 on any rank: the dispatcher's agreement
  (``agree_on_minus_one``), which ends the epoch's training on every rank at the same batch.
- ``trainer.should_stop`` (early stopping, a user's hook), SIGTERM and Ctrl-C (SIGINT): a
  vote that rides the next step's gradient all-reduce (``StopVote``, no collective of its
  own), read after every optimizer step; at an epoch's end it rides the epoch's metric
  reduction instead. A signal also writes a checkpoint and raises ``Preempted``.
- ``max_steps``: a value every rank compares alike, so no vote is needed.
- ``max_time``: each rank's own clock, read after each step (no collective): a rank whose
  time is up casts the stop vote above; after the agreed stop, one agreement (with the
  signal's) tells every rank alike to write a checkpoint, and fit ends as usual.
- Data that ran out on one rank before the others (uneven streams, a custom sampler): the
  loop reads one accumulation window ahead (``DataAhead``), and a rank without a complete
  window after this one votes "my data ends" on the same ride as the stop vote; every rank
  leaves the epoch after the step where the shortest rank's data ends (``Stopping.data_ended``),
  and the epoch then ends as usual. One agreement at each epoch's start covers a rank whose
  data ends within the first window(s).
- A NaN or inf loss on any rank (``stop_on_nonfinite_loss``): each micro-batch's loss is
  checked on its device, without waiting for it (``watch_loss``); a rank whose loss was not
  finite votes so on the same ride as the stop vote, from that backward on. After the agreed
  stop every rank raises ``NonFiniteLoss`` naming the rank and the step, without saving; a
  checkpoint asked for before the vote is read (a ModelCheckpoint at that step, at the
  epoch's end) hears of it in the gather every checkpoint makes anyway
  (``disttrain.checkpoint.snapshot.gather_state``) and refuses alike on every rank. The loss
  is checked, not the gradients: a GradScaler that skips a step of inf gradients trains on.

A second Ctrl-C aborts at once (``abort_now``). Exit codes: ``EXIT_PREEMPTED`` (75) after
SIGTERM, what schedulers requeue on; ``EXIT_INTERRUPTED`` (130) after Ctrl-C; 1 after a
non-finite loss, a failure (``disttrain.dist.exits``)."""

from __future__ import annotations

import collections
import enum
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from disttrain.dist.collectives import Collectives
from disttrain.dist.exits import NonFiniteLoss
from disttrain.loop.signals import Preempted, PreemptionWatcher
from disttrain.loop.vote import StopVote

log = logging.getLogger("disttrain.preemption")


class EpochEnd(enum.Enum):
    """Why an epoch's batches end. The first three end the epoch as usual (validation and
    the epoch-end hooks run); the last two leave training."""

    DATA = "its data (or limit_train_batches) ran out"
    MINUS_ONE = "on_batch_start returned -1 on some rank"
    DATA_ENDED = "the shortest rank's data ended"
    MAX_STEPS = "max_steps was reached inside the epoch"
    AGREED_STOP = "a rank voted to stop (trainer.should_stop, a signal or max_time)"

    @property
    def leaves_training(self) -> bool:
        return self in (EpochEnd.MAX_STEPS, EpochEnd.AGREED_STOP)


_UNKNOWN = 2**62  # a loader without a length, in an integer agreement

_STEPS_KEPT = 2  # steps of losses watch_loss keeps: more than the stop vote's lag (0 or 1)

_SIGNALS = (None, "SIGTERM", "SIGINT")  # ordered: an agreed stop reports the strongest


class Stopping:
    """One fit's stop decisions, each agreed by every rank at the same step.

    ``after_step`` is read after every optimizer step: the votes (``trainer.should_stop``,
    a signal) ride the next step's gradient all-reduce where DDP carries a ``StopVote``, or
    cost one agreement otherwise. ``for_signal`` turns an agreed stop into a checkpoint and
    ``Preempted`` when the stop came from a signal.
    """

    def __init__(
        self,
        collectives: Collectives,
        watcher: PreemptionWatcher,
        max_time: float | None = None,
        watch_loss_of: int | None = None,
    ) -> None:
        self.collectives, self.watcher, self.max_time = collectives, watcher, max_time
        self.rank = watch_loss_of  # this rank, whose losses are watched (None: not watched)
        self._bad: torch.Tensor | None = None  # on the loss's device: a loss was not finite
        # the last steps' (step, loss): where the first non-finite one is looked up once
        # _bad says there is one (a stop follows within the vote's lag: 1 step)
        self._recent: collections.deque[tuple[int, torch.Tensor]] = collections.deque()
        self._found: list[tuple[int, int, float]] = []  # every rank's, once agreed
        self._deadline = math.inf  # time.monotonic() at which max_time runs out
        self.vote: StopVote | None = None
        self.data_ended = False  # after_step: every rank leaves the epoch after this step
        self._ends = False  # this rank's data-ended vote, where no StopVote carries it
        self._steps_left: int | None = None  # set where the epoch-start agreement decides

    def fewest_batches(self, n_train: int | float) -> int | float:
        """The fewest training batches any rank's loader has (once per fit): with loaders of
        uneven lengths every rank then ends each epoch at the same batch, with the same
        windows (FSDP gathers in every micro-batch, so windows must match, not only steps)."""
        if self.collectives.backend == "none":
            return n_train
        count = _UNKNOWN if n_train == math.inf else int(n_train)
        fewest = self.collectives.agree([count], "min")
        return math.inf if fewest[0] == _UNKNOWN else fewest[0]

    def start_epoch(
        self, items: Iterator[tuple[int, Any]], first: int, boundary: Callable[[int], bool]
    ) -> Iterator[tuple[int, Any]]:
        """The epoch's ``(batch_idx, batch)`` pairs. At world size > 1 they are read ahead
        (``DataAhead``) so that a rank votes "my data ends" in the backward of its last step;
        the votes are read as late as the stop votes (``lag`` steps), so the first windows are
        agreed once here: the fewest complete windows any rank has, up to 1 + lag."""
        self._ends, self._steps_left, self.data_ended = False, None, False
        if self.collectives.backend == "none":  # one process: its loop ends with its data
            return items
        if self.vote is not None:
            self.vote.new_epoch()
        ahead = DataAhead(items, boundary, 1 + (self.vote.lag if self.vote else 0))
        windows = self.collectives.agree([ahead.windows_after(first - 1)], "min")[0]
        if windows == 0:  # a rank has not one complete window: no step this epoch
            return iter(())
        if windows < ahead.depth:  # ends before the first vote can be read
            self._steps_left = windows
        return ahead  # its loader's workers end with the epoch's block (workers.reading)

    def before_step(self, items: Iterator[tuple[int, Any]], batch_idx: int) -> None:
        """Before a batch's forward: at a step's last batch, cast whether this rank's data
        ends too soon for another ``1 + lag`` complete windows (then every rank leaves after
        the step whose votes are read next)."""
        ahead = items if isinstance(items, DataAhead) else None
        if ahead is None or not ahead.boundary(batch_idx):
            return
        ends = ahead.windows_after(batch_idx) < ahead.depth
        if self.vote is not None:
            self.vote.cast(1, ends)
        else:
            self._ends = ends

    def attach_vote(self, router: Any, device: torch.device) -> None:
        """Carry votes in ``router``'s gradient all-reduce once DDP wraps it (no collective of
        their own). One process has nothing to agree with."""
        if self.collectives.backend == "none":
            return
        self.vote = StopVote(device, self.collectives.recorder, self.collectives.timeout)
        router.attach(self.vote)

    def watch_loss(self, loss: torch.Tensor, step: int) -> None:
        """Note whether a micro-batch's ``loss`` of optimizer step ``step`` is finite, on its
        device and without waiting for it; the first non-finite one votes to stop from this
        backward on (the vote is cast before backward reads the ballot). Three tensor ops
        per micro-batch, and the vote's copy: which loss it was is looked up only once one
        was not finite."""
        if self.rank is None:
            return
        value = loss.detach()
        bad = self._bad
        if bad is None:
            bad = self._bad = torch.zeros((), dtype=torch.bool, device=value.device)
        finite = torch.isfinite(value)
        if value.dim():  # a loss that is not a scalar
            finite = finite.all()
        bad.logical_or_(finite.logical_not_())
        recent = self._recent
        recent.append((step, value))
        while recent[0][0] < step - _STEPS_KEPT:
            recent.popleft()
        if self.vote is not None:
            self.vote.cast_nonfinite(bad)

    def nonfinite_losses(self, agreed: bool = False) -> list[tuple[int, int, float]]:
        """Every non-finite loss this rank knows of as ``(rank, step, loss)``: its own first
        one until the stop is agreed, every rank's after (a read of the device: a sync).
        ``agreed``: only what every rank knows alike (nothing before the agreed stop)."""
        if agreed or self._found or self.rank is None or self._bad is None:
            return self._found
        if not bool(self._bad):
            return []
        for step, value in self._recent:
            total = value.double().sum()
            if not torch.isfinite(total):
                return [(self.rank, step, float(total))]
        return [(self.rank, self._recent[0][0], math.nan)]  # older than the steps kept

    def epoch_vote(self, should_stop: bool) -> bool:
        """This rank's vote at an epoch's end: the stop vote, or a non-finite loss (read once
        per epoch here; a GPU reads the stop vote a step late)."""
        return self.local_vote(should_stop) or bool(self.nonfinite_losses())

    def local_vote(self, should_stop: bool) -> bool:
        return should_stop or self.watcher.requested is not None or self._time_up()

    def _time_up(self) -> bool:
        return self.max_time is not None and time.monotonic() >= self._deadline

    def after_step(self, should_stop: bool) -> bool:
        """Whether any rank voted to stop in the last synchronised step; ``data_ended`` is
        read on the same ride: whether a rank's data ends at this step."""
        local = self.local_vote(should_stop)
        if self.vote is None:  # no DDP model to carry it: nothing else synchronised this step
            bad = bool(self.nonfinite_losses())
            stop, ended, bad = map(bool, self.collectives.agree([local, self._ends, bad]))
        else:  # rides the next step's gradient all-reduce
            stop, ended = self.vote.agreed(local), self.vote.data_ended
            bad = self.vote.nonfinite
        if self._steps_left is not None:
            self._steps_left -= 1
            ended = ended or self._steps_left == 0
        self.data_ended = ended
        return stop or bad

    def agreed_signal(self) -> str | None:
        """The stop signal any rank got (SIGINT over SIGTERM), the same on every rank."""
        return self._agreed_causes()[0]

    def _agreed_causes(self) -> tuple[str | None, bool, bool]:
        """The signal any rank got, whether any rank's ``max_time`` ran out and whether any
        rank's loss was not finite: one agreement, the same on every rank."""
        bad = bool(self.nonfinite_losses())
        mine = [_SIGNALS.index(self.watcher.requested), int(self._time_up()), int(bad)]
        code = self.collectives.all_reduce(torch.tensor(mine, dtype=torch.int32), "max")
        return _SIGNALS[int(code[0].item())], bool(code[1].item()), bool(code[2].item())

    def before_training(self) -> None:
        """A stop asked for during start-up: nothing trained, so nothing to checkpoint."""
        signal_name = self.agreed_signal()
        if signal_name is not None:
            message = f"stopped on {signal_name} before the first training step; nothing was saved"
            log.warning("%s", message)
            raise Preempted(message, signal_name)
        if self.max_time is not None:  # training time starts now
            self._deadline = time.monotonic() + self.max_time

    def for_signal(self, step: int, save: Callable[[], Any], resume: str | None) -> None:
        """After an agreed stop: if a rank's loss was not finite, raise ``NonFiniteLoss``
        without saving; if a rank got a signal, checkpoint (``save``, collective) and raise
        ``Preempted``; if a rank's ``max_time`` ran out, checkpoint and let fit end as usual.
        Global rank 0 says where the checkpoint went (and how to resume)."""
        signal_name, time_up, nonfinite = self._agreed_causes()
        if nonfinite:  # every rank's first non-finite loss: one more gather, on this path only
            gathered = self.collectives.gather_object(self.nonfinite_losses())
            error = NonFiniteLoss([f for found in gathered for f in found], step)
            self._found = error.found  # what a later checkpoint or export is refused for
            raise error
        if signal_name is None and not time_up:
            return
        path = save()
        if signal_name is None:
            log.warning(
                "max_time reached: stopped after step %d (every rank after the same step); "
                "checkpoint written to %s",
                step,
                path,
            )
            return
        command = os.environ.get("DISTTRAIN_RESUME_COMMAND")  # set by the disttrain command
        if command:
            how = f"To resume: {command}"
        elif resume == "auto":
            how = "Run the same command again to resume."
        else:
            how = "Run it again with resume='auto' to resume."
        message = (
            f"stopped on {signal_name} after step {step} (every rank after the same step); "
            f"checkpoint written to {path}. {how}"
        )
        log.warning("%s", message)
        raise Preempted(message, signal_name)


class DataAhead:
    """An epoch's ``(batch_idx, batch)`` pairs, read ahead far enough to tell whether
    ``depth`` complete accumulation windows (each ending where ``boundary`` is true) follow a
    batch. The same batches in the same order: a batch is only drawn a window or two earlier,
    held here (host memory) until its turn."""

    def __init__(
        self, items: Iterator[tuple[int, Any]], boundary: Callable[[int], bool], depth: int
    ) -> None:
        self._items, self.boundary, self.depth = items, boundary, depth
        self._read: collections.deque[tuple[int, Any]] = collections.deque()

    def __iter__(self) -> DataAhead:
        return self

    def __next__(self) -> tuple[int, Any]:
        return self._read.popleft() if self._read else next(self._items)

    def windows_after(self, batch_idx: int) -> int:
        """How many complete windows (at most ``depth``) end after ``batch_idx``."""
        count = sum(1 for i, _ in self._read if i > batch_idx and self.boundary(i))
        while count < self.depth:
            item = next(self._items, None)
            if item is None:
                break
            self._read.append(item)
            count += item[0] > batch_idx and self.boundary(item[0])
        return min(count, self.depth)
