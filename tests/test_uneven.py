"""Uneven inputs: one rank's data ends before another's, and no rank hangs.

Rank 0 has 10 batches an epoch and rank 1 has 7 (a stream without a length, and a custom batch
sampler with one). Every rank leaves the epoch after the same optimizer step, the step where
the shortest rank's data ends, with every gradient synchronised: equal step counts and equal
weights on both ranks. A collective timeout of 20 s makes a hang fail fast.

What the ranks run is the scenario ``uneven`` below (``conftest.run_beside``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, read_results, run_scenario, run_scenarios, write_result
from conftest import shared_launch

import disttrain
from disttrain import Trainer

# optimizer steps per epoch, by (data, accumulate_grad_batches): rank 1's 7 batches decide.
# A stream's last, partial window (batch 6 with accumulation 2) is dropped as at any epoch's
# end; loaders with lengths agree on the shortest (7), whose last, partial window steps.
STEPS_PER_EPOCH = {"stream/1": 7, "sampler/1": 7, "stream/2": 3, "sampler/2": 4}
BATCHES_PER_EPOCH = {"stream/1": 7, "sampler/1": 7, "stream/2": 6, "sampler/2": 7}


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


def uneven(outdir, strategy=None):
    """Rank 0 has 10 batches an epoch, rank 1 has 7 (a stream without a length, a custom
    batch sampler with one), 2 epochs, with and without accumulation; the strategy comes from
    the argument, else the environment. A short collective timeout: a hang fails fast."""
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
                strategy=strategy or os.environ["STRATEGY"],
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


def ddp(outdir):
    uneven(outdir, "ddp")


def fsdp(outdir):
    uneven(outdir, "fsdp")


def both_strategies(outdir):
    """Both strategies' runs in one launch, each in its own directory (``OUTDIR/STRATEGY``)."""
    run_scenarios(outdir, ddp, fsdp)


@pytest.fixture(scope="session")
def both(tmp_path_factory) -> Path:
    """``both_strategies``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "uneven-both", __file__, "both_strategies", nproc=2, timeout=300
    )  # 150 s each before


@pytest.mark.timeout(400)  # with the fixture's run (or the wait for it)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_stops_at_the_shortest_data_after_the_same_step(both, strategy):
    rank0, rank1 = read_results(both / strategy, 2)
    for run, steps in STEPS_PER_EPOCH.items():
        first, second = rank0[run], rank1[run]
        assert first["steps_at_epoch_end"] == second["steps_at_epoch_end"] == [steps, 2 * steps]
        assert first["global_step"] == second["global_step"] == 2 * steps
        assert first["weights"] == second["weights"], run
        # 2 epochs of 2 samples a batch, the same batches on both ranks (rank 0 drops the rest)
        assert len(first["seen"]) == len(second["seen"]) == 2 * 2 * BATCHES_PER_EPOCH[run], run


if __name__ == "__main__":
    run_scenario(globals())
