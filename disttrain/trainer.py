"""``Trainer``: fit, validate and test a :class:`disttrain.Module`, one loop for every backend.

``fit`` below is the whole training loop in the order it happens; every hook is one line,
``call(Hook.X, ...)`` or, for the per-batch hooks, the same callable looked up once before
the loop (``on_batch_end()``), and the dispatcher decides on which ranks it runs and what sync
follows (see ``disttrain.hooks`` for the table and the picture of the loop).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from disttrain import checkpoint, data, optim, strategy
from disttrain.callback import Callback
from disttrain.callbacks import ModelCheckpoint
from disttrain.checkpoint import set_rng_state
from disttrain.config import TrainerConfig
from disttrain.datamodule import DataModule
from disttrain.dispatch import Dispatcher
from disttrain.dist import Collectives, DistEnv, select_device
from disttrain.evaluation import evaluate
from disttrain.flight import FlightRecorder
from disttrain.hooks import Action, Hook, overridden
from disttrain.log import configure_logging, writes_run_output
from disttrain.loggers import Logger, make_logger
from disttrain.metrics import Reporter
from disttrain.module import Module
from disttrain.precision import NULL_CONTEXT, autocast_context, grad_scaler
from disttrain.preemption import Preempted, PreemptionWatcher
from disttrain.profiler import SimpleProfiler, report
from disttrain.progress import ProgressBar
from disttrain.session import hyperparams, open_session, write_run_files
from disttrain.steps import (
    detached,
    loss_of,
    per_batch,
)

log = logging.getLogger("disttrain.trainer")


class Trainer:
    """Runs a module's hooks and steps on every rank of a torchrun job, or in one process.

    Options are those of :class:`disttrain.TrainerConfig`, as keyword arguments or as a config
    object (``Trainer(config)``). Ranks, backend and device come from torchrun's environment,
    read once here; without it the trainer runs a single debug process with the same hooks.
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
        self.device = select_device(self.config.accelerator, self.env)
        cfg = self.config
        self.callbacks: list[Callback] = list(cfg.callbacks)
        if cfg.enable_checkpointing and not any(
            isinstance(c, ModelCheckpoint) for c in self.callbacks
        ):
            self.callbacks.append(ModelCheckpoint())
        if cfg.enable_progress_bar and writes_run_output(self.env.rank):
            self.callbacks.append(ProgressBar(cfg.log_every_n_steps))
        logger = make_logger(cfg.logger, cfg.default_root_dir, self.env.rank)
        self.reporter = Reporter(logger, cfg.log_every_n_steps, cfg.sync_step_metrics)
        self.running_limited_hook: str | None = None  # set by the dispatcher: log() refuses
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
        self._step: strategy.Step | None = None  # how fit reaches the model (set in fit)

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
        progress = checkpoint.Progress(
            self.current_epoch, self.global_step, self._next_batch, self._epoch_finished
        )
        return checkpoint.save(self, self._running("save_checkpoint"), path, progress)

    def export_weights(self, path: str | os.PathLike) -> Path:
        """The whole module's weights as one ``torch.save`` file for inference (under FSDP
        gathered from the shards). Collective; global rank 0 writes."""
        return checkpoint.export(self, self._running("export_weights"), path)

    def manage_files(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on global rank 0 only, the one rank that creates and deletes
        files in the run directory; every rank returns its result. Collective."""
        return self._running("manage_files").run(Action.MANAGE_FILES, fn, *args)

    def _running(self, what: str) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError(f"Trainer.{what} can only be called while fit/validate/test runs")
        return self._dispatcher

    def _save_last(self) -> None:
        """The automatic last checkpoint: the state fit ends with, unless just saved."""
        callback = self.checkpoint_callback
        if callback is not None and callback.last_saved_step != self.global_step:
            callback.save(self)

    def _stop(self, preemption: PreemptionWatcher) -> None:
        """An agreed stop: if any rank got SIGTERM or SIGINT, every rank checkpoints and raises
        ``Preempted`` (global rank 0 says where the checkpoint went and how to resume)."""
        self.should_stop = True
        signal_name = self._agreed_signal(preemption)
        if signal_name is None:
            return
        callback = self.checkpoint_callback
        if callback is not None:
            path = callback.save(self)
        else:
            name = checkpoint.file_name(self.current_epoch, self.global_step)
            path = self.save_checkpoint(self.checkpoint_dir / name)
        command = os.environ.get("DISTTRAIN_RESUME_COMMAND")
        if command:
            how = f"To resume: {command}"
        elif self.config.resume == "auto":
            how = "Run the same command again to resume."
        else:
            how = "Run it again with resume='auto' to resume."
        message = (
            f"stopped on {signal_name} after step {self.global_step} (every rank after the "
            f"same step); checkpoint written to {path}. {how}"
        )
        log.warning("%s", message)
        raise Preempted(message, signal_name)

    def _agreed_signal(self, preemption: PreemptionWatcher) -> str | None:
        """The stop signal any rank got (SIGINT over SIGTERM), the same on every rank."""
        names = (None, "SIGTERM", "SIGINT")
        code = torch.tensor([names.index(preemption.requested)], dtype=torch.int32)
        return names[int(self._collectives.all_reduce(code, "max").item())]

    def _stop_if_interrupted_before_training(self, preemption: PreemptionWatcher) -> None:
        """A stop asked for during start-up: nothing trained, so nothing to checkpoint."""
        signal_name = self._agreed_signal(preemption)
        if signal_name is not None:
            message = f"stopped on {signal_name} before the first training step; nothing was saved"
            log.warning("%s", message)
            raise Preempted(message, signal_name)

    def _say_where_files_went(self) -> None:
        run_dir = Path(self.config.default_root_dir)
        callback = self.checkpoint_callback
        if callback is not None and callback.saved:
            log.info("checkpoints: %s", callback.directory(self) / callback.saved[-1])
        if self.config.logger == "csv":
            log.info("metrics: %s", run_dir / "metrics.csv")
        elif self.config.logger == "tensorboard":
            log.info("metrics: %s (tensorboard --logdir %s)", *[run_dir / "tensorboard"] * 2)

    def fit(self, module: Module, datamodule: DataModule | None = None) -> None:
        """Train ``module``: the lifecycle of ``spec/lifecycle.md`` on every rank.

        Dataloaders come from ``datamodule`` where it defines them, else from ``module``. With
        ``resume`` (or after an elastic restart) training goes on from a checkpoint exactly
        where it stopped. On SIGTERM every rank stops after the same optimizer step, a
        checkpoint is written and ``Preempted`` is raised.
        """
        cfg = self.config
        with (
            open_session(self, module, datamodule) as dispatcher,
            PreemptionWatcher(self.flight.dump) as preemption,
        ):
            call = dispatcher.call
            call(Hook.PREPARE_DATA)
            dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, self)
            log.info("run directory: %s", Path(cfg.default_root_dir).resolve())
            call(Hook.SETUP, "fit")
            module.to(self.device)
            call(Hook.ON_FIT_START)
            step, (optimizers, schedulers) = strategy.build(
                self, module, lambda: optim.normalise(module.configure_optimizers())
            )
            self._step = step
            self.optimizers, self.schedulers = optimizers, schedulers
            self.scaler = scaler = grad_scaler(cfg.precision, self.device)
            progress, saved_rng = checkpoint.resume(self, dispatcher)
            self.logger.resume_from(progress.global_step if progress else None)
            self.logger.log_hyperparams(hyperparams(self))  # after a purge that would hide it
            forward = step.compiled() if cfg.compile else step.forward
            profiler = self.profiler
            if profiler is not None:
                forward = profiler.timed("forward", forward, device=self.device)
                for optimizer in optimizers:
                    profiler.watch_optimizer(optimizer)
            train_data = data.train_loader_for(self, module)
            val_data = data.eval_loader_for(self, module, "val_dataloader", "validation_step")
            if cfg.limit_val_batches == 0:  # decided from the config: the same on every rank
                val_data = None
            n_train = data.limit_batches(train_data, cfg.limit_train_batches, "limit_train_batches")
            n_val = data.limit_batches(val_data, cfg.limit_val_batches, "limit_val_batches")
            self.num_training_batches = n_train
            call(Hook.ON_TRAIN_START)
            call(Hook.ON_SANITY_CHECK_START)
            if val_data is not None and cfg.num_sanity_val_steps > 0:
                self.sanity_checking = True
                evaluate(self, call, val_data, min(n_val, cfg.num_sanity_val_steps), "validation")
                self.sanity_checking = False

            device, autocast, collectives = self.device, self._autocast, self._collectives
            # the per-batch hooks, looked up once; each runs exactly as call(Hook.X, ...) would
            on_batch_start, transfer_batch_to_device, backward = map(
                dispatcher.caller,
                (Hook.ON_BATCH_START, Hook.TRANSFER_BATCH_TO_DEVICE, Hook.BACKWARD),
            )
            on_after_backward, on_before_zero_grad, on_batch_end = map(
                dispatcher.caller,
                (Hook.ON_AFTER_BACKWARD, Hook.ON_BEFORE_ZERO_GRAD, Hook.ON_BATCH_END),
            )
            reporter = self.reporter
            accumulate, clip = cfg.accumulate_grad_batches, cfg.gradient_clip_val
            max_steps = cfg.max_steps if cfg.max_steps is not None else float("inf")
            params = [[p for g in o.param_groups for p in g["params"]] for o in optimizers]
            step_args = [(i,) for i in range(len(optimizers))] if len(optimizers) > 1 else [()]
            keep_outputs = overridden(module, "training_epoch_end", Module)
            start_epoch, start_batch = progress.resume_point() if progress else (0, 0)
            if progress and progress.epoch_finished:  # saved before that epoch's scheduler step
                optim.step_schedulers(schedulers, "epoch", progress.epoch + 1)
            if start_epoch >= cfg.max_epochs or self.global_step >= max_steps:
                log.info(
                    "nothing to train: the checkpoint is at epoch %d, step %d, and the run ends "
                    "at max_epochs=%d, max_steps=%s; raise them to train on",
                    self.current_epoch,
                    self.global_step,
                    cfg.max_epochs,
                    cfg.max_steps,
                )
            self._stop_if_interrupted_before_training(preemption)
            module.train()
            for epoch in range(start_epoch, cfg.max_epochs):
                self.current_epoch = epoch
                first = start_batch if epoch == start_epoch else 0
                self._next_batch, self._epoch_finished = first, False
                if saved_rng is not None and first == 0:
                    set_rng_state(saved_rng)  # where the checkpoint was taken: after the epoch
                    saved_rng = None
                call(Hook.ON_EPOCH_START)
                batches = data.epoch_batches(train_data, epoch, first)
                if profiler is not None:
                    batches = profiler.timed_iter("data loading", batches)
                if saved_rng is not None:
                    set_rng_state(saved_rng)  # mid-epoch: after the loader drew its seed
                    saved_rng = None
                outputs: list[Any] = []
                pending, leave = False, None  # gradients not yet stepped; why we leave early
                for batch_idx, batch in zip(range(first, n_train), batches):
                    if on_batch_start(batch) == -1:
                        break
                    batch = reporter.batch = transfer_batch_to_device(batch, device)
                    boundary = (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == n_train
                    with NULL_CONTEXT if boundary else step.no_sync():
                        for i, optimizer in enumerate(optimizers):
                            with autocast:
                                out = forward(batch, batch_idx, *step_args[i])
                            loss = loss_of(out)
                            if accumulate > 1:
                                loss = loss / accumulate
                            if scaler is not None:
                                loss = scaler.scale(loss)
                            backward(self, loss, optimizer, i)
                            on_after_backward()
                            if keep_outputs:
                                outputs.append(detached(out))
                    pending = not boundary
                    if boundary:
                        for optimizer, group in zip(optimizers, params):
                            if clip:
                                if scaler is not None:  # 16-mixed: clip the true gradients
                                    scaler.unscale_(optimizer)
                                torch.nn.utils.clip_grad_norm_(group, clip)
                            if scaler is None:
                                optimizer.step()
                            else:
                                scaler.step(optimizer)  # skipped if a gradient is inf/nan
                            on_before_zero_grad(optimizer)
                            optimizer.zero_grad()
                        if scaler is not None:
                            scaler.update()
                        self.global_step += 1
                        optim.step_schedulers(schedulers, "step", self.global_step)
                        reporter.after_step(collectives, self.global_step)
                    self.at_step_boundary, self._next_batch = boundary, batch_idx + 1
                    on_batch_end()
                    if not boundary:
                        continue
                    if self.global_step >= max_steps and batch_idx + 1 < n_train:
                        leave = "max_steps"  # mid-epoch: the epoch is not finished
                        break
                    # the vote rides on the next step's gradient all-reduce: no collective here
                    stop_vote = self.should_stop or preemption.requested is not None
                    if collectives.stop_agreed(stop_vote):
                        leave = "agreed stop"
                        break
                if pending:  # the epoch ended inside an accumulation window: drop its gradients
                    for optimizer in optimizers:
                        optimizer.zero_grad()
                if leave == "agreed stop":
                    self._stop(preemption)
                if leave:
                    break
                if val_data is not None and (epoch + 1) % cfg.check_val_every_n_epoch == 0:
                    evaluate(self, call, val_data, n_val, "validation")
                module.training_epoch_end(per_batch(outputs, len(optimizers)))
                self._epoch_finished = True
                call(Hook.ON_EPOCH_END)
                # one collective per epoch: the epoch's metrics and every rank's stop vote
                vote = self.should_stop or preemption.requested is not None
                stop = reporter.end_epoch(collectives, self.global_step, epoch, vote)
                if stop:
                    self._stop(preemption)
                optim.step_schedulers(schedulers, "epoch", epoch + 1)
                if stop or self.global_step >= max_steps:
                    break
            self._save_last()
            if profiler is not None:  # one collective at the very end, only when profiling
                self.profile_report = report(self._collectives.gather_object(profiler.summary()))
                log.info("%s", self.profile_report)
            call(Hook.ON_TRAIN_END)
            self.logger.finalize()
            call(Hook.ON_FIT_END)
            call(Hook.TEARDOWN, "fit")
        self._say_where_files_went()  # last, where the eye lands

    def validate(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the validation loop once over all of ``val_dataloader`` on every rank; with
        ``resume`` (``auto`` or a path) on the weights of that checkpoint.

        Returns what ``validation_epoch_end`` returned on this rank.
        """
        return self._run_evaluation(module, datamodule, "validate", "val_dataloader", "validation")

    def test(self, module: Module, datamodule: DataModule | None = None) -> Any:
        """Run the test loop once over all of ``test_dataloader`` on every rank (Lightning 0.8
        tested on rank 0 only; here every rank takes its shard). Returns what
        ``test_epoch_end`` returned on this rank."""
        return self._run_evaluation(module, datamodule, "test", "test_dataloader", "test")

    # -- the pieces fit and the evaluations share ------------------------------------------
    def _run_evaluation(
        self, module: Module, datamodule: DataModule | None, stage: str, loader_name: str, kind: str
    ) -> Any:
        limit = self.config.limit_test_batches if kind == "test" else self.config.limit_val_batches
        with open_session(self, module, datamodule) as dispatcher:
            call = dispatcher.call
            call(Hook.PREPARE_DATA)
            dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, self, stage)
            call(Hook.SETUP, stage)
            module.to(self.device)
            checkpoint.restore_weights(self, dispatcher)  # with resume=auto|path
            loader = data.eval_loader_for(self, module, loader_name, f"{kind}_step")
            if loader is None:
                raise ValueError(
                    f"Trainer.{stage}: {type(module).__name__} needs {loader_name}() returning a "
                    f"DataLoader and a {kind}_step"
                )
            option = "limit_test_batches" if kind == "test" else "limit_val_batches"
            result = evaluate(self, call, loader, data.limit_batches(loader, limit, option), kind)
            self.logger.finalize()
            call(Hook.TEARDOWN, stage)
        return result
