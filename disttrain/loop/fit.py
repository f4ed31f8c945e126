"""``Trainer.fit``, one function per loop level, in the order things happen.

``fit`` (start, sanity check, epochs, finish) → ``train_epoch`` → ``train_batch`` →
``forward_backward`` (per optimizer) and ``optimizer_step``. Every hook is one visible line:
``run.call(Hook.X, ...)``, or for the per-batch hooks the same callable looked up once
(``run.hooks.on_batch_end()``); the dispatcher decides on which ranks it runs and what sync
follows (``disttrain.ranks.table`` draws the whole loop next to its rank rules).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import overridden
from disttrain.api.module import Module
from disttrain.checkpoint.format import file_name
from disttrain.checkpoint.resume import resume
from disttrain.data import loaders
from disttrain.data.loaders import batch_indices
from disttrain.data.positions import track_positions
from disttrain.data.samplers import reshard, sample_counter
from disttrain.data.workers import ended
from disttrain.loop import optim, sources, strategy
from disttrain.loop.evaluation import evaluate
from disttrain.loop.outputs import detached, loss_of, per_batch
from disttrain.loop.precision import NULL_CONTEXT, grad_scaler
from disttrain.loop.session import hyperparams, open_session, write_run_files
from disttrain.loop.signals import PreemptionWatcher
from disttrain.loop.state import BatchHooks, FitRun
from disttrain.loop.stopping import EpochEnd, Stopping
from disttrain.observe.profiler import TRAINING_LOOP, report
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Action, Hook
from disttrain.rng import set_rng_state, warn_if_built_unseeded

if TYPE_CHECKING:  # the trainer calls fit: importing it here would be a cycle
    from disttrain.loop.trainer import Trainer

log = logging.getLogger("disttrain.trainer")


def fit(trainer: Trainer, module: Module, datamodule: DataModule | None) -> None:
    """The lifecycle of ``docs/lifecycle.md`` on every rank."""
    with (
        open_session(trainer, module, datamodule) as dispatcher,
        PreemptionWatcher(trainer.flight.dump) as watcher,
    ):
        run = start(trainer, dispatcher, module, Stopping(trainer._collectives, watcher))
        with ended(run.train_data, run.val_data):  # their persistent workers, on any exit
            sanity_check(trainer, run)
            profiler = trainer.profiler  # with it, each phase's share of the training loop
            train_loop = train if profiler is None else profiler.timed(TRAINING_LOOP, train)
            try:
                train_loop(trainer, run, module)
            finally:  # a stop, a signal or a failure keeps what was logged up to it
                trainer.logger.save()
        finish(trainer, run)
    _say_where_files_went(trainer)  # last, where the eye lands


def start(trainer: Trainer, dispatcher: Dispatcher, module: Module, stopping: Stopping) -> FitRun:
    """Everything before the first batch: data, setup, the wrap, the resume, the loaders."""
    cfg, call = trainer.config, dispatcher.call
    warn_if_built_unseeded(module, trainer.seed)
    call(Hook.PREPARE_DATA)
    dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, trainer)
    log.info("run directory: %s", Path(cfg.default_root_dir).resolve())
    call(Hook.SETUP, "fit")
    module.to(trainer.device)
    call(Hook.ON_FIT_START)
    configure = lambda: optim.normalise(module.configure_optimizers())  # noqa: E731
    step, (optimizers, schedulers) = strategy.build(trainer, module, configure, stopping)
    trainer._step, trainer.optimizers, trainer.schedulers = step, optimizers, schedulers
    trainer.scaler = grad_scaler(cfg.precision, trainer.device)
    progress, saved_rng, saved_data, saved_world_size = resume(trainer, dispatcher)
    trainer.logger.resume_from(progress.global_step if progress else None)
    trainer.logger.log_hyperparams(hyperparams(trainer))  # after a purge that would hide it
    forward = step.compiled() if cfg.compile else step.forward
    profiler = trainer.profiler
    if profiler is not None:
        forward = profiler.timed("forward", forward, device=trainer.device)
        for optimizer in optimizers:
            profiler.watch_optimizer(optimizer)
    train_data = sources.train_loader_for(trainer, module)
    trained = lambda: trainer._next_batch  # noqa: E731
    trainer._data_position = track_positions(train_data, trained, saved_data)
    val_data = sources.eval_loader_for(trainer, module, "val_dataloader", "validation_step")
    if cfg.limit_val_batches == 0:  # decided from the config: the same on every rank
        val_data = None
    n_train = loaders.limit_batches(train_data, cfg.limit_train_batches, "limit_train_batches")
    n_train = stopping.fewest_batches(n_train)  # every rank ends at the shortest loader
    if progress:  # at another world size (now or before): the rest of the epoch, split anew
        first = reshard(train_data, progress, saved_world_size, trainer.world_size)
        progress = dataclasses.replace(progress, next_batch=first)
    trainer._count_samples = sample_counter(train_data)
    trainer.num_training_batches = n_train
    hooks = BatchHooks(*map(dispatcher.caller, _BATCH_HOOKS))
    run = FitRun(
        call=call,
        step=step,
        forward=forward,
        optimizers=optimizers,
        schedulers=schedulers,
        scaler=trainer.scaler,
        hooks=hooks,
        stopping=stopping,
        train_data=train_data,
        val_data=val_data,
        n_train=n_train,
        n_val=loaders.limit_batches(val_data, cfg.limit_val_batches, "limit_val_batches"),
        keep_outputs=overridden(module, "training_epoch_end", Module),
        progress=progress,
        saved_rng=saved_rng,
    )
    call(Hook.ON_TRAIN_START)
    return run


_BATCH_HOOKS = (
    Hook.ON_BATCH_START,
    Hook.TRANSFER_BATCH_TO_DEVICE,
    Hook.BACKWARD,
    Hook.ON_AFTER_BACKWARD,
    Hook.ON_BEFORE_ZERO_GRAD,
    Hook.ON_BATCH_END,
)


def sanity_check(trainer: Trainer, run: FitRun) -> None:
    run.call(Hook.ON_SANITY_CHECK_START)
    steps = trainer.config.num_sanity_val_steps
    if run.val_data is not None and steps > 0:
        trainer.sanity_checking = True
        evaluate(trainer, run.call, run.val_data, min(run.n_val, steps), "validation")
        trainer.sanity_checking = False


def train(trainer: Trainer, run: FitRun, module: Module) -> None:
    """The epochs, from where a resumed run stopped; every rank leaves after the same step."""
    cfg, progress = trainer.config, run.progress
    start_epoch, start_batch = progress.resume_point() if progress else (0, 0)
    if progress and progress.epoch_finished:  # saved before that epoch's scheduler step
        optim.step_schedulers(run.schedulers, "epoch", progress.epoch + 1)
    if start_epoch >= cfg.max_epochs or trainer.global_step >= _max_steps(trainer):
        log.info(
            "nothing to train: the checkpoint is at epoch %d, step %d, and the run ends at "
            "max_epochs=%d, max_steps=%s; raise them to train on",
            trainer.current_epoch,
            trainer.global_step,
            cfg.max_epochs,
            cfg.max_steps,
        )
        return  # (every rank alike: the same config, the same checkpoint)
    run.stopping.before_training()
    module.train()
    for epoch in range(start_epoch, cfg.max_epochs):
        first = start_batch if epoch == start_epoch else 0
        outputs, end = train_epoch(trainer, run, epoch, first)
        if end is EpochEnd.AGREED_STOP:
            trainer.should_stop = True
            run.stopping.for_signal(trainer.global_step, lambda: _save_now(trainer), cfg.resume)
        if end.leaves_training:
            break
        if end_epoch(trainer, run, module, epoch, outputs):
            break


def train_epoch(
    trainer: Trainer, run: FitRun, epoch: int, first: int
) -> tuple[list[Any], EpochEnd]:
    """One epoch's batches from ``first``; returns the steps' outputs (for
    ``training_epoch_end``) and why its batches ended. The loader's workers
    end with the epoch's ``with`` block, however it ends (``workers.reading``)."""
    trainer.current_epoch = epoch
    trainer._next_batch, trainer._epoch_finished = first, False
    if run.saved_rng is not None and first == 0:
        set_rng_state(run.saved_rng)  # where the checkpoint was taken: after the epoch
        run.saved_rng = None
    run.call(Hook.ON_EPOCH_START)
    outputs: list[Any] = []
    with loaders.epoch_batches(run.train_data, epoch, first) as batches:
        if trainer.profiler is not None:
            batches = trainer.profiler.timed_iter("data loading", batches)
        if run.saved_rng is not None:
            set_rng_state(run.saved_rng)  # mid-epoch: after the loader drew its seed
            run.saved_rng = None
        ends_window = functools.partial(_ends_window, trainer.config.accumulate_grad_batches, run)
        pairs = zip(batch_indices(first, run.n_train), batches)
        items = run.stopping.start_epoch(pairs, first, ends_window)  # read ahead if world > 1
        boundary, end = train_batches(trainer, run, items, outputs)
    if not boundary:  # the epoch ended inside an accumulation window: drop its gradients
        for optimizer in run.optimizers:
            optimizer.zero_grad()
    return outputs, end


def train_batches(
    trainer: Trainer, run: FitRun, items: Iterator[tuple[int, Any]], outputs: list[Any]
) -> tuple[bool, EpochEnd]:
    """The epoch's ``(batch_idx, batch)`` pairs until its data or an agreed stop ends it;
    returns whether the last batch ended an accumulation window, and why the batches end."""
    on_batch_start, stopping = run.hooks.on_batch_start, run.stopping
    max_steps = _max_steps(trainer)
    boundary = True
    for batch_idx, batch in items:
        if on_batch_start(batch) == -1:  # agreed: every rank ends the epoch at this batch
            return boundary, EpochEnd.MINUS_ONE
        stopping.before_step(items, batch_idx)  # at a window's end: does this rank's data end?
        boundary = train_batch(trainer, run, batch, batch_idx, outputs)
        if not boundary:
            continue
        if trainer.global_step >= max_steps and batch_idx + 1 < run.n_train:
            return boundary, EpochEnd.MAX_STEPS  # mid-epoch: the epoch is not finished
        if stopping.after_step(trainer.should_stop):  # no collective: rides the gradients
            return boundary, EpochEnd.AGREED_STOP
        if stopping.data_ended:  # on the same ride: the shortest rank's data ends here
            return boundary, EpochEnd.DATA_ENDED  # every rank ends the epoch as usual
    return boundary, EpochEnd.DATA


def train_batch(
    trainer: Trainer, run: FitRun, batch: Any, batch_idx: int, outputs: list[Any]
) -> bool:
    """One batch: forward and backward for every optimizer, then, at an accumulation
    boundary, the optimizer step. Returns whether the optimizers stepped."""
    hooks, accumulate = run.hooks, trainer.config.accumulate_grad_batches
    batch = trainer.reporter.batch = hooks.transfer_batch_to_device(batch, trainer.device)
    boundary = _ends_window(accumulate, run, batch_idx)
    with NULL_CONTEXT if boundary else run.step.no_sync():
        forward_backward(trainer, run, batch, batch_idx, outputs)
    if boundary:
        optimizer_step(trainer, run)
    trainer.at_step_boundary, trainer._next_batch = boundary, batch_idx + 1
    hooks.on_batch_end()
    return boundary


def forward_backward(
    trainer: Trainer, run: FitRun, batch: Any, batch_idx: int, outputs: list[Any]
) -> None:
    """``training_step`` → ``backward`` → ``on_after_backward`` for each optimizer in turn."""
    hooks, scaler, accumulate = run.hooks, run.scaler, trainer.config.accumulate_grad_batches
    for i, optimizer in enumerate(run.optimizers):
        with trainer._autocast:
            out = run.forward(batch, batch_idx, *run.step_args[i])
        loss = loss_of(out)
        if accumulate > 1:
            loss = loss / accumulate
        if scaler is not None:
            loss = scaler.scale(loss)
        hooks.backward(trainer, loss, optimizer, i)
        hooks.on_after_backward()
        if run.keep_outputs:
            outputs.append(detached(out))


def optimizer_step(trainer: Trainer, run: FitRun) -> None:
    """Clip, step, ``on_before_zero_grad``, zero every optimizer; then the step-interval
    schedulers and the step's metrics."""
    scaler, clip = run.scaler, trainer.config.gradient_clip_val
    for optimizer, group in zip(run.optimizers, run.params):
        if clip:
            if scaler is not None:  # 16-mixed: clip the true gradients
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(group, clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped if a gradient is inf/nan
        run.hooks.on_before_zero_grad(optimizer)
        optimizer.zero_grad()
    if scaler is not None:
        scaler.update()
    trainer.global_step += 1
    optim.step_schedulers(run.schedulers, "step", trainer.global_step)
    trainer.reporter.after_step(trainer._collectives, trainer.global_step)


def end_epoch(
    trainer: Trainer, run: FitRun, module: Module, epoch: int, outputs: list[Any]
) -> bool:
    """Validation, the epoch-end hooks, and one collective for the epoch's metrics and every
    rank's stop vote. Returns whether training stops here."""
    every = trainer.config.check_val_every_n_epoch
    if run.val_data is not None and (epoch + 1) % every == 0:
        evaluate(trainer, run.call, run.val_data, run.n_val, "validation")
    module.training_epoch_end(per_batch(outputs, len(run.optimizers)))
    trainer._epoch_finished = True
    run.call(Hook.ON_EPOCH_END)
    vote = run.stopping.local_vote(trainer.should_stop)
    stop = trainer.reporter.end_epoch(trainer._collectives, trainer.global_step, epoch, vote)
    if stop:
        trainer.should_stop = True
        save = lambda: _save_now(trainer)  # noqa: E731
        run.stopping.for_signal(trainer.global_step, save, trainer.config.resume)
    optim.step_schedulers(run.schedulers, "epoch", epoch + 1)
    return stop or trainer.global_step >= _max_steps(trainer)


def finish(trainer: Trainer, run: FitRun) -> None:
    """The state fit ends with is checkpointed (unless just saved), then the end hooks."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.last_saved_step != trainer.global_step:
        callback.save(trainer)
    profiler = trainer.profiler
    if profiler is not None:  # one collective at the very end, only when profiling
        trainer.profile_report = report(trainer._collectives.gather_object(profiler.summary()))
        log.info("%s", trainer.profile_report)
    run.call(Hook.ON_TRAIN_END)
    trainer.logger.finalize()
    run.call(Hook.ON_FIT_END)
    run.call(Hook.TEARDOWN, "fit")


def _ends_window(accumulate: int, run: FitRun, batch_idx: int) -> bool:
    """Whether the optimizers step after ``batch_idx``: an accumulation window ends there."""
    return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == run.n_train


def _max_steps(trainer: Trainer) -> float:
    steps = trainer.config.max_steps
    return float("inf") if steps is None else steps


def _save_now(trainer: Trainer) -> Path:
    """A stop's checkpoint: through the ModelCheckpoint callback if there is one."""
    callback = trainer.checkpoint_callback
    if callback is not None:
        return callback.save(trainer)
    name = file_name(trainer.current_epoch, trainer.global_step)
    return trainer.save_checkpoint(trainer.checkpoint_dir / name)


def _say_where_files_went(trainer: Trainer) -> None:
    run_dir = Path(trainer.config.default_root_dir)
    callback = trainer.checkpoint_callback
    if callback is not None and callback.saved:
        log.info("checkpoints: %s", callback.directory(trainer) / callback.saved[-1])
    if trainer.config.logger == "csv":
        log.info("metrics: %s", run_dir / "metrics.csv")
    elif trainer.config.logger == "tensorboard":
        log.info("metrics: %s (tensorboard --logdir %s)", *[run_dir / "tensorboard"] * 2)
