"""The CUDA/NCCL path; skipped on machines without a GPU (it is never faked on CPU).

Two ranks when two devices are visible, else one. ``benchmarks/gpu_check.sh`` runs this file
and the overhead benchmark in one go. Each test's ranks run the scenario function written
above it (``conftest.run_beside``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from common import Regressor, WideExport, read_results, run_scenario, write_result
from conftest import ROOT, run_beside, worker_env

import disttrain
from disttrain import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NPROC = 2 if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else 1


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


def test_nccl_world_size_one_bf16_pinned_transfer_and_a_stop_vote(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "gpu", outdir, nproc=1)
    (result,) = read_results(outdir, 1)
    assert result == {
        "pinned": True,
        "device": "cuda:0",
        "dtype": "torch.bfloat16",
        "backend": "nccl",
        # voted after step 2, carried by step 3's gradient all-reduce; on a GPU that vote is
        # read one step later (the CPU never waits for the current step): stop after step 4
        "stopped_after": 4,
    }


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


def test_fp16_validation_all_reduce_and_a_monitored_checkpoint(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "gpu_validation_fp16", outdir, nproc=NPROC, timeout=300)
    results = read_results(outdir, NPROC)
    for result in results:
        assert result["backend"] == "nccl" and result["scaler"]
        assert result["val_n"] == 9.0  # every sample once, summed over the ranks on CUDA
        assert result["val_loss"] == results[0]["val_loss"] and result["val_loss"] > 0
    assert any("val_loss" in name for name in results[0]["checkpoints"]), results[0]


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


def test_fsdp_bf16_resumes_from_a_sharded_checkpoint(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "gpu_fsdp_bf16_resume", outdir, nproc=NPROC, timeout=400)
    for steps in read_results(outdir, NPROC):
        per_epoch = 32 // (4 * NPROC)
        assert steps == {"full": 2 * per_epoch, "stopped": 6, "resumed": 2 * per_epoch - 6}
    full = torch.load(outdir / "full.pt", weights_only=True)
    resumed = torch.load(outdir / "resumed.pt", weights_only=True)
    for key in full:  # bf16 kernels may differ in order of summation: close, not bitwise
        assert torch.allclose(full[key], resumed[key], rtol=1e-2, atol=1e-3), key


def test_the_char_lm_example_trains_on_cuda_and_reports_tokens_per_second(tmp_path):
    steps = int(os.environ.get("GPU_CHARLM_STEPS", "300"))
    cmd = [
        sys.executable, "-m", "disttrain", "launch", "--nproc-per-node", str(NPROC), "fit",
        "--config", str(ROOT / "configs" / "default.yaml"),
        "trainer.accelerator=cuda", f"trainer.max_steps={steps}", f"run_dir={tmp_path / 'lm'}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=worker_env())
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    losses = [float(x) for x in re.findall(r"val(?:idation)?[ _]loss\D{0,5}(\d+\.\d+)", out)]
    # tokens per optimizer step: batch size x context x ranks, from the resolved config
    import yaml

    config = yaml.safe_load((tmp_path / "lm" / "config.yaml").read_text())
    args = config["model"]["init_args"]
    tokens = steps * NPROC * args.get("batch_size", 32) * args.get("block_size", 64)
    print(f"\ncharlm on {NPROC} GPU(s): {steps} steps in {seconds:.1f}s (with start-up), "
          f"~{tokens / seconds:,.0f} tokens/s; validation losses {losses}")  # fmt: skip


if __name__ == "__main__":
    run_scenario(globals())
