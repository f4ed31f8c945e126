"""Checkpoints at an fsspec URL: ``ModelCheckpoint(dirpath="s3://...")`` (moto's S3 server,
a real subprocess on a socket: conftest ``s3``) or ``file://...``, for DDP files and FSDP's
DCP directories, written synchronously or in the background (``async_checkpointing``). A run
stopped by ``max_steps`` resumes with ``resume="auto"`` from the URL to the very weights of
the uninterrupted run, and never chooses what an interrupted write left there (a DCP
directory without its marker, a hidden temporary object), however advanced it looks.

Each scenario is one 2-rank torchrun launch doing three fits; rank 0 exports the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from common import WideExport, read_results, run_scenario, write_result
from conftest import run_beside

import disttrain
from disttrain import ModelCheckpoint, Trainer
from disttrain.storage.location import Location


def _fit(outdir: str, name: str, dirpath: str | None, **options) -> int:
    """``WideExport`` (8 steps at 2 ranks over 2 epochs, shuffled), checkpoints every 2 steps
    at ``dirpath``; returns the steps this fit trained."""
    disttrain.seed_everything(0)
    module = WideExport(str(Path(outdir) / f"{name}.pt"))
    callbacks = [ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, every_n_epochs=None)]
    Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        strategy=os.environ["STRATEGY"],
        seed=1,
        logger=None,
        enable_progress_bar=False,
        default_root_dir=str(Path(outdir) / name),
        callbacks=callbacks if dirpath else [],
        enable_checkpointing=bool(dirpath),
        timeout=60,
        async_checkpointing=os.environ["ASYNC"] == "1",
        **options,
    ).fit(module)
    return len(module.losses)


def _plant_leftovers(url: str) -> None:
    """What interrupted writes leave, each named further into training than any checkpoint."""
    where = Location.at(url)
    # a DCP directory never completed: not renamed into place, or (S3) without its marker
    half_written = (where / "epoch=1-step=99.ckpt").staging()
    (half_written / ".metadata").write_with(lambda f: f.write(b"not yet"))
    (where / ".epoch=1-step=98.ckpt.1a2b3c4d.tmp").write_with(lambda f: f.write(b"half"))


def resume_from_url(outdir: str) -> None:
    url = os.environ["CKPT_URL"]
    rank = int(os.environ["RANK"])
    steps = {
        "full": _fit(outdir, "full", None),
        "stopped": _fit(outdir, "stopped", url, max_steps=6),
    }
    if rank == 0:
        _plant_leftovers(url)
    steps["resumed"] = _fit(outdir, "resumed", url, resume="auto")
    names = [e.name for e in Location.at(url).entries() if e.is_complete()]
    write_result(outdir, rank, {"steps": steps, "complete": names})


@pytest.mark.parametrize(
    "strategy, store, writes",
    [
        ("ddp", "s3", "sync"),
        ("fsdp", "s3", "sync"),
        ("ddp", "file", "async"),
        ("fsdp", "file", "async"),
    ],
    ids=["ddp-s3", "fsdp-s3", "ddp-file-async", "fsdp-file-async"],
)
def test_a_run_resumes_exactly_from_checkpoints_at_a_url(
    tmp_path, request, strategy, store, writes
):
    if store == "s3":
        url = f"{request.getfixturevalue('s3').url}/checkpoints"
    else:
        url = f"file://{tmp_path / 'store' / 'checkpoints'}"
    outdir = tmp_path / "out"
    run_beside(
        __file__,
        "resume_from_url",
        outdir,
        timeout=240,
        STRATEGY=strategy,
        CKPT_URL=url,
        ASYNC=int(writes == "async"),
    )
    for result in read_results(outdir, 2):  # the resumed run trained only what was left
        assert result["steps"] == {"full": 8, "stopped": 6, "resumed": 2}
        # keep_last_k=1: the newest checkpoint (and its hard link where there are any); the
        # leftovers were cleared before resuming
        links = ["last.ckpt"] if (strategy, store) == ("ddp", "file") else []
        assert result["complete"] == ["epoch=1-step=8.ckpt", *links], result
    full = torch.load(outdir / "full.pt", weights_only=True)
    resumed = torch.load(outdir / "resumed.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert not list(tmp_path.glob("*:")), "a URL was taken for a local path"


if __name__ == "__main__":
    run_scenario(globals())
