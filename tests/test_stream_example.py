"""The streaming example (``configs/stream.yaml``, ``disttrain/examples/charstream.py``): shards
that partition the training split, written once, and a real 2-rank run of the config with a
tiny model: the same batches on every rank, a finite val_loss, the data-wait share reported."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch_two, worker_env

from disttrain.examples.charlm import Windows
from disttrain.examples.charstream import CharStreamLM, read_windows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> CharStreamLM:
    """The example after prepare_data and setup, with 7 shards (not dividing the split)."""
    module = CharStreamLM(data_dir=str(tmp_path_factory.mktemp("data")), n_shards=7)
    module.prepare_data()
    module.setup("fit")
    return module


def test_the_shards_partition_the_training_split_in_order(prepared):
    shards = [Path(path).read_bytes() for path in prepared.shard_paths]
    assert len(shards) == 7
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # as equal as can be
    assert torch.equal(torch.tensor(list(b"".join(shards)), dtype=torch.uint8), prepared.train_ids)


def test_a_shard_reads_as_the_map_style_windows_of_its_tokens(prepared):
    path = prepared.shard_paths[3]
    tokens = torch.tensor(list(Path(path).read_bytes()), dtype=torch.uint8)
    expected = Windows(tokens, 64)
    read = list(read_windows(path, 64))
    assert len(read) == len(expected) == (len(tokens) - 1) // 64
    for i, window in enumerate(read):
        x, y = expected[i]
        assert window.dtype == torch.uint8 and torch.equal(window.long(), torch.cat([x, y[-1:]]))


def test_prepare_data_writes_the_shards_once(prepared):
    folder = prepared.shard_dir()
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    prepared.prepare_data()  # a second run, or a resumed one, finds them complete
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written
    # shards cut for another split are not taken for this one
    other = CharStreamLM(data_dir=prepared.data_dir, n_shards=7, val_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="another split"):
        other.setup("fit")


TINY = [
    "model.init_args.block_size=16",
    "model.init_args.n_embd=32",
    "model.init_args.n_layer=1",
    "model.init_args.batch_size=8",
    "model.init_args.shuffle_buffer=64",
    "model.init_args.sample_chars=10",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=5",
]


@pytest.mark.timeout(90)
def test_stream_config_at_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    config = ROOT / "configs" / "stream.yaml"
    env = worker_env(DISTTRAIN_LOG_ALL_RANKS="1")
    proc = launch_two(config, f"run_dir={run_dir}", *TINY, timeout=80, env=env)
    out = proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert len(re.findall(r"wrote 128 token shards", out)) == 1  # global rank 0, once
    assert (run_dir / "data" / "charstream-train-128-shards" / "manifest.json").exists()
    waits = re.findall(
        r"\[rank (\d)\] waiting for data: ([\d.]+)% .*\(rank \d: .*, (\d+) batches\)", out
    )
    assert sorted(rank for rank, _, _ in waits) == ["0", "1"], out[-4000:]
    assert {batches for _, _, batches in waits} == {"10"}  # 2 epochs of 5, on every rank
    share = float(waits[0][1])
    assert 0.0 < share < 100.0 and {s for _, s, _ in waits} == {waits[0][1]}  # agreed
    assert re.search(r"data loading\s+10\s", out), "the profiler's data-loading row"
    losses = [float(v) for v in re.findall(r"\[rank 0\] .*val_loss ([\d.]+) nats/char", out)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
