"""The CUDA/NCCL path; skipped on machines without a GPU (it is never faked on CPU).

Two ranks when two devices are visible, else one. ``benchmarks/gpu_check.sh`` runs this file
and the overhead benchmark in one go."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from common import read_results
from conftest import ROOT, worker_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NPROC = 2 if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else 1


def test_nccl_world_size_one_bf16_pinned_transfer_and_a_stop_vote(scenario):
    _, outdir = scenario("gpu", nproc=1)
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


def test_fp16_validation_all_reduce_and_a_monitored_checkpoint(scenario):
    _, outdir = scenario("gpu_validation_fp16", nproc=NPROC, timeout=300)
    results = read_results(outdir, NPROC)
    for result in results:
        assert result["backend"] == "nccl" and result["scaler"]
        assert result["val_n"] == 9.0  # every sample once, summed over the ranks on CUDA
        assert result["val_loss"] == results[0]["val_loss"] and result["val_loss"] > 0
    assert any("val_loss" in name for name in results[0]["checkpoints"]), results[0]


def test_fsdp_bf16_resumes_from_a_sharded_checkpoint(scenario):
    _, outdir = scenario("gpu_fsdp_bf16_resume", nproc=NPROC, timeout=400)
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
