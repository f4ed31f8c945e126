"""Storage of checkpoints at a local path or any fsspec URL (``disttrain.storage.location``):
the same operations on a local path, ``file://``, ``s3://`` (moto's S3 server, a real
subprocess on a socket: conftest ``s3``) and ``memory://`` (the rule of other protocols),
and the atomicity contract of each: interrupted writes and removals leave the previous file
and nothing that ``is_complete`` accepts; a directory on S3 is complete only with its
marker, a local one once renamed. Ends with a 2-rank DCP save and load on ``s3://``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from common import read_results, run_scenario, write_result
from conftest import BUCKET, ROOT, run_beside

from disttrain.storage.backends import MARKER
from disttrain.storage.location import Location, is_complete

ALL = ["local", "file", "s3", "memory"]
PART = 5 << 20


@pytest.fixture
def root(request, tmp_path) -> Location:
    """An empty directory on the backend the test is parametrized with."""
    kind = request.param
    if kind == "local":
        return Location.at(str(tmp_path / "store"))
    if kind == "file":
        return Location.at(f"file://{tmp_path / 'store'}")
    if kind == "s3":  # parts of S3's smallest size, so that 6 MiB make a multipart upload
        return Location.at(request.getfixturevalue("s3").url, default_block_size=PART)
    return Location.at(f"memory://disttrain-tests/{secrets.token_hex(4)}")


def _put(location: Location, data: bytes) -> None:
    location.write_with(lambda f: f.write(data))


def _read(location: Location) -> bytes:
    with location.open_read() as f:
        return f.read()


def _complete(directory: Location) -> list[str]:
    return [entry.name for entry in directory.entries() if entry.is_complete()]


@pytest.mark.parametrize("root", ALL, indirect=True)
def test_files_are_written_read_listed_and_removed(root):
    _put(root / "a.ckpt", b"a")
    _put(root / "b.ckpt", b"b")
    _put(root.join("sub.ckpt", "shard"), b"s")
    _put(root / "notes.txt", b"n")
    assert [e.name for e in root.entries("*.ckpt")] == ["a.ckpt", "b.ckpt", "sub.ckpt"]
    assert _read(root / "b.ckpt") == b"b"
    assert (root / "sub.ckpt").is_dir() and not (root / "a.ckpt").is_dir()
    assert (root / "a.ckpt").exists() and not (root / "c.ckpt").exists()
    _put(root / "a.ckpt", b"a2")  # over the old one
    assert _read(root / "a.ckpt") == b"a2"
    (root / "a.ckpt").remove()
    (root / "sub.ckpt").remove()  # recursively
    (root / "never-written").remove()  # nothing there: nothing done
    assert [e.name for e in root.entries()] == ["b.ckpt", "notes.txt"]
    assert root.join("nothing").entries() == []


def test_a_file_url_is_a_local_path_and_a_url_keeps_its_protocol(tmp_path, s3):
    assert Location.at(f"file://{tmp_path}").local == tmp_path
    assert Location.at(f"file://{tmp_path}").renames
    remote = Location.at(s3.url)
    assert remote.local is None and not remote.renames
    assert str(remote / "x.ckpt") == f"{s3.url}/x.ckpt"
    assert (remote / "x.ckpt").parent == remote
    assert Location.at(str(remote)) == remote


@pytest.mark.parametrize("root", ["local", "file", "s3"], indirect=True)
def test_a_checkpoint_round_trips_through_torch_save_and_a_weights_only_load(root):
    state = {"module": {"w": torch.randn(64, 64)}, "progress": {"global_step": 7}}
    target = root / "epoch=0-step=7.ckpt"
    target.write_with(lambda f: torch.save(state, f))
    with target.open_read() as f:
        loaded = torch.load(f, weights_only=True)
    assert torch.equal(loaded["module"]["w"], state["module"]["w"])
    assert loaded["progress"] == {"global_step": 7} and is_complete(str(target))


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("root", ALL, indirect=True)
def test_a_writer_that_raises_leaves_the_previous_file_and_nothing_else_complete(root):
    on_s3 = root.url.startswith("s3://")

    def fail_after_writing(f) -> None:
        f.write(b"n" * (PART + 1))
        f.flush()
        if on_s3:  # a multipart upload is under way
            assert _multipart_uploads(root) != []
        raise Interrupted

    _put(root / "a.ckpt", b"old")
    for name in ("a.ckpt", "new.ckpt"):  # over a file, and at a fresh name
        with pytest.raises(Interrupted):
            (root / name).write_with(fail_after_writing)
    assert _read(root / "a.ckpt") == b"old"
    assert not (root / "new.ckpt").exists()
    assert _complete(root) == ["a.ckpt"]
    root.remove_incomplete("*.ckpt")
    assert [e.name for e in root.entries()] == ["a.ckpt"]
    if on_s3:  # aborted, not left behind
        assert _multipart_uploads(root) == []


def _multipart_uploads(under: Location) -> list[str]:
    """The keys of the multipart uploads begun under ``under`` and not completed."""
    import boto3

    key = under.path.split("/", 1)[1]
    listed = boto3.client("s3").list_multipart_uploads(Bucket=BUCKET, Prefix=key)
    return [upload["Key"] for upload in listed.get("Uploads", [])]


KILLED_WRITER = """
import json, sys, time
from pathlib import Path
from disttrain.storage.location import Location

def writer(f):
    f.write(b"n" * (6 << 20))  # past a 5 MiB part: a multipart upload is under way on S3
    f.flush()
    Path(sys.argv[2]).touch()
    time.sleep(600)

Location.at(sys.argv[1], **json.loads(sys.argv[3])).write_with(writer)
"""


@pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
def test_a_writer_killed_in_the_middle_leaves_the_previous_file(root, tmp_path):
    target = root / "a.ckpt"
    _put(target, b"old")
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = json.dumps(root.storage_options)
    cmd = [sys.executable, "-c", KILLED_WRITER, str(target), str(started), options]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # half way through its write
    stderr = proc.communicate()[1]
    assert started.exists(), f"the writer never got half way:\n{stderr}"
    assert _read(target) == b"old"
    assert _complete(root) == ["a.ckpt"]
    if root.local is not None:  # the half-written temporary file is there, hidden
        (leftover,) = [e for e in root.entries() if e.name != "a.ckpt"]
        assert leftover.name.startswith(".a.ckpt.") and not leftover.is_complete()
        assert root.remove_incomplete("*.ckpt") == [leftover.url]
    else:  # the parts sent so far belong to an upload nobody completed: no object shows it
        assert _multipart_uploads(target) == [target.path.split("/", 1)[1]]
    assert [e.name for e in root.entries()] == ["a.ckpt"]


def _write_shards(staging: Location) -> None:
    for rank in range(2):
        _put(staging / f"__{rank}_0.distcp", b"shard %d" % rank)
    _put(staging / ".metadata", b"metadata")


@pytest.mark.parametrize("root", ["s3", "memory"], indirect=True)
def test_a_directory_without_its_marker_is_never_complete_where_nothing_renames(root):
    target = root / "epoch=0-step=4.ckpt"
    staging = target.begin_directory()
    assert staging == target  # written in place
    _write_shards(staging)
    assert target.is_dir() and not target.is_complete()
    assert _complete(root) == []
    target.finish_directory(staging)
    assert target.is_complete() and (target / MARKER).exists()
    assert [e.name for e in target.entries()] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    target.begin_directory()  # written again at the same name: the old one withdrawn first
    assert not target.exists() and not target.is_complete()


@pytest.mark.parametrize("root", ["local", "file"], indirect=True)
def test_a_local_directory_is_complete_once_renamed_into_place(root):
    target = root / "epoch=0-step=4.ckpt"
    _put(target, b"an older checkpoint of the same name, a file")
    staging = target.begin_directory()
    assert staging.name == ".epoch=0-step=4.ckpt.tmp" and staging.parent == root
    _write_shards(staging)
    assert not staging.is_complete() and _read(target).startswith(b"an older")
    target.finish_directory(staging)
    assert target.is_dir() and target.is_complete() and not staging.exists()
    assert (target / MARKER).exists() and _complete(root) == ["epoch=0-step=4.ckpt"]


@pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
def test_an_interrupted_removal_leaves_no_complete_directory(root, monkeypatch):
    target = root / "epoch=0-step=4.ckpt"
    staging = target.begin_directory()
    _write_shards(staging)
    target.finish_directory(staging)

    def interrupted(*args, **kwargs):
        raise Interrupted

    if root.local is not None:
        monkeypatch.setattr(shutil, "rmtree", interrupted)
    else:
        monkeypatch.setattr(target._backend.fs, "rm", interrupted)  # after the marker went
    with pytest.raises(Interrupted):
        target.remove()
    monkeypatch.undo()
    assert not target.is_complete() and _complete(root) == []
    root.remove_incomplete("*.ckpt")
    assert root.entries() == []


@pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
def test_removing_incomplete_leftovers_never_removes_a_complete_checkpoint(root):
    _put(root / "epoch=0-step=2.ckpt", b"a complete file")
    for name, finished in (("epoch=0-step=4.ckpt", True), ("epoch=0-step=6.ckpt", False)):
        target = root / name
        staging = target.begin_directory()
        _write_shards(staging)
        if finished:
            target.finish_directory(staging)
    _put(root.join("logs", "metrics.csv"), b"not a checkpoint, and no marker")
    removed = root.remove_incomplete("*.ckpt")
    assert [Location.at(r).name for r in removed] == [
        ".epoch=0-step=6.ckpt.tmp" if root.local else "epoch=0-step=6.ckpt"
    ]
    kept = ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert [e.name for e in root.entries()] == [*kept, "logs"]
    assert _complete(root)[:2] == kept
    assert (root / "logs").is_complete() is bool(root.local)  # on S3: a directory, no marker


def test_dcp_is_given_torchs_local_writer_for_paths_and_its_fsspec_one_for_urls(tmp_path, s3):
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from disttrain.dist.dcp_io import storage_reader, storage_writer

    assert type(storage_writer(f"file://{tmp_path}")) is FileSystemWriter
    assert type(storage_reader(tmp_path)) is FileSystemReader
    writer = storage_writer(s3.url)
    assert type(writer).__name__ == "FsspecWriter" and writer.sync_files is False
    assert type(storage_reader(s3.url)).__name__ == "FsspecReader"


def dcp_on_s3(outdir: str) -> None:
    """Each rank: an FSDP2-sharded module saved to ``DCP_URL`` by DCP, completed by global
    zero, and loaded into a module initialised otherwise."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from disttrain.dist.dcp_io import storage_reader, storage_writer
    from disttrain.dist.fsdp import shard_fsdp

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def sharded(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        shard_fsdp(module, list(module), "32-true", activation_checkpointing=False)
        return module

    saved, target = sharded(0), Location.at(os.environ["DCP_URL"])
    if rank == 0:
        target.begin_directory()
    dist.barrier()
    dcp.save({"model": get_model_state_dict(saved)}, storage_writer=storage_writer(target))
    complete_before = target.is_complete()  # every shard and .metadata written: no marker yet
    dist.barrier()
    if rank == 0:
        target.finish_directory(target.staging())
    dist.barrier()
    loaded = sharded(1)
    expected, before = _local_shards(saved), _local_shards(loaded)
    state = {"model": get_model_state_dict(loaded)}
    dcp.load(state, storage_reader=storage_reader(target))
    set_model_state_dict(loaded, state["model"])
    got = _local_shards(loaded)
    write_result(
        outdir,
        rank,
        {
            "complete_before_marker": complete_before,
            "complete": target.is_complete(),
            "files": [e.name for e in target.entries()],
            "equal": expected.keys() == got.keys()
            and all(torch.equal(expected[k], got[k]) for k in expected),
            "differed_before_loading": not torch.equal(before["0.weight"], expected["0.weight"]),
            "shards": sorted(expected),
        },
    )
    dist.destroy_process_group()


def _local_shards(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of each parameter (FSDP2 keeps them as DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.to_local().clone() for k, v in get_model_state_dict(module).items()}


def test_two_ranks_save_and_load_a_sharded_checkpoint_on_s3(s3, tmp_path):
    url = f"{s3.url}/epoch=0-step=4.ckpt"
    run_beside(__file__, "dcp_on_s3", tmp_path / "out", nproc=2, timeout=120, DCP_URL=url)
    for result in read_results(tmp_path / "out", 2):
        assert result["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert result["complete_before_marker"] is False and result["complete"] is True
        assert result["differed_before_loading"] and result["equal"]
        assert result["shards"] == ["0.bias", "0.weight", "1.bias", "1.weight"]


WITHOUT_S3FS = """
import sys
sys.modules["s3fs"] = None  # as if the s3 extra were not installed
import disttrain
from disttrain.storage.location import Location
for where in (sys.argv[1], "file://" + sys.argv[1]):
    Location.at(where).join("x.ckpt").write_with(lambda f: f.write(b"x"))
try:
    Location.at("s3://bucket/prefix")
except ImportError as err:
    print(err)
"""


def test_without_s3fs_local_paths_work_and_an_s3_url_names_the_extra(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", WITHOUT_S3FS, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "s3://bucket/prefix" in proc.stdout and "disttrain[s3]" in proc.stdout
    assert (tmp_path / "x.ckpt").read_bytes() == b"x"


if __name__ == "__main__":
    run_scenario(globals())
