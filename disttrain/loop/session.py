"""A run's session: seed, join the process group, attach the module, leave cleanly."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from disttrain.checkpoint.format import plain_config
from disttrain.dist.collectives import Collectives, connect
from disttrain.loop.signals import Preempted
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import hook_schedule
from disttrain.storage.atomic import atomic_write_text

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.loop.trainer import Trainer


@contextlib.contextmanager
def open_session(trainer: Trainer, module: Any, datamodule: Any) -> Iterator[Dispatcher]:
    """Everything fit/validate/test share around their hooks; the group is always left, and
    a failure leaves this rank's flight-recorder trace in the run directory."""
    cfg = trainer.config
    flight = trainer.flight
    trainer._collectives = connect(
        trainer.env, trainer.device, cfg.timeout, cfg.prepare_data_timeout, flight
    )
    flight.failed = False
    previous_usr1 = flight.install_signal()
    try:
        module._trainer = trainer
        trainer.module, trainer.datamodule = module, datamodule
        trainer.should_stop = False
        trainer._dispatcher = dispatcher = Dispatcher(
            hook_schedule(cfg.prepare_data_per_node),
            module,
            trainer.callbacks,
            trainer,
            trainer.env,
            trainer._collectives,
            datamodule,
            flight,
            trainer.profiler,
        )
        yield dispatcher
    except Preempted:
        raise
    except BaseException as exc:  # a timeout, a hook that raised: leave a trace
        flight.dump(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        raise
    finally:
        if previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, previous_usr1)
        trainer._dispatcher = None
        trainer._step = None
        trainer._collectives.close()
        trainer._collectives = Collectives()


def hyperparams(trainer: Trainer) -> dict[str, Any]:
    """What the logger records as the run's hyperparameters."""
    if trainer.resolved_config is not None:
        return dict(trainer.resolved_config)
    return plain_config(trainer)


def write_run_files(trainer: Trainer, stage: str = "fit") -> None:
    """Global zero's part of starting a run: the resolved config, to repeat the run from.

    ``fit`` writes ``RUN_DIR/config.yaml``, with ``trainer.resume`` reset to null: the file
    repeats the run from scratch (``disttrain fit --config RUN_DIR/config.yaml``) instead of
    resuming a finished run and training nothing. ``validate`` and ``test`` leave it alone and
    write ``RUN_DIR/validate.config.yaml`` / ``test.config.yaml``, resume included: the record
    of which checkpoint they evaluated.
    """
    if trainer.resolved_config is None:
        return

    resolved = dict(trainer.resolved_config)
    name = "config.yaml" if stage == "fit" else f"{stage}.config.yaml"
    if stage == "fit" and "trainer" in resolved:
        resolved["trainer"] = {**resolved["trainer"], "resume": None}
    text = yaml.safe_dump(resolved, sort_keys=False)
    atomic_write_text(Path(trainer.config.default_root_dir) / name, text)
