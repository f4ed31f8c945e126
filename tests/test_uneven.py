"""Uneven inputs: one rank's data ends before another's, and no rank hangs.

Rank 0 has 10 batches an epoch and rank 1 has 7 (a stream without a length, and a custom batch
sampler with one). Every rank leaves the epoch after the same optimizer step, the step where
the shortest rank's data ends, with every gradient synchronised: equal step counts and equal
weights on both ranks. A collective timeout of 20 s makes a hang fail fast.
"""

from __future__ import annotations

import pytest
from common import read_results

# optimizer steps per epoch, by (data, accumulate_grad_batches): rank 1's 7 batches decide.
# A stream's last, partial window (batch 6 with accumulation 2) is dropped as at any epoch's
# end; loaders with lengths agree on the shortest (7), whose last, partial window steps.
STEPS_PER_EPOCH = {"stream/1": 7, "sampler/1": 7, "stream/2": 3, "sampler/2": 4}
BATCHES_PER_EPOCH = {"stream/1": 7, "sampler/1": 7, "stream/2": 6, "sampler/2": 7}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_stops_at_the_shortest_data_after_the_same_step(scenario, strategy):
    _, outdir = scenario("uneven", nproc=2, timeout=150, STRATEGY=strategy)
    rank0, rank1 = read_results(outdir, 2)
    for run, steps in STEPS_PER_EPOCH.items():
        first, second = rank0[run], rank1[run]
        assert first["steps_at_epoch_end"] == second["steps_at_epoch_end"] == [steps, 2 * steps]
        assert first["global_step"] == second["global_step"] == 2 * steps
        assert first["weights"] == second["weights"], run
        # 2 epochs of 2 samples a batch, the same batches on both ranks (rank 0 drops the rest)
        assert len(first["seen"]) == len(second["seen"]) == 2 * 2 * BATCHES_PER_EPOCH[run], run
