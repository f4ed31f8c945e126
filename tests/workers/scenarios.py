"""Worker scenarios, each run on every rank by a test: ``scenarios.py NAME OUTDIR``.

Each writes what its rank saw to ``OUTDIR/rank{r}.json`` for the test to compare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from common import (
    IndexedData,
    Regressor,
    WideExport,
    write_result,
)

import disttrain
from disttrain import Trainer
from disttrain.data import loaders
from disttrain.data.streams import ShardedStream
from disttrain.observe.console import configure_logging


def gpu(outdir):
    """NCCL at world size 1: batches on cuda:LOCAL_RANK, bf16 autocast, pinned transfers."""
    seen = {}

    class OnGpu(Regressor):
        def train_dataloader(self):  # pinned because asked for: disttrain keeps the option
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(
                loader.dataset, batch_size=loader.batch_size, pin_memory=True
            )

        def on_batch_start(self, batch):
            seen["pinned"] = batch[0].is_pinned()

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            out = self(x)
            seen.update(device=str(x.device), dtype=str(out.dtype))
            return torch.nn.functional.mse_loss(out.float(), y)

    backend = {}

    class Backend(disttrain.Callback):
        def on_train_start(self, trainer, module):
            backend["name"] = trainer.backend

        def on_batch_end(self, trainer, module):
            if trainer.global_step == 2:
                trainer.should_stop = True  # carried by step 3's all-reduce, read after step 4

    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=8,
        precision="bf16-mixed",
        accelerator="cuda",
        num_sanity_val_steps=0,
        callbacks=[Backend()],
    )
    trainer.fit(OnGpu())
    result = {**seen, "backend": backend["name"], "stopped_after": trainer.global_step}
    write_result(outdir, trainer.global_rank, result)


def gpu_validation_fp16(outdir):
    """CUDA/NCCL at this world size: 16-mixed training, a validation epoch whose end reduces
    with trainer.all_reduce, and ModelCheckpoint(monitor=...) reducing its monitor."""

    class Validated(Regressor):
        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            return {"sse": ((self(x).float() - y) ** 2).sum(), "n": torch.tensor(len(y))}

        def validation_epoch_end(self, outputs):
            totals = torch.zeros(2, device=next(self.parameters()).device)  # NCCL: CUDA
            for out in outputs:
                totals += torch.stack([out["sse"], out["n"].to(totals)])
            self.trainer.all_reduce(totals)
            self.log("val_loss", totals[0] / totals[1], reduce="max")  # equal on every rank
            return {"val_n": totals[1]}

    disttrain.seed_everything(0)
    module = Validated(n_train=64, n_val=9, batch_size=4)
    trainer = Trainer(
        max_epochs=2,
        precision="16-mixed",
        accelerator="cuda",
        default_root_dir=str(outdir),
        callbacks=[disttrain.ModelCheckpoint(monitor="val_loss")],
        timeout=120.0,
    )
    trainer.fit(module)
    saved = sorted(p.name for p in trainer.checkpoint_dir.glob("*.ckpt"))
    write_result(
        outdir,
        trainer.global_rank,
        {
            "backend": trainer.backend,
            "scaler": trainer.scaler is not None,
            "val_n": trainer.callback_metrics.get("val_n"),
            "val_loss": trainer.callback_metrics.get("val_loss"),
            "checkpoints": saved,
        },
    )


def gpu_fsdp_bf16_resume(outdir):
    """FSDP2 on CUDA with bf16: stop after step 6, resume from the DCP checkpoint, compare
    with an uninterrupted run; uneven validation shards (9 samples) on the way."""
    runs = {}
    for name, options in {
        "full": {},
        "stopped": {"max_steps": 6},
        "resumed": {"run": "stopped", "resume": "auto"},
    }.items():
        disttrain.seed_everything(0)
        module = WideExport(str(Path(outdir) / f"{name}.pt"))
        module.n_val = 9
        Trainer(
            max_epochs=2,
            num_sanity_val_steps=2,
            strategy="fsdp",
            precision="bf16-mixed",
            accelerator="cuda",
            seed=1,
            timeout=120.0,
            default_root_dir=str(Path(outdir) / options.pop("run", name)),
            **options,
        ).fit(module)
        runs[name] = len(module.losses)
    write_result(outdir, int(os.environ["RANK"]), runs)


# -- streaming data (disttrain/data/streams.py) ------------------------------------------
def _stream_sample(shard, k):
    """Sample ``k`` of ``shard`` (an (id, size) pair): (x, y, sample id, loader worker)."""
    sid = shard[0] * 100 + k
    x = torch.tensor([sid % 7, sid % 5, sid % 3, 1.0]) / 7
    worker = torch.utils.data.get_worker_info()
    return x, x.sum(), sid, -1 if worker is None else worker.id


def read_stream_shard(shard):
    return (_stream_sample(shard, k) for k in range(shard[1]))


def _stream_loader(shards, workers, shuffle_buffer=0, batch_size=2):
    stream = ShardedStream(shards, read_stream_shard, shuffle_buffer=shuffle_buffer)
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )


def stream_counts(outdir):
    """Without a trainer: the trainer's loader preparation and epoch start, then every
    (sample, worker) this rank reads in epochs 0 and 1, for many shards and for fewer shards
    than readers, with 0 and 2 loader workers (persistent: the epoch must reach them)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    configure_logging(rank)
    result = {}
    for workers in (0, 2):
        readers = world * max(1, workers)
        few = max(1, readers - 2)
        for kind, shards, buffer in (
            ("many", [(s, 3 + s % 3) for s in range(12)], 0),
            ("few", [(s, 5 + s) for s in range(few)], 3),
        ):
            loader = _stream_loader(shards, workers, buffer)
            loader = loaders.train_loader(loader, rank, world, 7, "S")
            for epoch in (0, 1):
                read = []
                with loaders.epoch_batches(loader, epoch, 0) as batches:
                    for _, _, sid, worker in batches:
                        read += zip(sid.tolist(), worker.tolist())
                result[f"{kind}/{workers}/{epoch}"] = {
                    "read": read,
                    "order": loader.dataset.shard_order(epoch),
                    "sizes": [size for _, size in shards],
                }
    write_result(outdir, rank, result)


class StreamRegressor(Regressor):
    """Trains from a ShardedStream of 8 shards of 4 samples, 2 loader workers."""

    def __init__(self, shards=8):
        super().__init__(batch_size=2)
        self.shards = [(s, 4) for s in range(shards)]
        self.per_epoch: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, sid, _ = batch
        self.per_epoch.setdefault(self.current_epoch, []).extend(sid.tolist())
        return torch.nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        return _stream_loader(self.shards, workers=2)


def stream_limits(outdir):
    """Whole epochs of a stream, then limit_train_batches=3 and max_steps=10 on a stream
    without a length: every rank's steps and samples per epoch."""
    result = {}
    for name, options in {
        "full": {"max_epochs": 2},
        "limit": {"max_epochs": 2, "limit_train_batches": 3},
        "max_steps": {"max_epochs": 3, "max_steps": 10},
    }.items():
        module = StreamRegressor()
        trainer = Trainer(
            num_sanity_val_steps=0,
            limit_val_batches=0,
            enable_checkpointing=False,
            default_root_dir=str(Path(outdir) / name),
            seed=3,
            **options,
        )
        trainer.fit(module)
        result[name] = {
            "steps": trainer.global_step,
            "per_epoch": module.per_epoch,
            "num_training_batches": str(trainer.num_training_batches),
        }
    write_result(outdir, int(os.environ["RANK"]), result)


class PlainStream(torch.utils.data.IterableDataset):
    """An IterableDataset that does not shard: every rank reads all 8 samples."""

    def __iter__(self):
        return (_stream_sample((0, 8), k)[:3] for k in range(8))


class PlainStreamRegressor(Regressor):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(PlainStream(), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(PlainStream(), batch_size=2)


def plain_stream(outdir):
    """A plain IterableDataset at world size 2, for training and validation: it trains."""
    module = PlainStreamRegressor()
    trainer = Trainer(max_epochs=2, num_sanity_val_steps=1, enable_checkpointing=False)
    trainer.fit(module)
    write_result(outdir, trainer.global_rank, {"steps": trainer.global_step, "seen": module.seen})


class UnevenStream(torch.utils.data.IterableDataset):
    """Rank 0 reads 10 batches of 2 samples, rank 1 reads 7: a stream that shards itself."""

    shards_by_rank = True

    def __iter__(self):
        rank = int(os.environ["RANK"])
        n = 2 * (10 if rank == 0 else 7)
        data = IndexedData(20)
        return (data[i] for i in range(n))


class UnevenBatches(torch.utils.data.Sampler):
    """A custom batch sampler with a length, which takes its rank's share (``num_replicas``
    and ``rank``): 10 batches on rank 0, 7 on rank 1."""

    def __init__(self):
        self.num_replicas, self.rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        self.n = 10 if self.rank == 0 else 7

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([[2 * b, 2 * b + 1] for b in range(self.n)])


class UnevenRegressor(Regressor):
    """Records the optimizer steps of every epoch; its data is uneven over the ranks."""

    def __init__(self, kind):
        super().__init__(n_train=20)
        self.kind = kind
        self.steps_at_epoch_end: list[int] = []

    def train_dataloader(self):
        if self.kind == "stream":
            return torch.utils.data.DataLoader(UnevenStream(), batch_size=2)
        return torch.utils.data.DataLoader(IndexedData(20), batch_sampler=UnevenBatches())

    def on_epoch_end(self):
        self.steps_at_epoch_end.append(self.trainer.global_step)

    def on_fit_end(self):  # while the process group lives: whole tensors, also under FSDP
        self.weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
            for k, v in self.state_dict().items()
        }


def uneven(outdir):
    """Rank 0 has 10 batches an epoch, rank 1 has 7 (a stream without a length, a custom
    batch sampler with one), 2 epochs, with and without accumulation; the strategy comes from
    the environment. A short collective timeout: a hang fails fast."""
    result = {}
    for kind in ("stream", "sampler"):
        for accumulate in (1, 2):
            disttrain.seed_everything(0)
            module = UnevenRegressor(kind)
            trainer = Trainer(
                max_epochs=2,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                enable_checkpointing=False,
                logger=None,
                accumulate_grad_batches=accumulate,
                strategy=os.environ["STRATEGY"],
                timeout=20,
                default_root_dir=str(Path(outdir) / f"{kind}{accumulate}"),
            )
            trainer.fit(module)
            result[f"{kind}/{accumulate}"] = {
                "steps_at_epoch_end": module.steps_at_epoch_end,
                "global_step": trainer.global_step,
                "seen": module.seen,
                "weights": module.weights,
            }
    write_result(outdir, int(os.environ["RANK"]), result)


if __name__ == "__main__":
    name, outdir = sys.argv[1], sys.argv[2]
    globals()[name](outdir)
