"""``Trainer.fit``, one function per loop level, in the order things happen.

``fit`` (start, sanity check, epochs, finish) → ``train_epoch`` → ``train_batch`` →
``forward_backward`` (per optimizer) and ``optimizer_step``. Each level takes the run (``run``:
what the loop reads and changes, ``disttrain.loop.run``) and this fit's plumbing (``loop``:
``disttrain.loop.fitloop.FitLoop``). Every hook is one visible line:
``loop.call(Hook.X, ...)``, or for the per-batch hooks the same callable looked up once
(``loop.hooks.on_batch_end()``); the dispatcher decides on which ranks it runs and what sync
follows (``disttrain.ranks.table`` draws the whole loop next to its rank rules).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import overridden
from disttrain.api.module import Module
from disttrain.checkpoint.format import file_name
from disttrain.checkpoint.resume import resume
from disttrain.config.options import max_time_seconds
from disttrain.data import loaders
from disttrain.data.loaders import batch_indices
from disttrain.data.positions import track_positions
from disttrain.data.samplers import reshard, sample_counter
from disttrain.data.workers import ended
from disttrain.dist.mesh import data_mesh
from disttrain.loop import optim, sources, strategy
from disttrain.loop.evaluation import evaluate
from disttrain.loop.fitloop import FitLoop, batch_hooks, clipping
from disttrain.loop.intervals import batches_between_validations, validates_after
from disttrain.loop.outputs import detached, loss_of, per_batch
from disttrain.loop.precision import NULL_CONTEXT, grad_scaler
from disttrain.loop.run import Run
from disttrain.loop.session import hyperparams, open_session, write_run_files
from disttrain.loop.signals import PreemptionWatcher
from disttrain.loop.stopping import EpochEnd, Stopping
from disttrain.observe.profiler import TRAINING_LOOP, report
from disttrain.ranks.dispatch import Dispatcher
from disttrain.ranks.table import Action, Hook
from disttrain.rng import seed_rank, set_rng_state, warn_if_built_unseeded
from disttrain.storage.location import Location

log = logging.getLogger("disttrain.run")


def fit(run: Run, module: Module, datamodule: DataModule | None) -> None:
    """The lifecycle of ``docs/lifecycle.md`` on every rank."""
    with (
        open_session(run, module, datamodule) as dispatcher,
        PreemptionWatcher(run.flight.dump) as watcher,
    ):
        watched = run.global_rank if run.config.stop_on_nonfinite_loss else None
        max_time = max_time_seconds(run.config.max_time)
        stopping = Stopping(run.collectives, watcher, max_time, watch_loss_of=watched)
        run.nonfinite_losses = stopping.nonfinite_losses  # refused by every save and export
        try:
            loop = start(run, dispatcher, module, stopping)
            with ended(loop.train_data, loop.val_data):  # their persistent workers, on any exit
                sanity_check(run, loop)
                profiler = run.profiler  # with it, each phase's share of the training loop
                train_loop = train if profiler is None else profiler.timed(TRAINING_LOOP, train)
                try:
                    train_loop(run, loop, module)
                finally:  # a stop, a signal or a failure keeps what was logged up to it
                    run.logger.save()
            finish(run, loop)
        finally:  # what fit found, without the loop's objects: a run outlives its fit, and
            # a loop kept alive keeps its loader's workers (a next fit's fork then hangs)
            found = stopping.nonfinite_losses()
            run.nonfinite_losses = lambda agreed=False: found
    _say_where_files_went(run)  # last, where the eye lands


def start(run: Run, dispatcher: Dispatcher, module: Module, stopping: Stopping) -> FitLoop:
    """Everything before the first batch: data, setup, the wrap, the resume, the loaders."""
    cfg, call = run.config, dispatcher.call
    warn_if_built_unseeded(module, run.seed)
    call(Hook.PREPARE_DATA)
    dispatcher.run(Action.WRITE_RUN_FILES, write_run_files, run)
    if not cfg.fast_dev_run:  # which writes nothing there
        log.info("run directory: %s", Path(cfg.default_root_dir).resolve())
    call(Hook.SETUP, "fit")
    module.to(device=run.device, dtype=run.param_dtype)  # *-true: before the optimizers
    call(Hook.ON_FIT_START)
    step, optimizers, schedulers = _wrapped(run, call, module, stopping)
    progress, saved_rng, saved_data, saved_data_world = resume(run)
    run.logger.resume_from(progress.global_step if progress else None)
    run.logger.log_hyperparams(hyperparams(run))  # after a purge that would hide it
    forward = step.compiled() if cfg.compile else step.forward
    profiler = run.profiler
    if profiler is not None:
        forward = profiler.timed("forward", forward, device=run.device)
        for optimizer in optimizers:
            profiler.watch_optimizer(optimizer)
    train_data = sources.train_loader_for(run, module)
    trained = lambda: run.next_batch  # noqa: E731
    run.data_position = track_positions(train_data, trained, saved_data)
    val_data = sources.eval_loader_for(run, module, "val_dataloader", "validation_step")
    if cfg.limit_val_batches == 0:  # decided from the config: the same on every rank
        val_data = None
    n_train = loaders.limit_batches(train_data, cfg.limit_train_batches, "limit_train_batches")
    n_train = stopping.fewest_batches(n_train)  # every rank ends at the shortest loader
    if progress:  # at another world size (now or before): the rest of the epoch, split anew
        first = reshard(train_data, progress, saved_data_world, run.data_world_size)
        progress = dataclasses.replace(progress, next_batch=first)
    run.count_samples = sample_counter(train_data)
    run.num_training_batches = n_train
    optim.warn_if_epoch_schedulers_never_step(
        schedulers, cfg.epoch_limit, cfg.max_steps, n_train, cfg.accumulate_grad_batches
    )
    loop = FitLoop(
        call=call,
        forward=forward,
        hooks=batch_hooks(dispatcher, run.convert_input),
        stopping=stopping,
        train_data=train_data,
        val_data=val_data,
        n_train=n_train,
        n_val=loaders.limit_batches(val_data, cfg.limit_val_batches, "limit_val_batches"),
        keep_outputs=overridden(module, "training_epoch_end", Module),
        unscale_first=dispatcher.implemented(Hook.ON_BEFORE_OPTIMIZER_STEP),
        progress=progress,
        saved_rng=saved_rng,
        val_every=None if val_data is None else batches_between_validations(cfg, n_train),
        clip=clipping(cfg.gradient_clip_val, cfg.gradient_clip_algorithm),
        optimizers=optimizers,
    )
    call(Hook.ON_TRAIN_START)
    return loop


def _wrapped(
    run: Run, call: Callable[..., Any], module: Module, stopping: Stopping
) -> tuple[Any, list, list]:
    """The device mesh (if the run has one) and ``configure_model(mesh)``; the module wrapped
    (DDP, FSDP or HSDP) with its optimizers and schedulers, into the run; then each rank's
    own random stream (the module is alike on every rank by now)."""
    cfg = run.config
    mesh = run.collectives.device_mesh(run.layout)  # None: DDP, FSDP over all, one process
    call(Hook.CONFIGURE_MODEL, mesh)
    configure = lambda: optim.normalise(module.configure_optimizers())  # noqa: E731
    step, (optimizers, schedulers) = strategy.build(
        cfg, run.collectives, run.device, module, configure, stopping, data_mesh(mesh, run.layout)
    )
    run.step, run.optimizers, run.schedulers = step, optimizers, schedulers
    seed_rank(run.seed, run.global_rank)
    run.scaler = grad_scaler(cfg.precision, run.device)
    return step, optimizers, schedulers


def sanity_check(run: Run, loop: FitLoop) -> None:
    loop.call(Hook.ON_SANITY_CHECK_START)
    steps = run.config.num_sanity_val_steps
    if loop.val_data is not None and steps > 0:
        run.sanity_checking = True
        evaluate(run, loop.call, loop.val_data, min(loop.n_val, steps), "validation")
        run.sanity_checking = False
    loop.call(Hook.ON_SANITY_CHECK_END)


def train(run: Run, loop: FitLoop, module: Module) -> None:
    """The epochs, from where a resumed run stopped; every rank leaves after the same step."""
    cfg, progress = run.config, loop.progress
    start_epoch, start_batch = progress.resume_point() if progress else (0, 0)
    if progress and progress.epoch_finished:  # saved before that epoch's scheduler step
        optim.step_schedulers(run.schedulers, "epoch", progress.epoch + 1)
    if start_epoch >= cfg.epoch_limit or run.global_step >= _max_steps(run):
        log.info(
            "nothing to train: the checkpoint is at epoch %d, step %d, and the run ends at "
            "max_epochs=%s, max_steps=%s; raise them to train on",
            run.current_epoch,
            run.global_step,
            cfg.max_epochs,
            cfg.max_steps,
        )
        return  # (every rank alike: the same config, the same checkpoint)
    loop.stopping.before_training()
    module.train()
    for epoch in itertools.count(start_epoch):  # to max_epochs, or on until max_steps
        if epoch >= cfg.epoch_limit:
            break
        first = start_batch if epoch == start_epoch else 0
        outputs, end = train_epoch(run, loop, epoch, first)
        if end is EpochEnd.AGREED_STOP:
            run.should_stop = True
            loop.stopping.for_signal(run.global_step, lambda: _save_now(run), cfg.resume)
        if end.leaves_training:
            break
        if end_epoch(run, loop, module, epoch, outputs):
            break


def train_epoch(run: Run, loop: FitLoop, epoch: int, first: int) -> tuple[list[Any], EpochEnd]:
    """One epoch's batches from ``first``; returns the steps' outputs (for
    ``training_epoch_end``) and why its batches ended. The loader's workers
    end with the epoch's ``with`` block, however it ends (``workers.reading``)."""
    run.current_epoch = epoch
    run.next_batch, run.epoch_finished = first, False
    if loop.saved_rng is not None and first == 0:
        set_rng_state(loop.saved_rng)  # where the checkpoint was taken: after the epoch
        loop.saved_rng = None
    loaders.set_epoch(loop.train_data, epoch)  # before on_epoch_start, which may read it
    loop.call(Hook.ON_EPOCH_START)
    loop.call(Hook.ON_TRAIN_EPOCH_START)
    outputs: list[Any] = []
    with loaders.epoch_batches(loop.train_data, epoch, first) as batches:
        if run.profiler is not None:
            batches = run.profiler.timed_iter("data loading", batches)
        if loop.saved_rng is not None:
            set_rng_state(loop.saved_rng)  # mid-epoch: after the loader drew its seed
            loop.saved_rng = None
        ends_window = functools.partial(_ends_window, run.config.accumulate_grad_batches, loop)
        pairs = zip(batch_indices(first, loop.n_train), batches)
        items = loop.stopping.start_epoch(pairs, first, ends_window)  # read ahead if world > 1
        boundary, end = train_batches(run, loop, items, outputs)
    if not boundary:  # the epoch ended inside an accumulation window: drop its gradients
        for optimizer in run.optimizers:
            optimizer.zero_grad()
    return outputs, end


def train_batches(
    run: Run, loop: FitLoop, items: Iterator[tuple[int, Any]], outputs: list[Any]
) -> tuple[bool, EpochEnd]:
    """The epoch's ``(batch_idx, batch)`` pairs until its data or an agreed stop ends it;
    returns whether the last batch ended an accumulation window, and why the batches end."""
    hooks, stopping, device = loop.hooks, loop.stopping, run.device
    max_steps = _max_steps(run)
    boundary = True
    for batch_idx, batch in items:
        if hooks.on_batch_start(batch) == -1:  # agreed: every rank ends the epoch here
            return boundary, EpochEnd.MINUS_ONE
        batch = run.reporter.batch = hooks.transfer_batch_to_device(batch, device)
        if hooks.on_train_batch_start(batch, batch_idx) == -1:  # agreed, as on_batch_start's
            return boundary, EpochEnd.MINUS_ONE
        stopping.before_step(items, batch_idx)  # at a window's end: does this rank's data end?
        boundary = train_batch(run, loop, batch, batch_idx, outputs)
        if not boundary:
            continue
        if run.global_step >= max_steps and batch_idx + 1 < loop.n_train:
            return boundary, EpochEnd.MAX_STEPS  # mid-epoch: the epoch is not finished
        if stopping.after_step(run.should_stop):  # no collective: rides the gradients
            return boundary, EpochEnd.AGREED_STOP
        if stopping.data_ended:  # on the same ride: the shortest rank's data ends here
            return boundary, EpochEnd.DATA_ENDED  # every rank ends the epoch as usual
    return boundary, EpochEnd.DATA


def train_batch(run: Run, loop: FitLoop, batch: Any, batch_idx: int, outputs: list[Any]) -> bool:
    """One batch (on the device): forward and backward for every optimizer, then, at an
    accumulation boundary, the optimizer step. Returns whether the optimizers stepped."""
    hooks, accumulate = loop.hooks, run.config.accumulate_grad_batches
    boundary = _ends_window(accumulate, loop, batch_idx)
    with NULL_CONTEXT if boundary else run.fit_step.no_sync():
        out = forward_backward(run, loop, batch, batch_idx, outputs)
    if boundary:
        optimizer_step(run, loop)
    run.at_step_boundary, run.next_batch = boundary, batch_idx + 1
    hooks.on_train_batch_end(out, batch, batch_idx)  # before validation, as in Lightning 2
    every = loop.val_every
    if boundary and every and validates_after(run, every, loop.n_train, batch_idx + 1):
        # before on_batch_end: a checkpoint taken there holds this validation's result, and
        # the RNG it drew, so a run resumed from it goes on as the uninterrupted one
        evaluate(run, loop.call, loop.val_data, loop.n_val, "validation")
    hooks.on_batch_end()
    return boundary


def forward_backward(
    run: Run, loop: FitLoop, batch: Any, batch_idx: int, outputs: list[Any]
) -> Any:
    """``training_step`` → ``on_before_backward`` → ``backward`` → ``on_after_backward`` for
    each optimizer in turn. Returns what ``training_step`` returned (a list with several)."""
    hooks, scaler, accumulate = loop.hooks, run.scaler, run.config.accumulate_grad_batches
    several = len(run.optimizers) > 1
    outs = []
    for i, optimizer in enumerate(run.optimizers):
        with run.autocast:
            out = loop.forward(batch, batch_idx, *loop.step_args[i])
        loss = loss_of(out)
        loop.stopping.watch_loss(loss, run.global_step + 1)  # on the device: no waiting
        if accumulate > 1:
            loss = loss / accumulate
        if scaler is not None:
            loss = scaler.scale(loss)
        hooks.on_before_backward(loss)
        hooks.backward(run, loss, optimizer, i)
        hooks.on_after_backward()
        if loop.keep_outputs:
            outputs.append(detached(out))
        if several:
            outs.append(out)
    return outs if several else out


def optimizer_step(run: Run, loop: FitLoop) -> None:
    """Per optimizer: ``on_before_optimizer_step``, clip, step, ``on_before_zero_grad``,
    zero; then the step-interval schedulers and the step's metrics."""
    scaler, clip = run.scaler, loop.clip
    unscale = clip is not None or loop.unscale_first
    for optimizer, group in zip(run.optimizers, loop.params):
        # 16-mixed: the hook sees, and clipping bounds, the true gradients
        if scaler is not None and unscale:
            scaler.unscale_(optimizer)
        loop.hooks.on_before_optimizer_step(optimizer)
        if clip is not None:
            clip(group)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped if a gradient is inf/nan
        loop.hooks.on_before_zero_grad(optimizer)
        optimizer.zero_grad()
    if scaler is not None:
        scaler.update()
    run.global_step += 1
    optim.step_schedulers(run.schedulers, "step", run.global_step)
    run.reporter.after_step(run.collectives, run.global_step)


def end_epoch(run: Run, loop: FitLoop, module: Module, epoch: int, outputs: list[Any]) -> bool:
    """Validation, the epoch-end hooks, and one collective for the epoch's metrics and every
    rank's stop vote. Returns whether training stops here."""
    every = run.config.check_val_every_n_epoch  # None: by val_check_interval alone
    if loop.val_data is not None and every is not None and (epoch + 1) % every == 0:
        evaluate(run, loop.call, loop.val_data, loop.n_val, "validation")
    module.training_epoch_end(per_batch(outputs, len(run.optimizers)))
    run.epoch_finished = True
    loop.call(Hook.ON_TRAIN_EPOCH_END)
    loop.call(Hook.ON_EPOCH_END)
    vote = loop.stopping.epoch_vote(run.should_stop)
    stop = run.reporter.end_epoch(run.collectives, run.global_step, epoch, vote)
    if stop:
        run.should_stop = True
        save = lambda: _save_now(run)  # noqa: E731
        loop.stopping.for_signal(run.global_step, save, run.config.resume)
    optim.step_schedulers(run.schedulers, "epoch", epoch + 1)
    return stop or run.global_step >= _max_steps(run)


def finish(run: Run, loop: FitLoop) -> None:
    """The state fit ends with is checkpointed (unless just saved), then the end hooks."""
    callback = run.checkpoint_callback
    if callback is not None and callback.last_saved_step != run.global_step:
        callback.save(run.trainer)
    run.finish_checkpoint_writes()  # what fit returns with, or names, exists
    profiler = run.profiler
    if profiler is not None:  # one collective at the very end, only when profiling
        run.profile_report = report(run.collectives.gather_object(profiler.summary()))
        log.info("%s", run.profile_report)
    loop.call(Hook.ON_TRAIN_END)
    run.logger.finalize()
    loop.call(Hook.ON_FIT_END)
    loop.call(Hook.TEARDOWN, "fit")


def _ends_window(accumulate: int, loop: FitLoop, batch_idx: int) -> bool:
    """Whether the optimizers step after ``batch_idx``: an accumulation window ends there."""
    return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == loop.n_train


def _max_steps(run: Run) -> float:
    steps = run.config.max_steps
    return float("inf") if steps is None else steps


def _save_now(run: Run) -> Location:
    """A stop's checkpoint: through the ModelCheckpoint callback if there is one."""
    callback = run.checkpoint_callback
    if callback is not None:
        saved = callback.save(run.trainer)
    else:
        saved = run.save_checkpoint(
            run.checkpoint_dir / file_name(run.current_epoch, run.global_step)
        )
    run.finish_checkpoint_writes()  # the stop's message names it: it must exist
    return saved


def _say_where_files_went(run: Run) -> None:
    callback = run.checkpoint_callback
    if callback is not None and callback.saved:
        log.info("checkpoints: %s", callback.directory(run.trainer) / callback.saved[-1])
    for logger in run.logger.loggers:  # each one the user gave, by where it saved
        where = getattr(logger, "path", None) or logger.log_dir
        if where is None:
            continue
        if logger.name == "csv":
            log.info("metrics: %s", where)
        elif logger.name == "tensorboard":
            log.info("metrics: %s (tensorboard --logdir %s)", where, where)
        else:
            log.info("metrics: %s (%s)", where, logger.name)
