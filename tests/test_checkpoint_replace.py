"""A checkpoint written where one of the other layout (a file, a DCP directory) has the same
name replaces it, and is never half-replaced: a crash at any point between the steps of the
replace leaves a complete checkpoint under that name, the old or the new one, which
``most_advanced`` chooses (after removing what the interrupted write left)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import pytest

from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced
from disttrain.storage import atomic

NAME = "epoch=0-step=4.ckpt"
LAYOUTS = ["file", "directory"]


def _state(which: str) -> dict:
    progress = checkpoint.Progress(epoch=0, global_step=4, next_batch=4, epoch_finished=False)
    return {
        "format": checkpoint.FORMAT,
        "module": {},
        "optimizers": [],
        "progress": dataclasses.asdict(progress),
        "rng": [],
        "which": which,
    }


def _save(path: Path, layout: str, which: str) -> None:
    """As a save writes it: one file, or a DCP directory (its ``.metadata`` stands in for
    what DCP writes) that global zero completes."""
    if layout == "file":
        checkpoint.write(path, _state(which))
        return
    checkpoint.begin_sharded(path)
    tmp = Path(checkpoint.sharded_staging(path))
    (tmp / ".metadata").write_bytes(pickle.dumps({}))
    (tmp / f"__0_0.{which}.distcp").write_bytes(b"shard")
    checkpoint.finish_sharded(path, _state(which))


def _which(path: str | Path) -> str:
    return checkpoint.load(path)["which"]


@pytest.fixture(params=["exchange", "two renames"])
def way(request, monkeypatch):
    """Both ways a replace can take: the atomic exchange (renameat2), and the fallback of
    two renames where the filesystem or the OS has no exchange."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    elif not atomic._exchange_available():
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    return request.param


@pytest.mark.parametrize("old", LAYOUTS)
@pytest.mark.parametrize("new", LAYOUTS)
def test_a_checkpoint_replaces_one_of_any_layout_at_its_name(tmp_path, old, new, way):
    path = tmp_path / NAME
    _save(path, old, "old")
    _save(path, new, "new")
    assert path.is_dir() == (new == "directory")
    assert _which(path) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]  # nothing of the old left
    assert most_advanced(tmp_path) == str(path)


@pytest.mark.parametrize("old", LAYOUTS)
@pytest.mark.parametrize("new", LAYOUTS)
def test_a_crash_at_any_point_of_a_replace_leaves_a_complete_checkpoint(
    tmp_path, monkeypatch, old, new, way
):
    """The run directory is copied before and after every step of the replace (each
    rename, exchange and removal): what a crash there would leave. In each copy
    ``most_advanced`` chooses the checkpoint's name, and it holds the old or the new one."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / NAME
    _save(path, old, "old")
    crashes: list[Path] = []

    def crash_here() -> None:
        crashes.append(tmp_path / f"crash{len(crashes)}")
        shutil.copytree(run, crashes[-1], symlinks=True)

    def watched(step):
        def run_step(*args, **kwargs):
            crash_here()
            result = step(*args, **kwargs)
            crash_here()
            return result

        return run_step

    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(atomic, "_exchange", watched(atomic._exchange))
    monkeypatch.setattr(atomic, "_discard", watched(atomic._discard))
    _save(path, new, "new")
    monkeypatch.undo()
    assert len(crashes) >= 2  # before and after each step
    seen = set()
    for crashed in crashes:
        chosen = most_advanced(crashed)
        assert chosen == str(crashed / NAME), sorted(os.listdir(crashed))
        seen.add(_which(chosen))
        assert sorted(os.listdir(crashed)) == [NAME]  # leftovers removed or put back
    assert seen == {"old", "new"}


def test_an_exchange_that_the_filesystem_refuses_falls_back(tmp_path, monkeypatch):
    """renameat2 answers EINVAL where a filesystem cannot exchange (NFS, some FUSE)."""
    import errno

    def refused(a, b, c, d, flags):
        return -1

    monkeypatch.setattr(atomic, "_renameat2", refused)
    monkeypatch.setattr(atomic.ctypes, "get_errno", lambda: errno.EINVAL)
    path = tmp_path / NAME
    _save(path, "directory", "old")
    _save(path, "file", "new")
    assert _which(path) == "new" and sorted(os.listdir(tmp_path)) == [NAME]


def test_a_sharded_checkpoint_removes_a_last_link_that_names_older_weights(tmp_path):
    # _rotate (global zero's file work after a save) is the unit: reaching it in public takes
    # an FSDP run over the directory of an earlier unsharded one
    from disttrain.callbacks.model_checkpoint import _rotate
    from disttrain.storage.location import Location

    (tmp_path / "epoch=0-step=2.ckpt").write_bytes(b"an earlier unsharded run's file")
    (tmp_path / "last.ckpt").write_bytes(b"an earlier unsharded run's file")
    sharded = tmp_path / "epoch=1-step=4.ckpt"
    sharded.mkdir()
    _rotate(Location.at(tmp_path), Location.at(sharded), [], save_last=True)
    assert not (tmp_path / "last.ckpt").exists()
