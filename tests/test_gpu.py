"""The CUDA/NCCL path; skipped on machines without a GPU (it is never faked on CPU)."""

from __future__ import annotations

import pytest
import torch
from common import read_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
