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
    Recorder,
    RecordingCallback,
    Regressor,
    Resumable,
    write_result,
)

import disttrain
from disttrain import HookFailed, Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced
from disttrain.data import loaders
from disttrain.data.streams import ShardedStream
from disttrain.observe.console import configure_logging


def recorded_fit(**options):
    """The golden run: 2 epochs of 2 batches, 2 validation batches, a 1-batch sanity check."""
    module = Recorder(n_train=16, n_val=7)
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        callbacks=[RecordingCallback(module.calls)],
        **options,
    )
    trainer.fit(module)
    return module, trainer


def golden(outdir):
    module, trainer = recorded_fit()
    fit_calls = list(module.calls)
    module.calls.clear()
    trainer.test(module)
    write_result(outdir, trainer.global_rank, {"fit": fit_calls, "test": module.calls})


class StopsOnRankOne(Regressor):
    """Rank 1 returns -1 from on_batch_start at batch 3 of epoch 0 only."""

    def __init__(self):
        super().__init__(n_train=16, batch_size=2)
        self.steps: dict[int, list[int]] = {}
        self.val_runs = 0
        self.epoch_ends = 0

    def on_batch_start(self, batch):
        batch_idx = len(self.steps.get(self.current_epoch, []))
        if self.global_rank == 1 and self.current_epoch == 0 and batch_idx == 3:
            return -1
        return None

    def training_step(self, batch, batch_idx):
        self.steps.setdefault(self.current_epoch, []).append(batch_idx)
        return super().training_step(batch, batch_idx)

    def on_post_performance_check(self):
        self.val_runs += 1

    def on_epoch_end(self):
        self.epoch_ends += 1


def stop_on_rank1(outdir):
    module = StopsOnRankOne()
    trainer = Trainer(max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "steps": module.steps,
            "val_runs": module.val_runs,
            "epoch_ends": module.epoch_ends,
            "global_step": trainer.global_step,
        },
    )


class FailingPrepare(Regressor):
    def prepare_data(self):
        raise OSError("disk full while writing the cache")


class StatefulPrepare(Regressor):
    def prepare_data(self):
        self.vocab = {"a": 1}


def _expect_hook_failure(outdir, module):
    trainer = Trainer(max_epochs=1, prepare_data_timeout=60)
    try:
        trainer.fit(module)
    except HookFailed as err:
        write_result(outdir, trainer.global_rank, {"error": str(err), "ranks": err.failed_ranks})
        raise
    write_result(outdir, trainer.global_rank, {"error": None})


def prepare_fails(outdir):
    _expect_hook_failure(outdir, FailingPrepare())


def prepare_assigns_state(outdir):
    _expect_hook_failure(outdir, StatefulPrepare())


def data_sharding(outdir):
    """Shuffled training shards per epoch, and an exact evaluation of an odd-sized set."""
    module = Regressor(n_train=16, n_val=7, batch_size=2, shuffle=True)
    per_epoch = {}

    class Track(disttrain.Callback):
        def on_epoch_end(self, trainer, m):
            per_epoch[trainer.current_epoch] = list(m.seen)
            m.seen.clear()

    trainer = Trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Track()], seed=7)
    trainer.fit(module)
    module.val_seen.clear()
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, {"train": per_epoch, "val": module.val_seen})


class TwoHeads(Regressor):
    """Two optimizers, each over its own head: exercises optimizer_idx and unused parameters."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.other = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, y, _ = batch
        head = self.net if optimizer_idx == 0 else self.other
        return torch.nn.functional.mse_loss(head(x).squeeze(-1), y)

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net.parameters(), lr=0.1),
            torch.optim.SGD(self.other.parameters(), lr=0.05, momentum=0.9),
        ]


def correctness(outdir):
    """Three trainings whose final weights the test compares with a hand-written loop."""
    results = {}
    runs = {
        "plain": (Regressor, {}),
        "accumulate_clip": (Regressor, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}),
        "two_optimizers": (TwoHeads, {"accumulate_grad_batches": 2}),
    }
    for name, (cls, options) in runs.items():
        disttrain.seed_everything(0)
        module = cls(n_train=16, batch_size=2, shuffle=True)
        root = f"runs/{name}"  # each run its own directory: a fresh fit never mixes them
        trainer = Trainer(
            max_epochs=2, num_sanity_val_steps=0, seed=3, default_root_dir=root, **options
        )
        trainer.fit(module)
        results[name] = {k: v.tolist() for k, v in module.state_dict().items()}
    write_result(outdir, trainer.global_rank, results)


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


def vote_on_a_micro_step(outdir):
    """The last rank asks to stop on a micro-step inside an accumulation window (a no_sync
    backward); the vote rides the window's synchronised backward. Precision and compile
    come from the environment."""
    import torch._dynamo

    torch._dynamo.config.error_on_recompile = True  # a vote must not recompile the model

    class AsksToStop(disttrain.Callback):
        def on_batch_end(self, trainer, module):
            voter = trainer.world_size - 1
            step_two_done = trainer.global_step == 2 and not trainer.at_step_boundary
            if trainer.global_rank == voter and step_two_done:
                trainer.should_stop = True  # batch 4: a micro-step of step 3

    trainer = Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        precision=os.environ["PRECISION"],
        compile=os.environ.get("COMPILE") == "1",
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=[AsksToStop()],
    )

    class Plain(Regressor):
        def training_step(self, batch, batch_idx):  # no Python state: nothing else recompiles
            x, y, _ = batch
            return torch.nn.functional.mse_loss(self(x), y)

    trainer.fit(Plain(n_train=64))
    write_result(outdir, trainer.global_rank, {"stopped_after": trainer.global_step})


def _train(run_dir, **options):
    disttrain.seed_everything(0)
    module = Resumable()
    trainer = Trainer(default_root_dir=str(run_dir), num_sanity_val_steps=1, seed=5, **options)
    trainer.fit(module)
    return {k: v.clone() for k, v in module.state_dict().items()}


def resume_runs(root, world_size):
    """Stop after step k, resume with resume="auto", compare with an uninterrupted run."""
    root = Path(root)
    per_epoch = 24 // (2 * world_size)
    full = _train(root / "full", max_epochs=3)
    results = {}
    for name, stop_after in {"mid_epoch": per_epoch + 2, "epoch_boundary": per_epoch}.items():
        run_dir = root / name
        _train(run_dir, max_epochs=3, max_steps=stop_after)
        newest = most_advanced(run_dir / "checkpoints")
        progress = checkpoint.load(newest)["progress"]
        resumed = _train(run_dir, max_epochs=3, resume="auto")
        results[name] = {
            "bitwise": all(torch.equal(full[k], resumed[k]) for k in full),
            "progress": progress,
        }
    return results


def resume_bitwise(outdir):
    results = resume_runs(Path(outdir) / "runs", int(os.environ["WORLD_SIZE"]))
    write_result(outdir, int(os.environ["RANK"]), results)


def early_stop_one_rank(outdir):
    from common import SplitOpinion

    module = SplitOpinion(n_train=16)
    stopper = disttrain.EarlyStopping(monitor="val_loss", patience=1)
    trainer = Trainer(
        max_epochs=6, num_sanity_val_steps=0, callbacks=[stopper], enable_checkpointing=False
    )
    trainer.fit(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "stopped_epoch": stopper.stopped_epoch,
        },
    )


def exact_metrics(outdir):
    from common import LogsMetrics

    disttrain.seed_everything(0)
    module = LogsMetrics(n_val=7, batch_size=2)
    trainer = Trainer(enable_checkpointing=False, logger=None)
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, dict(trainer.callback_metrics))


def count_collectives(outdir):
    """Count every torch.distributed call per training step with the benchmark's own counter
    (DDP's gradient all-reduce, in C++, is not a Python call)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from common import LogsMetrics
    from overhead import CollectiveCounter

    counter = CollectiveCounter()
    current = counter.current
    windows = []

    class Windows(disttrain.Callback):
        def on_epoch_start(self, trainer, module):
            windows.append(("epoch_start", trainer.current_epoch, dict(current)))
            current.clear()

        def on_batch_start(self, trainer, module, batch):
            windows.append(("batch_start", trainer.current_epoch, dict(current)))
            current.clear()

    class FromStream(LogsMetrics):  # a ShardedStream read by 2 workers, its position kept
        def train_dataloader(self):
            from data_resume import sharded_stream

            return torch.utils.data.DataLoader(sharded_stream(), batch_size=2, num_workers=2)

    stream = os.environ.get("DATA") == "stream"
    module = (FromStream if stream else LogsMetrics)(n_train=32, batch_size=2)
    trainer = Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        log_every_n_steps=1,
        callbacks=[Windows()],
    )
    trainer.fit(module)
    write_result(outdir, trainer.global_rank, {"windows": windows, "tail": dict(current)})


class Wide(Regressor):
    """Parameters dominate: two wide layers, so sharding them halves each rank's share."""

    def __init__(self):
        super().__init__(n_train=32, batch_size=4, shuffle=True)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1)
        )
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def fsdp_vs_ddp(outdir):
    """The same seed and data under DDP and FSDP: loss curves, parameter bytes per rank."""

    result = {}
    runs = {
        "ddp": {"strategy": "ddp"},
        "fsdp": {"strategy": "fsdp"},
        "fsdp_bf16_ac": {
            "strategy": "fsdp",
            "precision": "bf16-mixed",
            "activation_checkpointing": True,
        },
    }
    for run, options in runs.items():
        disttrain.seed_everything(0)
        module = Wide()
        trainer = Trainer(
            max_epochs=2,
            num_sanity_val_steps=1,
            enable_checkpointing=False,
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            **options,
        )
        trainer.fit(module)
        local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            for p in module.parameters()
        )
        result[run] = {"losses": module.losses, "param_elements": local}
    recorder, trainer = recorded_fit(strategy="fsdp", enable_checkpointing=False)
    result["fsdp_calls"] = recorder.calls
    write_result(outdir, trainer.global_rank, result)


class WideExport(Wide):
    """Wide, exporting its whole weights at the end of fit (a collective under FSDP)."""

    def __init__(self, export):
        super().__init__()
        self.export = export

    def on_fit_end(self):
        self.trainer.export_weights(self.export)


def _fsdp_run(root, name, **options):
    disttrain.seed_everything(0)
    module = WideExport(str(Path(root) / f"{name}.pt"))
    Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        strategy="fsdp",
        seed=1,
        default_root_dir=str(Path(root) / options.pop("run", name)),
        **options,
    ).fit(module)
    return len(module.losses)


def fsdp_resume(outdir):
    """Sharded checkpoints: stop after step 6 (mid-epoch), resume, compare with a full run."""
    steps = {
        "full": _fsdp_run(outdir, "full"),
        "stopped": _fsdp_run(outdir, "at_step_6", run="stopped", max_steps=6),
        "resumed": _fsdp_run(outdir, "resumed", run="stopped", resume="auto"),
    }
    write_result(outdir, int(os.environ["RANK"]), steps)


def fsdp_save_one_rank(outdir):
    """A sharded checkpoint written at world size 1 (the test loads it at 2)."""
    _fsdp_run(outdir, "one_rank", max_steps=3)
    write_result(outdir, 0, {"done": True})


def fsdp_load(outdir):
    """Evaluate the checkpoint named by $CKPT at this world size; export what was loaded."""
    disttrain.seed_everything(123)  # other initial weights: only the checkpoint can match
    module = Wide()
    trainer = Trainer(
        strategy="fsdp",
        resume=os.environ["CKPT"],
        enable_checkpointing=False,
        default_root_dir=str(outdir),
    )

    class Export(disttrain.Callback):
        def on_post_performance_check(self, trainer, m):
            trainer.export_weights(Path(outdir) / "loaded.pt")

    trainer.callbacks.append(Export())
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, {"done": True})


def fsdp_uneven_eval(outdir):
    """FSDP, 2 ranks, 9 validation samples in batches of 4: rank 0 holds 2 batches, rank 1
    one. Every sample must be evaluated once, with no rank left waiting in an all-gather (a
    short collective timeout makes a hang fail in seconds instead of 30 minutes)."""
    from common import LogsMetrics

    class Counts(LogsMetrics):
        def validation_step(self, batch, batch_idx):
            self.val_seen.extend(batch[2].tolist())
            return super().validation_step(batch, batch_idx)

    disttrain.seed_everything(0)
    module = Counts(n_train=8, n_val=9, batch_size=4)
    trainer = Trainer(
        strategy="fsdp",
        max_epochs=1,
        num_sanity_val_steps=2,  # the first forwards of the run are an uneven evaluation
        enable_checkpointing=False,
        logger=None,
        timeout=20.0,
        default_root_dir=str(outdir),
    )

    class Export(disttrain.Callback):
        def on_fit_end(self, trainer, m):
            trainer.export_weights(Path(outdir) / "weights.pt")

    trainer.callbacks.append(Export())
    trainer.fit(module)
    seen = list(module.val_seen)
    write_result(outdir, trainer.global_rank, {"val_seen": seen, **trainer.callback_metrics})


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
                loaders.set_epoch(loader, epoch)
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
