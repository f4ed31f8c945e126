"""The character LM of ``charlm`` trained from token shard files: a streaming input pipeline.

``prepare_data`` (once, on global rank 0) also cuts the training split into ``n_shards``
consecutive shard files of uint8 token ids, nearly equal in size, under the run's data folder,
and writes ``manifest.json`` last: the shards are complete once it exists, and a later run
(or a resumed one) finds them and writes nothing. Training reads them through
``disttrain.ShardedStream``: the shard order is shuffled per epoch (the same permutation on
every rank), each of the ``world_size x num_workers`` readers takes its own shards whole, and
its windows pass through a shuffle buffer. Validation and test are the map-style loaders of
``CharLM``, so ``val_loss`` and ``test_loss`` are exactly comparable with ``configs/default.yaml``.

A training batch is a ``(batch_size, block_size + 1)`` uint8 tensor of windows, made input
and target in ``training_step``: one small tensor per batch through the loader workers' queue
(and to the device), where int64 input/target pairs cost the workers twice the CPU time on
this 2-core machine, time they take from the ranks' steps.

Windows never cross a shard's end, so each shard drops its last ``< block_size`` targets (the
map-style split drops them only at its end): 6528 windows an epoch against 6540 with 128
shards of context 64. With shards of equal window counts and ``n_shards`` a multiple of the
readers, every rank gets the same number of batches per epoch (102 at 2 ranks, as the
map-style run). Many small shards mix better: a reader's shuffle buffer of 1024 windows holds
windows of about 20 of its 32 shards (of 5 of 8 with 32 shards, where the first epoch's
validation loss came out about 0.02 nats above the map-style run's).

``DataWait`` (a callback, on in ``configs/stream.yaml`` with ``profiler: simple``) says at the
end of training which share of the training epochs' time went to waiting for the next batch:
the profiler's ``data loading`` total over the time from each epoch's start to its last step.

    disttrain launch fit --config configs/stream.yaml
    python -m disttrain.examples.charstream          # one process, debug mode
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import disttrain
from disttrain.examples.charlm import CharLM, split

log = logging.getLogger("disttrain.examples.charstream")

MANIFEST = "manifest.json"


def read_windows(path: str, block: int) -> Iterator[torch.Tensor]:
    """The windows of one shard file, in order: ``block + 1`` uint8 token ids each, as
    ``CharLM``'s windows but within the shard. (Module level: loader workers started by spawn
    receive it pickled.)"""
    ids = torch.from_file(path, size=os.path.getsize(path), dtype=torch.uint8)
    for start in range(0, len(ids) - block, block):
        yield ids[start : start + block + 1]


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a file


class CharStreamLM(CharLM):
    """``CharLM`` whose training data streams from shard files (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | None = None,
        block_size: int = 64,
        n_embd: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        dropout: float = 0.0,
        batch_size: int = 32,
        lr: float = 3e-3,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        sample_chars: int = 200,
        n_shards: int = 128,
        shuffle_buffer: int = 1024,
        num_workers: int = 2,
    ) -> None:
        super().__init__(
            data_dir,
            block_size,
            n_embd,
            n_layer,
            n_head,
            dropout,
            batch_size,
            lr,
            val_fraction,
            test_fraction,
            sample_chars,
        )
        self.n_shards, self.shuffle_buffer, self.num_workers = n_shards, shuffle_buffer, num_workers

    def training_step(self, batch, batch_idx):
        windows = batch.long()  # uint8 until here: 1 byte per token from the loader workers
        return super().training_step((windows[:, :-1], windows[:, 1:]), batch_idx)

    # -- data -----------------------------------------------------------------------------
    def shard_dir(self) -> Path:
        return self._cache().parent / f"charstream-train-{self.n_shards}-shards"

    def _split_record(self) -> dict[str, Any]:
        """What the shards were cut from: a manifest that differs means cut them again."""
        return {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}

    def _manifest(self) -> dict[str, Any] | None:
        path = self.shard_dir() / MANIFEST
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        return manifest if manifest["split"] == self._split_record() else None

    def prepare_data(self) -> None:
        super().prepare_data()  # the tokenised corpus
        if self._manifest() is not None:
            return
        ids = torch.load(self._cache(), weights_only=True)["ids"]
        train_ids, _, _ = split(ids, self.val_fraction, self.test_fraction)
        folder = self.shard_dir()
        folder.mkdir(parents=True, exist_ok=True)
        names, tokens = [], []
        for i, shard in enumerate(torch.tensor_split(train_ids, self.n_shards)):
            names.append(f"shard-{i:04d}.bin")
            tokens.append(len(shard))
            write_atomically(folder / names[-1], bytes(shard.tolist()))
        manifest = {"shards": names, "tokens": tokens, "split": self._split_record()}
        write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1).encode())  # last
        log.info("wrote %d token shards (%d tokens) to %s", len(names), sum(tokens), folder)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        manifest = self._manifest()
        if manifest is None:
            raise FileNotFoundError(
                f"no complete shards in {self.shard_dir()} (its {MANIFEST} is missing or was "
                "written for another split): prepare_data writes them"
            )
        self.shard_paths = [str(self.shard_dir() / name) for name in manifest["shards"]]

    def train_dataloader(self):
        stream = disttrain.ShardedStream(
            self.shard_paths,
            functools.partial(read_windows, block=self.block_size),
            shuffle_buffer=self.shuffle_buffer,
        )
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )


class DataWait(disttrain.Callback):
    """At the end of training, the share of the training epochs' time spent waiting for
    batches: the profiler's ``data loading`` total over the time from each epoch's start to its
    last step, the largest share over the ranks (one collective, at the end, only with
    ``profiler: simple``). Kept as ``share``; ``batches`` counts this rank's trained batches."""

    def __init__(self) -> None:
        self.epochs: list[list[float]] = []  # [start, end of the last step] per epoch
        self.batches = 0
        self.share = float("nan")

    def on_epoch_start(self, trainer, module) -> None:
        now = time.perf_counter()
        self.epochs.append([now, now])

    def on_batch_end(self, trainer, module) -> None:
        self.epochs[-1][1] = time.perf_counter()
        self.batches += 1

    def on_train_end(self, trainer, module) -> None:
        if trainer.profiler is None:
            log.warning("DataWait: the profiler is off (trainer.profiler: simple turns it on)")
            return
        waited = trainer.profiler.totals.get("data loading", 0.0)
        in_epochs = sum(end - start for start, end in self.epochs)
        local = torch.tensor([waited / in_epochs if in_epochs else 0.0], dtype=torch.float64)
        self.share = float(trainer.all_reduce(local, "max"))  # on the backend's device
        log.info(
            "waiting for data: %.2f%% of the training epochs' time on the slowest rank "
            "(rank %d: %.2f s of %.1f s, %d batches)",
            100 * self.share,
            trainer.global_rank,
            waited,
            in_epochs,
            self.batches,
        )


def tokens_per_batch(batch) -> int:
    """The tokens a training batch trains on (``ThroughputMonitor(tokens_per_batch=...)``):
    each window's inputs, one fewer than its length."""
    return batch.shape[0] * (batch.shape[1] - 1)


if __name__ == "__main__":
    disttrain.seed_everything(0)
    trainer = disttrain.Trainer(
        max_epochs=1, profiler="simple", callbacks=[DataWait()], default_root_dir="runs/charstream"
    )
    trainer.fit(CharStreamLM())
