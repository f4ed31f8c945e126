"""``Trainer``: fit, validate and test a :class:`disttrain.Module`, one loop for every backend.

The trainer holds a run's options, ranks and what hooks may read (epoch, step, metrics); the
loop itself is ``disttrain.loop.fit`` and ``disttrain.loop.evaluation``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from disttrain.api.datamodule import DataModule
from disttrain.api.module import Module
from disttrain.callbacks.base import Callback
from disttrain.callbacks.model_checkpoint import ModelCheckpoint
from disttrain.checkpoint.format import Progress
from disttrain.checkpoint.snapshot import export, save
from disttrain.config.options import TrainerConfig
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv, select_device
from disttrain.loggers import Logger, make_loggers
from disttrain.loop import optim, strategy
from disttrain.loop.evaluation import run_evaluation
from disttrain.loop.fit import fit
from disttrain.loop.precision import autocast_context
from disttrain.loop.seeding import seed_for_run
from disttrain.observe.console import configure_logging, writes_run_output
from disttrain.observe.flight import FlightRecorder
from disttrain.observe.metrics import Reporter
from disttrain.observe.profiler import SimpleProfiler
from disttrain.observe.progress import ProgressBar
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Action

log = logging.getLogger("disttrain.trainer")


class Trainer:
    """Runs a module's hooks and steps on every rank of a torchrun job, or in one process.

    Options are those of :class:`disttrain.TrainerConfig`, as keyword arguments or as a config
    object (``Trainer(config)``). Ranks, backend and device come from torchrun's environment,
    read once here; without it the trainer runs a single debug process with the same hooks.

    ``seed`` (default 0) seeds Python's, torch's and NumPy's generators here, when the trainer
    is built; if you seeded them first (``disttrain.seed_everything``, ``torch.manual_seed``)
    and pass no ``seed``, your seeding stands and is the run's seed. ``trainer.seed`` says
    which seed the run uses. Build the model after the trainer, or seed before building it,
    for the same initial weights in every run (``fit`` warns otherwise).
    """

    def __init__(
        self,
        config: TrainerConfig | None = None,
        *,
        resolved_config: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("give Trainer either a TrainerConfig or keyword options, not both")
        self.config = config if config is not None else TrainerConfig.from_mapping(options)
        self.resolved_config = resolved_config  # written to the run directory as config.yaml
        self.env = DistEnv.from_environ()
        configure_logging(self.env.rank)
        explicit = "seed" in options or self.config.seed != TrainerConfig.seed
        self.seed = seed_for_run(self.config.seed, explicit)  # the user's seeding stands
        self.device = select_device(self.config.accelerator, self.env)
        cfg = self.config
        self.callbacks: list[Callback] = list(cfg.callbacks)
        if cfg.enable_checkpointing and not any(
            isinstance(c, ModelCheckpoint) for c in self.callbacks
        ):
            self.callbacks.append(ModelCheckpoint())
        if cfg.enable_progress_bar and writes_run_output(self.env.rank):
            self.callbacks.append(ProgressBar(cfg.log_every_n_steps))
        logger = make_loggers(cfg.logger, cfg.default_root_dir, self.env.rank)
        self.reporter = Reporter(logger, cfg.log_every_n_steps, cfg.sync_step_metrics)
        self.flight = FlightRecorder(self.env.rank)
        self.flight.progress = self
        self.flight.directory = Path(cfg.default_root_dir) / "flight"
        self.profiler = SimpleProfiler() if cfg.profiler == "simple" else None
        self.profile_report: str | None = None
        self.current_epoch = 0
        self.global_step = 0
        self.sanity_checking = False
        self.should_stop = False  # set it (on any rank) to stop every rank after an agreed step
        self.at_step_boundary = False  # during on_batch_end: did the optimizers just step?
        self.num_training_batches: int | float = 0
        self.module: Module | None = None
        self.datamodule: DataModule | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[optim.SchedulerEntry] = []
        self.scaler: torch.amp.GradScaler | None = None
        self._autocast = autocast_context(self.config.precision, self.device)
        self._collectives: Collectives = Collectives()
        self._dispatcher: Dispatcher | None = None
        self._next_batch, self._epoch_finished = 0, False
        self._data_position: Callable[[], dict] | None = None  # a stream's, for checkpoints
        # a resharded epoch's samples trained, for checkpoints (fit sets it: data/samplers.py)
        self._count_samples: Callable[[int, int], int | None] | None = None
        self._step: strategy.Step | None = None  # how fit reaches the model (set in fit)

    @property
    def collectives(self) -> Collectives:
        """The run's collectives (a null object in one process and outside a run)."""
        return self._collectives

    @property
    def sharded(self) -> bool:
        """Whether this fit holds the module sharded (FSDP): checkpoints are then DCP shards."""
        return self._step is not None and self._step.sharded

    @property
    def running_module(self) -> Module:
        """The module being fit, validated or tested (an error outside a run)."""
        if self.module is None:
            raise RuntimeError("no module: fit, validate or test is not running")
        return self.module

    @property
    def running_limited_hook(self) -> str | None:
        """The hook running now if it runs on some ranks only (``prepare_data``): ``log`` and
        collectives there would wait for ranks that never come."""
        return self._dispatcher.running_limited_hook if self._dispatcher is not None else None

    @property
    def global_rank(self) -> int:
        return self.env.rank

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def node_rank(self) -> int:
        return self.env.node_rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def backend(self) -> str:
        """``"nccl"``, ``"gloo"``, or ``"none"`` in a single process / outside a run."""
        return self._collectives.backend

    @property
    def logger(self) -> Logger:
        """The run's logger (``NullLogger`` on ranks that write nothing)."""
        return self.reporter.logger

    @property
    def callback_metrics(self) -> dict[str, float]:
        """Reduced metrics: what callbacks (checkpoint monitor, early stopping) decide on."""
        return self.reporter.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, float]:
        return self.reporter.logged_metrics

    def progress_bar_metrics(self) -> dict[str, float]:
        return self.reporter.progress_bar_metrics()

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go and where ``resume="auto"`` looks for them."""
        callback = self.checkpoint_callback
        if callback is not None:
            return callback.directory(self)
        return Path(self.config.default_root_dir) / "checkpoints"

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place across ranks and return it (a no-op in one process).

        A collective: call it only from hooks that run on every rank, at the same point.
        """
        return self._collectives.all_reduce(tensor, op)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint of the run as it stands (at an optimizer step) to ``path``.

        Collective: call it on every rank at the same point (from a hook that runs on all
        ranks); global rank 0 writes the file atomically (under FSDP every rank writes its
        shards and rank 0 completes the directory), and the call returns on every rank once
        the checkpoint is complete.
        """
        epoch, batch = self.current_epoch, self._next_batch
        samples = self._count_samples(epoch, batch) if self._count_samples else None
        progress = Progress(epoch, self.global_step, batch, self._epoch_finished, samples)
        saved = save(self, self._running("save_checkpoint"), path, progress)
        self.logger.save()  # the history as far as the checkpoint: a resume keeps it
        return saved

    def export_weights(self, path: str | os.PathLike) -> Path:
        """The whole module's weights as one ``torch.save`` file for inference (under FSDP
        gathered from the shards). Collective; global rank 0 writes."""
        return export(self, self._running("export_weights"), path)

    def manage_files(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on global rank 0 only, the one rank that creates and deletes
        files in the run directory; every rank returns its result. Collective."""
        return self._running("manage_files").run(Action.MANAGE_FILES, fn, *args)

    def _running(self, what: str) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError(f"Trainer.{what} can only be called while fit/validate/test runs")
        return self._dispatcher

    def fit(self, module: Module, datamodule: DataModule | None = None) -> None:
        """Train ``module``: the lifecycle of ``docs/lifecycle.md`` on every rank
        (``disttrain.loop.fit``, level by level).

        Dataloaders come from ``datamodule`` where it defines them, else from ``module``. With
        ``resume`` (or after an elastic restart) training goes on from a checkpoint exactly
        where it stopped. On SIGTERM or Ctrl-C every rank stops after the same optimizer step,
        a checkpoint is written and ``Preempted`` is raised.
        """
        fit(self, module, datamodule)

    def validate(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the validation loop once over all of ``val_dataloader`` on every rank; with
        ``resume`` (``auto`` or a path) on the weights of that checkpoint.

        Returns what ``validation_epoch_end`` returned on this rank.
        """
        return run_evaluation(self, module, datamodule, "validate")

    def test(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the test loop once over all of ``test_dataloader`` on every rank (Lightning 0.8
        tested on rank 0 only; here every rank takes its shard). Returns what
        ``test_epoch_end`` returned on this rank."""
        return run_evaluation(self, module, datamodule, "test")
