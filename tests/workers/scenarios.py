"""Worker scenarios, each run on every rank by a test: ``scenarios.py NAME OUTDIR``.

Each writes what its rank saw to ``OUTDIR/rank{r}.json`` for the test to compare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from common import (
    Regressor,
    WideExport,
    write_result,
)

import disttrain
from disttrain import Trainer


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


if __name__ == "__main__":
    name, outdir = sys.argv[1], sys.argv[2]
    globals()[name](outdir)
