"""The ``Logger`` a tracker implements, the null one other ranks hold, and a group of them.

What the trainer does with a logger, in order: ``set_run_dir`` when the trainer is built (on
every rank); then, on global rank 0 only, ``resume_from`` and ``log_hyperparams`` when ``fit``
starts, ``log_metrics`` at the log points (every ``log_every_n_steps`` optimizer steps, the end
of each validation loop and of each epoch), ``save`` at each checkpoint and epoch end, and
``finalize()`` after ``on_train_end`` (and at the end of ``validate``/``test``). On the other
ranks the trainer holds a ``NullLogger`` standing in for it and never touches the logger
itself: that is why a logger must create nothing (no file, no run, no connection) when it is
constructed, since a script builds it on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Logger:
    """Where metrics go: subclass it for your own tracker.

    Implement ``log_metrics`` and ``log_hyperparams``; override ``experiment`` (the
    tracker's own object, created on first use), and as needed ``resume_from``, ``save`` and
    ``finalize``. Construct nothing in ``__init__`` that touches the disk or the network:
    create it in ``experiment`` (only global rank 0 ever calls it). Every file the logger
    writes goes under ``save_dir`` (given, or by default the trainer's run directory).
    """

    _given_dir: Path | None = None  # save_dir as the user gave it
    _run_dir: Path | None = None  # the trainer's run directory (set_run_dir)

    def __init__(self, save_dir: str | Path | None = None) -> None:
        self._given_dir = None if save_dir is None else Path(save_dir)

    @property
    def name(self) -> str:
        """A short name for messages (``csv``, ``mlflow``, ...)."""
        return type(self).__name__

    def set_run_dir(self, run_dir: str | Path) -> None:
        """The trainer's run directory; called on every rank when the trainer is built.
        A logger built without ``save_dir`` saves there. Must create nothing."""
        self._run_dir = Path(run_dir)

    @property
    def save_dir(self) -> Path | None:
        """The directory every file of this logger goes under (nothing is created here)."""
        return self._given_dir if self._given_dir is not None else self._run_dir

    @property
    def log_dir(self) -> Path | None:
        """Where this run's files are (a folder of ``save_dir``, or ``save_dir`` itself)."""
        return self.save_dir

    @property
    def loggers(self) -> list[Logger]:
        """Every logger this one stands for: ``[self]``, or a group's members."""
        return [self]

    @property
    def experiment(self) -> Any:
        """The tracker's own object (a ``SummaryWriter``, an MLflow client, a W&B run),
        created on first use, on global rank 0 only."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` (reduced where the trainer reduces) at optimizer step ``step``."""
        raise NotImplementedError

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Record the run's configuration (a nested dict of plain values)."""
        raise NotImplementedError

    def resume_from(self, step: int | None) -> None:
        """Join the run directory's history; ``fit`` calls it once, before training.

        ``step`` is the optimizer step training goes on after (the resumed checkpoint's
        ``global_step``): what was logged up to and including it is kept, and training logs
        again from ``step + 1``. ``None``, a fresh fit, starts a new history (a new run of
        the tracker). Without this call (validate, test) what is logged is added to the
        history as it stands.
        """

    def save(self) -> None:
        """Make what was logged so far durable (at each checkpoint and epoch end)."""

    def finalize(self, status: str = "success") -> None:
        """Flush and close (``status``: ``"success"``); called after ``on_train_end`` and at
        the end of validate/test. A later call to ``log_metrics`` may open it again."""
        self.save()


class _Absorb:
    """Accepts any call, any attribute, and does nothing."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return None


class NullLogger(Logger):
    """What ranks other than global 0 hold (and every rank with ``logger=False``): every
    call does nothing, ``experiment`` accepts any call, so code that logs runs unchanged on
    every rank. ``save_dir`` and ``log_dir`` are those of the logger it stands for."""

    experiment = _Absorb()

    def __init__(self, stands_for: Logger | None = None) -> None:
        super().__init__()
        self._for = stands_for

    @property
    def name(self) -> str:
        return "none" if self._for is None else self._for.name

    @property
    def save_dir(self) -> Path | None:
        return None if self._for is None else self._for.save_dir

    @property
    def log_dir(self) -> Path | None:
        return None if self._for is None else self._for.log_dir

    @property
    def loggers(self) -> list[Logger]:
        if self._for is None:
            return []
        return [NullLogger(logger) for logger in self._for.loggers]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


class LoggerGroup(Logger):
    """Several loggers as one (``logger=[...]``): each call goes to every member, in order.
    ``experiment``, ``save_dir`` and ``log_dir`` are the first member's; index or iterate
    the group (or read ``loggers``) to reach the others."""

    def __init__(self, loggers: list[Logger]) -> None:
        super().__init__()
        if not loggers:
            raise ValueError("LoggerGroup needs at least one logger")
        self._members = list(loggers)

    @property
    def name(self) -> str:
        return "+".join(logger.name for logger in self._members)

    @property
    def loggers(self) -> list[Logger]:
        return list(self._members)

    def __getitem__(self, index: int) -> Logger:
        return self._members[index]

    def __iter__(self) -> Iterator[Logger]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def set_run_dir(self, run_dir: str | Path) -> None:
        for logger in self._members:
            logger.set_run_dir(run_dir)

    @property
    def save_dir(self) -> Path | None:
        return self._members[0].save_dir

    @property
    def log_dir(self) -> Path | None:
        return self._members[0].log_dir

    @property
    def experiment(self) -> Any:
        return self._members[0].experiment

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self._members:
            logger.log_metrics(metrics, step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        for logger in self._members:
            logger.log_hyperparams(params)

    def resume_from(self, step: int | None) -> None:
        for logger in self._members:
            logger.resume_from(step)

    def save(self) -> None:
        for logger in self._members:
            logger.save()

    def finalize(self, status: str = "success") -> None:
        for logger in self._members:
            logger.finalize(status)


def flatten(params: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"trainer": {"max_epochs": 3}}`` as ``{"trainer/max_epochs": 3}`` (for trackers
    whose parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat
