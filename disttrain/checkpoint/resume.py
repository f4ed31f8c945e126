"""Which checkpoint a run goes on from: ``resume`` (auto, a path, or none) and the run's files."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from disttrain.checkpoint.format import (
    LAST_NAME,
    SUFFIX,
    CheckpointError,
    Progress,
    check_fits,
    load,
    progress_of,
    shapes_of,
)
from disttrain.checkpoint.snapshot import restore
from disttrain.dist.fsdp import dcp_load, dcp_weight_shapes
from disttrain.ranks.table import Action, Hook
from disttrain.storage.location import Location

if TYPE_CHECKING:  # source.py imports what imports this module
    from disttrain.checkpoint.run_view import CheckpointedRun

log = logging.getLogger("disttrain.checkpoint")


class Resumed(NamedTuple):
    progress: Progress | None  # where training goes on
    rng: dict | None  # this rank's RNG state, to put back
    data: dict | None  # this rank's stream position (data/positions.py)
    # how many shares the checkpoint's run split the data into (its world size, or its
    # data-parallel ranks under tensor parallelism): a resume at another count reshards
    data_world_size: int | None


def resume(run: CheckpointedRun) -> Resumed:
    """Restore the checkpoint ``run.config.resume`` names (``auto``: the run directory's
    most advanced one; always ``auto`` after an elastic restart)."""
    state, source = _load_requested(run, starting_fit=True)
    if state is None:
        return Resumed(None, None, None, None)
    _check_fits(run, state, source)
    progress = restore(run, state)
    log.info("resumed from %s: epoch %d, step %d", source, progress.epoch, progress.global_step)
    rng = rng_for_rank(state, run.global_rank, run.world_size)
    saved_data_world = state.get("data_world_size", state.get("world_size"))
    same_world = state.get("world_size") == run.world_size
    same_world = same_world and saved_data_world == run.data_world_size
    data = state.get("data", [None] * run.world_size)[run.global_rank] if same_world else None
    return Resumed(progress, rng, data, saved_data_world)


def restore_weights(run: CheckpointedRun, path: str | None = None) -> None:
    """For validate/test/predict: the module's weights (and its on_load_checkpoint) from
    ``path`` if given, else from ``resume``, with the epoch and step they were trained to."""
    state, source = _load_requested(run, starting_fit=False, source=path)
    if state is not None:
        _check_fits(run, state, source)
        if "sharded" in state:
            dcp_load(run.running_module, [], state["sharded"])
        else:
            run.running_module.load_state_dict(state["module"])
        progress = Progress.from_dict(state["progress"])
        run.global_step, run.current_epoch = progress.global_step, progress.epoch
        run.running("validate").call(Hook.ON_LOAD_CHECKPOINT, state)
        log.info(
            "evaluating the weights of %s (epoch %d, step %d)",
            source,
            progress.epoch,
            progress.global_step,
        )


def _check_fits(run: CheckpointedRun, state: dict[str, Any], source: str | None) -> None:
    """A checkpoint of another model is refused naming the file and the first keys that
    differ, before anything of it is loaded."""
    module = run.running_module
    if "sharded" in state:
        own, saved = dcp_weight_shapes(module, state["sharded"])
    else:
        own, saved = shapes_of(module.state_dict()), shapes_of(state["module"])
    check_fits(type(module).__name__, own, saved, source)


def _load_requested(
    run: CheckpointedRun, *, starting_fit: bool, source: str | None = None
) -> tuple[dict | None, str | None]:
    source = source if source is not None else run.config.resume
    directory, dispatcher = run.checkpoint_dir, run.running("resume")
    if source is None and run.env.restart_count > 0:
        source = "auto"  # torchelastic restarted the group: go on from the last checkpoint
    if source is None:
        writes = run.checkpoint_callback is not None
        if starting_fit and writes:  # never silently beside another run's checkpoints
            earlier = dispatcher.run(Action.MANAGE_FILES, most_advanced, directory)
            if earlier is not None:  # (a config run is refused before it starts: cli/main)
                log.warning(
                    "%s holds checkpoints of an earlier run (the most advanced: %s); this fresh "
                    "run (resume=None) writes its own beside them, and resume='auto' would "
                    "later choose the most advanced of either. Give each run its own "
                    "default_root_dir to keep them apart.",
                    directory,
                    Path(earlier).name,
                )
        return None, None
    if source == "auto":
        source = dispatcher.run(Action.MANAGE_FILES, most_advanced, directory)
        if source is None:
            what = "starting fresh" if starting_fit else "evaluating the module as built"
            log.info("resume=auto: no checkpoint in %s, %s", directory, what)
            return None, None
    return dispatcher.run(Action.LOAD_CHECKPOINT, load, source), source


def rng_for_rank(checkpoint: dict[str, Any], rank: int, world_size: int) -> dict | None:
    """This rank's saved RNG state, or None (with a warning) at another world size."""
    if checkpoint.get("world_size") != world_size:
        log.warning(
            "resuming a checkpoint from world size %s at world size %s: each rank's random "
            "streams (dropout) start afresh; a training loader disttrain shards goes on with "
            "the rest of the epoch's samples, each trained once (README: Resume at another "
            "world size)",
            checkpoint.get("world_size"),
            world_size,
        )
        return None
    return checkpoint["rng"][rank]


def progress_key(progress: Progress) -> tuple[int, int, bool]:
    """Order of training progress: later step, then later epoch, then a finished epoch."""
    return progress.global_step, progress.epoch, progress.epoch_finished


def most_advanced(directory: str | os.PathLike | Location) -> str | None:
    """The complete checkpoint in ``directory`` (a path or URL) that is furthest into
    training, by the progress it holds (never by file times: a rerun's early checkpoints
    are newer files); its path or URL.

    What interrupted writes left is deleted first and never chosen (``Location``'s rules:
    hidden temporary names; on object stores a directory without its marker), and a
    checkpoint that an interrupted local replace had renamed aside is put back. Files that
    fail to load are skipped with a warning naming them.
    """
    where = Location.at(directory)
    for leftover in where.remove_incomplete(f"*{SUFFIX}"):
        log.warning("removed %s: the leftover of a checkpoint write that never completed", leftover)
    best: tuple[tuple[int, int, bool], str] | None = None
    for path in where.entries(f"*{SUFFIX}"):
        if not path.is_complete():
            continue
        try:
            key = progress_key(progress_of(path))
        except CheckpointError as err:
            log.warning("skipping %s", err)
            continue
        # on a tie prefer the named file over last.ckpt, its hard link
        if best is None or key > best[0] or (key == best[0] and best[1].endswith(LAST_NAME)):
            best = (key, str(path))
    return None if best is None else best[1]
