"""A monitored metric that is never logged (a typo) is an error, not a silent no-op.

``ModelCheckpoint(monitor=...)`` and ``EarlyStopping(monitor=...)`` read their key from
``trainer.callback_metrics``. Once an epoch has ended with a validation, every metric the run
logs exists there (validation's and the training epoch's), so a key still missing then never
will be: the next ``on_epoch_start`` (or ``on_train_end``) raises, naming the keys that were
logged. A run that never validated only gets a warning at its end: its validation may simply
not have come round yet.
"""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from disttrain.api.state import TrainerState

log = logging.getLogger("disttrain.callbacks")


class MonitorError(ValueError):
    """A callback monitors a key that the run never logs."""


class MonitorWatch:
    """Watches, for the callback ``owner``, whether ``monitor`` ever appears."""

    def __init__(self, owner: str, monitor: str) -> None:
        self.owner, self.monitor = owner, monitor
        self._validated = False  # in the current epoch, outside the sanity check
        self._epoch_with_validation_ended = False
        self._epoch_ended = False

    def validation_ended(self, trainer: TrainerState) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def epoch_ended(self) -> None:
        self._epoch_ended = True
        self._epoch_with_validation_ended |= self._validated
        self._validated = False

    def check(self, trainer: TrainerState, at_end: bool = False) -> None:
        """Raise ``MonitorError`` if the key should exist by now and does not."""
        metrics = trainer.callback_metrics
        if self.monitor in metrics or not self._epoch_ended:
            return
        message = self._message(sorted(metrics))
        if self._epoch_with_validation_ended:
            raise MonitorError(message)
        if at_end:
            log.warning("%s (no validation ran in this fit)", message)

    def _message(self, logged: list[str]) -> str:
        close = difflib.get_close_matches(self.monitor, logged, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (
            f"{self.owner}(monitor='{self.monitor}'): the run never logged '{self.monitor}'"
            f"{hint}; logged: {', '.join(logged) or 'nothing'}. Log it with self.log(...) or "
            "return it from validation_epoch_end, or monitor one of these."
        )
