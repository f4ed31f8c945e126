"""``Run``: one trainer's run, the one owner of everything the loop reads and changes.

The ``Trainer`` is a façade over it: its public properties read the run, and the loop's
levels (``fit.py``, ``evaluation.py``, ``session.py``) and the checkpoint code receive the run
itself. Three kinds of state live here, each once:

- what the run is: its options, where this process stands (rank, device), its callbacks,
  reporter, flight recorder and profiler (built when the trainer is);
- where the loop stands: epoch, step, the next batch of the epoch, the agreed-stop flag;
- what a session holds while fit, validate, test or predict runs: the collectives, the dispatcher,
  the module, and for fit the wrapped step, optimizers, schedulers and scaler.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import Callback
from disttrain.api.module import Module
from disttrain.api.state import TrainerState
from disttrain.callbacks.model_checkpoint import ModelCheckpoint
from disttrain.callbacks.progress import ProgressBar
from disttrain.checkpoint.background import CheckpointWrites
from disttrain.checkpoint.format import Progress
from disttrain.checkpoint.snapshot import export, save
from disttrain.config.layout import resolve_layout
from disttrain.config.options import TrainerConfig
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv, select_device, set_data_place
from disttrain.dist.flight import FlightRecorder
from disttrain.dist.fsdp import is_sharded
from disttrain.dist.mesh import Layout
from disttrain.loggers import Logger, make_loggers
from disttrain.loop.optim import SchedulerEntry
from disttrain.loop.precision import autocast_context, input_converter, param_dtype
from disttrain.loop.strategy import Step
from disttrain.observe.console import configure_logging, writes_run_output
from disttrain.observe.metrics import Reporter
from disttrain.observe.profiler import SimpleProfiler
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Action, hook_schedule
from disttrain.rng import seed_for_run, use_deterministic
from disttrain.storage.location import Location, Where

log = logging.getLogger("disttrain.run")


class Run:
    """One trainer's run (see the module docstring). ``trainer`` is the façade callbacks and
    hooks receive."""

    def __init__(
        self,
        config: TrainerConfig,
        resolved_config: Mapping[str, Any] | None,
        explicit_seed: bool,
        trainer: TrainerState,
    ) -> None:
        config = _for_dev_run(config)
        self.config, self.resolved_config, self.trainer = config, resolved_config, trainer
        self.env = DistEnv.from_environ()
        configure_logging(self.env.rank)
        if config.fast_dev_run:
            n = config.limit_train_batches
            log.info(
                "fast_dev_run: %d batch%s each of training, validation and test, one epoch, no "
                "sanity check; no checkpoints, no logger, no run files are written",
                n,
                "" if n == 1 else "es",
            )
        self.seed = seed_for_run(config.seed, explicit_seed)  # the user's seeding stands
        use_deterministic(config.deterministic)
        self.device = select_device(config.accelerator, self.env)
        self.callbacks: list[Callback] = _callbacks(config, self.env.rank)
        logger = make_loggers(config.logger, config.default_root_dir, self.env.rank)
        self.reporter = Reporter(logger, config.log_every_n_steps, config.sync_step_metrics)
        self.layout = self._laid_out()  # the device mesh's sizes, if any
        self.flight = FlightRecorder(self.env.rank)
        self.flight.progress = self
        self.flight.directory = Path(config.default_root_dir) / "flight"
        self.profiler = SimpleProfiler() if config.profiler == "simple" else None
        self.profile_report: str | None = None
        self.autocast = autocast_context(config.precision, self.device)
        self.param_dtype = param_dtype(config.precision)  # *-true: the module's dtype
        self.convert_input = input_converter(config.precision)  # *-true: a batch's floats
        # where the loop stands
        self.current_epoch = 0
        self.global_step = 0
        self.next_batch = 0  # the first batch of the current epoch not yet trained
        self.epoch_finished = False  # validation and the epoch-end hooks of it have run
        self.sanity_checking = False
        self.should_stop = False
        self.at_step_boundary = False
        self.num_training_batches: int | float = 0
        self.predict_batch_indices: list[int] | None = None  # of the batch predicted now
        # what the running session holds
        self.collectives: Collectives = Collectives()
        self.checkpoint_writes = CheckpointWrites()  # async_checkpointing's writes in flight
        self.dispatcher: Dispatcher | None = None
        self.module: Module | None = None
        self.datamodule: DataModule | None = None
        self.step: Step | None = None  # how fit reaches the model
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[SchedulerEntry] = []
        self.scaler: torch.amp.GradScaler | None = None
        self.data_position: Callable[[], dict] | None = None  # a stream's, for checkpoints
        # (rank, step, loss) of the non-finite losses this rank knows of (stop_on_nonfinite_loss)
        self.nonfinite_losses: Callable[..., list[tuple[int, int, float]]] | None = None
        # a resharded epoch's samples trained, for checkpoints (data/samplers.py)
        self.count_samples: Callable[[int, int], int | None] | None = None

    # -- where this process stands ---------------------------------------------------------
    @property
    def global_rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def _laid_out(self) -> Layout | None:
        """The device mesh's sizes, and what follows from them: the data share streams read
        (published for loader workers), one rank per data group in the metrics' reductions."""
        layout = resolve_layout(self.config, self.env)
        self.reporter.replicas = layout.tp if layout else 1
        data_rank = self.env.rank if layout is None else layout.data_rank(self.env.rank)
        data_world_size = self.env.world_size if layout is None else layout.data_world_size
        set_data_place(data_rank, data_world_size, self.env)
        return layout

    @property
    def data_rank(self) -> int:
        """Which share of the data this rank reads: its global rank, or under tensor
        parallelism its data-parallel rank (a data group's ``tp`` ranks read the same)."""
        return self.env.rank if self.layout is None else self.layout.data_rank(self.env.rank)

    @property
    def data_world_size(self) -> int:
        """Into how many shares the data is split: the world size, or the data-parallel ranks."""
        return self.env.world_size if self.layout is None else self.layout.data_world_size

    @property
    def logger(self) -> Logger:
        return self.reporter.logger

    @property
    def callback_metrics(self) -> dict[str, float]:
        return self.reporter.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, float]:
        return self.reporter.logged_metrics

    @property
    def fit_step(self) -> Step:
        """How fit reaches the model (an error outside fit)."""
        if self.step is None:
            raise RuntimeError("no training step: fit is not running")
        return self.step

    @property
    def sharded(self) -> bool:
        """Whether this fit holds the module sharded (FSDP): checkpoints are then DCP shards."""
        return self.step is not None and self.step.sharded

    @property
    def running_module(self) -> Module:
        """The module being fit, validated or tested (an error outside a run)."""
        if self.module is None:
            raise RuntimeError("no module: fit, validate, test or predict is not running")
        return self.module

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)

    @property
    def checkpoint_dir(self) -> Location:
        """Where checkpoints go and where ``resume="auto"`` looks for them."""
        callback = self.checkpoint_callback
        if callback is not None:
            return callback.directory(self.trainer)
        return Location.at(self.config.default_root_dir) / "checkpoints"

    def progress(self) -> Progress:
        """Where the loop stands, as a checkpoint records it (always at an optimizer step)."""
        epoch, batch = self.current_epoch, self.next_batch
        samples = self.count_samples(epoch, batch) if self.count_samples else None
        return Progress(epoch, self.global_step, batch, self.epoch_finished, samples)

    # -- what hooks may ask the run to do (collectives: every rank, at the same point) ------
    def running(self, what: str) -> Dispatcher:
        if self.dispatcher is None:
            raise RuntimeError(f"Trainer.{what} can only be called while fit/validate/test runs")
        return self.dispatcher

    def save_checkpoint(
        self, path: Where, after_write: Callable[[], Any] | None = None
    ) -> Location:
        self.running("save_checkpoint")
        saved = save(self, path, self.progress(), after_write)
        self.logger.save()  # the history as far as the checkpoint: a resume keeps it
        return saved

    def export_weights(self, path: Where) -> Location:
        if self.dispatcher is not None:  # while fit/validate/test runs: collective
            return export(self, path)
        return export(self, path, self._after_session("export_weights"))

    def _after_session(self, what: str) -> Dispatcher:
        """Once fit/validate/test has returned: a dispatcher for the module that is left, with
        no collectives (the process group is gone), so the table still decides which rank
        writes and no rank waits for another."""
        module = self.module
        if module is None:
            raise RuntimeError(
                f"Trainer.{what}: no module: call it during or after fit, validate or test"
            )
        if is_sharded(module):
            raise RuntimeError(
                f"Trainer.{what} after fit under strategy='fsdp': the module's shards need the "
                f"process group, which fit closed. Call trainer.{what}(path) inside fit (from "
                "on_train_end, on every rank), or load the run's checkpoint directory with "
                f"{type(module).__name__}.load_from_checkpoint(path)."
            )
        schedule = hook_schedule(self.config.prepare_data_per_node)
        return Dispatcher(schedule, module, self.callbacks, self.trainer, self.env, Collectives())

    def manage_files(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.running("manage_files").run(Action.MANAGE_FILES, fn, *args)

    def finish_checkpoint_writes(self) -> None:
        """Wait until every checkpoint write in flight is complete (collective; nothing to
        wait for without ``async_checkpointing``)."""
        if self.config.async_checkpointing:
            self.running("save_checkpoint").run(Action.FINISH_WRITES, self.checkpoint_writes.wait)


def _for_dev_run(config: TrainerConfig) -> TrainerConfig:
    """``config`` as ``fast_dev_run`` runs it (unchanged without it)."""
    if not config.fast_dev_run:
        return config
    n = int(config.fast_dev_run)  # True: 1
    return dataclasses.replace(
        config,
        max_epochs=1,
        limit_train_batches=n,
        limit_val_batches=n,
        limit_test_batches=n,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        val_check_interval=None,
        enable_checkpointing=False,
        callbacks=[c for c in config.callbacks if not isinstance(c, ModelCheckpoint)],
        logger=None,
        resume=None,
    )


def _callbacks(config: TrainerConfig, rank: int) -> list[Callback]:
    """The user's callbacks, then those the options add: a checkpoint every epoch (unless one
    is given), and the progress bar on the rank that prints."""
    callbacks: list[Callback] = list(config.callbacks)
    if config.enable_checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(ModelCheckpoint())
    if config.enable_progress_bar and writes_run_output(rank):
        callbacks.append(ProgressBar(config.log_every_n_steps))
    return callbacks
