"""``Trainer``: fit, validate, test and predict with a :class:`disttrain.Module`, one loop for
every backend.

A façade: what hooks and callbacks may read is ``disttrain.api.state.TrainerState``, and every
property here reads the run (``disttrain.loop.run.Run``), the one owner of the loop's state.
The loop itself is ``disttrain.loop.fit``, ``disttrain.loop.evaluation`` and
``disttrain.loop.predict``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from disttrain.api.datamodule import DataModule, given_loaders
from disttrain.api.hooks import Callback
from disttrain.api.module import Module
from disttrain.callbacks.model_checkpoint import ModelCheckpoint
from disttrain.config.options import TrainerConfig
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv
from disttrain.loggers import Logger
from disttrain.loop.devices import check_or_spawn
from disttrain.loop.evaluation import run_evaluation
from disttrain.loop.fit import fit
from disttrain.loop.optim import SchedulerEntry
from disttrain.loop.predict import run_prediction
from disttrain.loop.run import Run
from disttrain.loop.sources import estimated_stepping_batches
from disttrain.observe.metrics import Reporter
from disttrain.observe.profiler import SimpleProfiler
from disttrain.storage.location import Location, Where


class Trainer:
    """Runs a module's hooks and steps on every rank of a torchrun job, or in one process.

    Options are those of :class:`disttrain.TrainerConfig`, as keyword arguments or as a config
    object (``Trainer(config)``). Ranks, backend and device come from torchrun's environment,
    read once here; without it the trainer runs a single debug process with the same hooks.

    ``seed`` (default 0) seeds Python's, torch's and NumPy's generators here, when the trainer
    is built; if you seeded them first (``disttrain.seed_everything``, ``torch.manual_seed``)
    and pass no ``seed``, your seeding stands and is the run's seed. ``trainer.seed`` says
    which seed the run uses. Build the model after the trainer, or seed before building it,
    for the same initial weights in every run (``fit`` warns otherwise). Once the module is
    built and wrapped, each rank reseeds from ``(seed, rank)``: what a rank draws in training
    (dropout, a step's ``torch.randint``) is its own, and a dataset's draws are seeded per
    sample (``docs/data.md``: Random draws).
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
        config = config if config is not None else TrainerConfig.from_mapping(options)
        explicit_seed = "seed" in options or config.seed != TrainerConfig.seed
        check_or_spawn(config.devices, config.num_nodes, DistEnv.from_environ())
        self._run = Run(config, resolved_config, explicit_seed, self)

    # -- the run's options and where this process stands ----------------------------------
    @property
    def config(self) -> TrainerConfig:
        return self._run.config

    @property
    def resolved_config(self) -> Mapping[str, Any] | None:
        """The YAML config a run was built from (written to the run directory), if any."""
        return self._run.resolved_config

    @property
    def env(self) -> DistEnv:
        return self._run.env

    @property
    def device(self) -> torch.device:
        return self._run.device

    @property
    def seed(self) -> int | None:
        return self._run.seed

    @property
    def max_epochs(self) -> int | None:
        """As given: None (1000, or no limit under ``max_steps``), -1 (no limit) or N."""
        return self._run.config.max_epochs

    @property
    def max_steps(self) -> int | None:
        """Optimizer steps the run ends after; None: no limit (``-1`` is read as None)."""
        return self._run.config.max_steps

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps this fit takes (``math.inf`` if unbounded): per-rank batches per
        epoch over the accumulation, times the epochs, capped by ``max_steps``."""
        return estimated_stepping_batches(self._run)

    @property
    def default_root_dir(self) -> str:
        return self._run.config.default_root_dir

    @property
    def global_rank(self) -> int:
        return self._run.env.rank

    @property
    def local_rank(self) -> int:
        return self._run.env.local_rank

    @property
    def node_rank(self) -> int:
        return self._run.env.node_rank

    @property
    def world_size(self) -> int:
        return self._run.env.world_size

    @property
    def collectives(self) -> Collectives:
        """The run's collectives (a null object in one process and outside a run)."""
        return self._run.collectives

    @property
    def backend(self) -> str:
        """``"nccl"``, ``"gloo"``, or ``"none"`` in a single process / outside a run."""
        return self._run.collectives.backend

    @property
    def callbacks(self) -> list[Callback]:
        return self._run.callbacks

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        return self._run.checkpoint_callback

    @property
    def checkpoint_dir(self) -> Location:
        """Where checkpoints go and where ``resume="auto"`` looks for them."""
        return self._run.checkpoint_dir

    # -- where the loop stands -------------------------------------------------------------
    @property
    def current_epoch(self) -> int:
        return self._run.current_epoch

    @property
    def global_step(self) -> int:
        return self._run.global_step

    @property
    def sanity_checking(self) -> bool:
        return self._run.sanity_checking

    @property
    def at_step_boundary(self) -> bool:
        """During ``on_batch_end``: did the optimizers just step?"""
        return self._run.at_step_boundary

    @property
    def num_training_batches(self) -> int | float:
        return self._run.num_training_batches

    @property
    def predict_batch_indices(self) -> list[int] | None:
        """During ``predict``'s batch hooks: the dataset indices of the batch (per rank)."""
        return self._run.predict_batch_indices

    @property
    def should_stop(self) -> bool:
        """Set it (on any rank) to stop every rank after an agreed optimizer step."""
        return self._run.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self._run.should_stop = value

    # -- what a running session holds ------------------------------------------------------
    @property
    def module(self) -> Module | None:
        return self._run.module

    @property
    def datamodule(self) -> DataModule | None:
        return self._run.datamodule

    @property
    def running_module(self) -> Module:
        """The module being fit, validated, tested or predicted with (an error outside a
        run)."""
        return self._run.running_module

    @property
    def running_limited_hook(self) -> str | None:
        """The hook running now if it runs on some ranks only (``prepare_data``): ``log`` and
        collectives there would wait for ranks that never come."""
        dispatcher = self._run.dispatcher
        return dispatcher.running_limited_hook if dispatcher is not None else None

    @property
    def sharded(self) -> bool:
        """Whether this fit holds the module sharded (FSDP): checkpoints are then DCP shards."""
        return self._run.sharded

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._run.optimizers

    @property
    def schedulers(self) -> list[SchedulerEntry]:
        return self._run.schedulers

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self._run.scaler

    # -- metrics -----------------------------------------------------------------------------
    @property
    def reporter(self) -> Reporter:
        return self._run.reporter

    @property
    def logger(self) -> Logger:
        """The run's logger (``NullLogger`` on ranks that write nothing)."""
        return self._run.reporter.logger

    @property
    def loggers(self) -> list[Logger]:
        """Every logger the run writes to (Lightning 2's ``trainer.loggers``)."""
        return self._run.reporter.logger.loggers

    @property
    def callback_metrics(self) -> dict[str, float]:
        """Reduced metrics: what callbacks (checkpoint monitor, early stopping) decide on."""
        return self._run.reporter.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, float]:
        return self._run.reporter.logged_metrics

    def progress_bar_metrics(self) -> dict[str, float]:
        return self._run.reporter.progress_bar_metrics()

    @property
    def profiler(self) -> SimpleProfiler | None:
        """The profiler (``profiler="simple"``), or None: nothing of it exists when off."""
        return self._run.profiler

    @property
    def profile_report(self) -> str | None:
        """The profiler's table at the end of fit (``profiler="simple"``)."""
        return self._run.profile_report

    # -- what hooks may ask (collectives: every rank, at the same point) ---------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place across ranks and return it (a no-op in one process).

        A collective: call it only from hooks that run on every rank, at the same point. Over
        every rank, also under tensor parallelism, where a data group's ``tp`` ranks hold the
        same batches: a sum over samples then counts each ``tp`` times.
        """
        return self._run.collectives.all_reduce(tensor, op)

    def save_checkpoint(
        self, path: Where, after_write: Callable[[], Any] | None = None
    ) -> Location:
        """Write a checkpoint of the run as it stands (at an optimizer step) to ``path``, a
        local path or an fsspec URL (``s3://bucket/run/x.ckpt`` with the ``s3`` extra).

        Collective: call it on every rank at the same point (from a hook that runs on all
        ranks); global rank 0 writes the file atomically (under FSDP every rank writes its
        shards and rank 0 completes the directory), and the call returns on every rank once
        the checkpoint is complete; then global rank 0 calls ``after_write()`` (file work that
        must wait for it, such as deleting older checkpoints).

        With ``async_checkpointing`` it returns once the state is copied to host memory; the
        writes, and ``after_write``, happen in the background, complete before the next save
        starts and before ``fit`` returns (``disttrain.checkpoint.background``).
        """
        return self._run.save_checkpoint(path, after_write)

    def export_weights(self, path: Where) -> Location:
        """The whole module's weights as one ``torch.save`` file for inference (under FSDP
        gathered from the shards). Collective; global rank 0 writes."""
        return self._run.export_weights(path)

    def manage_files(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on global rank 0 only, the one rank that creates and deletes
        files in the run directory; every rank returns its result. Collective."""
        return self._run.manage_files(fn, *args)

    # -- the stages ----------------------------------------------------------------------------
    def fit(
        self,
        module: Module,
        datamodule: DataModule | Any = None,
        *,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``module``: the lifecycle of ``docs/lifecycle.md`` on every rank
        (``disttrain.loop.fit``, level by level).

        Dataloaders come from ``datamodule`` where it defines them, else from ``module``;
        ``train_dataloaders``/``val_dataloaders`` (Lightning's keywords; a DataLoader as the
        second argument is taken as the training one) replace the module's. With ``resume``
        or ``ckpt_path`` (the same, for this fit; ``"last"`` is ``"auto"``), or after an
        elastic restart, training goes on from a checkpoint exactly where it stopped. On
        SIGTERM or Ctrl-C every rank stops after the same optimizer step, a checkpoint is
        written and ``Preempted`` is raised.
        """
        if datamodule is not None and not isinstance(datamodule, DataModule):
            if train_dataloaders is not None:
                raise TypeError(
                    "Trainer.fit: the second argument is the datamodule; "
                    f"got a {type(datamodule).__name__} and train_dataloaders"
                )
            datamodule, train_dataloaders = None, datamodule  # fit(model, train_loader)
        if train_dataloaders is not None or val_dataloaders is not None:
            if datamodule is not None:
                raise TypeError(
                    "Trainer.fit: give a datamodule or train_dataloaders/val_dataloaders, not both"
                )
            datamodule = given_loaders(train_dataloaders, val_dataloaders)
        config = self._run.config
        if ckpt_path is not None:
            resume = "auto" if ckpt_path == "last" else str(ckpt_path)
            self._run.config = dataclasses.replace(config, resume=resume)
        try:
            fit(self._run, module, datamodule)
        finally:
            self._run.config = config

    def validate(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the validation loop once over all of ``val_dataloader`` on every rank; with
        ``resume`` (``auto`` or a path) on the weights of that checkpoint.

        Returns what ``validation_epoch_end`` returned on this rank.
        """
        return run_evaluation(self._run, module, datamodule, "validate")

    def test(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the test loop once over all of ``test_dataloader`` on every rank (Lightning 0.8
        tested on rank 0 only; here every rank takes its shard). Returns what
        ``test_epoch_end`` returned on this rank."""
        return run_evaluation(self._run, module, datamodule, "test")

    def predict(
        self,
        module: Module,
        dataloaders: Any = None,
        datamodule: DataModule | None = None,
        ckpt_path: str | os.PathLike | None = None,
        return_predictions: bool = True,
    ) -> list[Any] | None:
        """Run ``predict_step`` once over every sample of ``dataloaders`` (else the data
        module's or the module's ``predict_dataloader``), on every rank: each rank predicts
        one block of the dataset, unpadded, so every sample is predicted exactly once. The
        module runs in eval mode under ``torch.inference_mode``, on the weights of
        ``ckpt_path`` (else ``resume``) if given.

        Returns, on every rank, the ``predict_step`` outputs of every batch of every rank
        (moved to the CPU), in dataset order, gathered once at the end; batch boundaries
        follow each rank's block, so concatenate them. With ``return_predictions=False``
        nothing is kept or gathered and None is returned: pair it with
        ``disttrain.callbacks.PredictionWriter`` for outputs too large to gather.
        """
        path = None if ckpt_path is None else str(ckpt_path)  # a path, a URL, a Location
        return run_prediction(self._run, module, datamodule, dataloaders, path, return_predictions)
