"""A run's session: join the process group, attach the module, leave cleanly."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import Callback
from disttrain.api.module import Module
from disttrain.callbacks.model_checkpoint import ModelCheckpoint
from disttrain.checkpoint.format import plain_config
from disttrain.dist.collectives import Collectives, connect
from disttrain.dist.heartbeat import HeartbeatTimes
from disttrain.loop.run import Run
from disttrain.loop.signals import Preempted
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import hook_schedule
from disttrain.storage.atomic import atomic_write_text

# seconds start-up's long waits (the rendezvous, setup's verdict, loading a checkpoint) may
# take, unless prepare_data_timeout says otherwise
START_UP_TIMEOUT = 7200.0


@contextlib.contextmanager
def open_session(run: Run, module: Module, datamodule: DataModule | None) -> Iterator[Dispatcher]:
    """Everything fit/validate/test/predict share around their hooks; the group is always left, and
    a failure leaves this rank's flight-recorder trace in the run directory."""
    cfg, flight = run.config, run.flight
    heartbeat = HeartbeatTimes(
        cfg.prepare_data_heartbeat, cfg.prepare_data_heartbeat_timeout, cfg.prepare_data_timeout
    )
    long_timeout = cfg.prepare_data_timeout or START_UP_TIMEOUT
    run.collectives = connect(run.env, run.device, cfg.timeout, long_timeout, flight, heartbeat)
    flight.failed = False
    previous_usr1 = flight.install_signal()
    try:
        module.trainer = run.trainer
        run.module, run.datamodule, run.should_stop = module, datamodule, False
        run.callbacks = with_module_callbacks(run.callbacks, module.configure_callbacks())
        run.dispatcher = dispatcher = Dispatcher(
            hook_schedule(cfg.prepare_data_per_node),
            module,
            run.callbacks,
            run.trainer,
            run.env,
            run.collectives,
            datamodule,
            flight,
            run.profiler,
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
        run.dispatcher, run.step = None, None
        run.checkpoint_writes.close()  # before the group goes: DCP's writes may still use it
        run.collectives.close()
        run.collectives = Collectives()


def with_module_callbacks(callbacks: list[Callback], own: Any) -> list[Callback]:
    """The trainer's callbacks with those ``configure_callbacks`` returned, as Lightning merges
    them: a module's callback replaces the trainer's of its class (or a base class of it), and
    checkpoint callbacks go last, so they save after the others ran."""
    own = [own] if isinstance(own, Callback) else list(own or [])
    if not own:
        return callbacks
    replaced = {type(cb) for cb in callbacks if any(isinstance(o, type(cb)) for o in own)}
    replaced.discard(Callback)
    merged = [cb for cb in callbacks if type(cb) not in replaced] + own
    checkpoints = [cb for cb in merged if isinstance(cb, ModelCheckpoint)]
    return [cb for cb in merged if not isinstance(cb, ModelCheckpoint)] + checkpoints


def hyperparams(run: Run) -> dict[str, Any]:
    """What the logger records as the run's hyperparameters."""
    if run.resolved_config is not None:
        return dict(run.resolved_config)
    return plain_config(run)


def write_run_files(run: Run, stage: str = "fit") -> None:
    """Global zero's part of starting a run: the resolved config, to repeat the run from.

    ``fit`` writes ``RUN_DIR/config.yaml``, with ``trainer.resume`` reset to null: the file
    repeats the run from scratch (``disttrain fit --config RUN_DIR/config.yaml``) instead of
    resuming a finished run and training nothing. ``validate``, ``test`` and ``predict`` leave
    it alone and write ``RUN_DIR/{stage}.config.yaml``, resume included: the record of which
    checkpoint they evaluated. A ``fast_dev_run`` writes nothing.
    """
    if run.resolved_config is None or run.config.fast_dev_run:
        return
    resolved = dict(run.resolved_config)
    name = "config.yaml" if stage == "fit" else f"{stage}.config.yaml"
    if stage == "fit" and "trainer" in resolved:
        resolved["trainer"] = {**resolved["trainer"], "resume": None}
    text = yaml.safe_dump(resolved, sort_keys=False)
    atomic_write_text(Path(run.config.default_root_dir) / name, text)
