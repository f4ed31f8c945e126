"""The votes that ride the gradient (``disttrain/loop/stopping.py::StopVote``) reach every
rank whatever gradient arrives at the loss from above: GradScaler's 65536 that overflows a
half-precision loss to inf, a user's ``backward`` that scales the loss further, one that
multiplies it by zero or by NaN. Both votes, the stop vote (``trainer.should_stop`` on one
rank) and the data-end vote (rank 1 reads 1 batch, rank 0 reads 6), under DDP and FSDP
(where the votes ride an agreement instead). A collective timeout of 20 s makes a hang fail
fast: every rank must end the epoch after the same step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, read_results, run_scenario, run_scenarios, write_result
from conftest import shared_launch

import disttrain
from disttrain import Trainer
from disttrain.loop.vote import StopVote

# what arrives at the loss from above: (precision, the user's backward, the loss's dtype)
UPSTREAM = {
    "fp16": ("16-mixed", None, torch.float16),  # GradScaler's 65536: inf in fp16
    "fp16-user-scaled": ("16-mixed", 2.0**10, torch.float16),  # inf for 10 more steps
    "zero": ("32", 0.0, torch.float32),
    "nan": ("32", float("nan"), torch.float32),
}
# the step after which every rank leaves the epoch (the fit has one): rank 1 votes "my data
# ends" in step 1's backward (it has one batch); it asks to stop after step 1, a vote that
# rides step 2's gradient all-reduce under DDP and is agreed at once under FSDP
ENDS_AFTER = {"ddp": {"data-end": 1, "stop": 2}, "fsdp": {"data-end": 1, "stop": 1}}
VOTES = ("data-end", "stop")


class Batches(torch.utils.data.IterableDataset):
    """A stream that shards itself: ``counts[rank]`` batches of 2 samples on each rank."""

    shards_by_rank = True

    def __init__(self, counts: tuple[int, int]) -> None:
        self.counts = counts

    def __iter__(self):
        data = IndexedData(12)
        n = 2 * self.counts[int(os.environ["RANK"])]
        return (data[i] for i in range(n))


class Voter(Regressor):
    """Returns its loss in ``dtype``; its ``backward`` multiplies the loss by ``factor``
    (None: the default backward); rank 1 asks to stop after step 1 when ``stop``."""

    def __init__(self, counts, dtype, factor, stop):
        super().__init__(n_train=12)
        self.counts, self.dtype, self.factor, self.stop = counts, dtype, factor, stop

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Batches(self.counts), batch_size=2)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx).to(self.dtype)

    def backward(self, trainer, loss, optimizer, optimizer_idx):
        (loss if self.factor is None else loss * self.factor).backward()

    def on_fit_end(self):  # whole tensors, also under FSDP: did every rank skip alike?
        self.weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist()
            for k, v in self.state_dict().items()
        }

    def on_batch_end(self):
        if self.stop and self.global_rank == 1 and self.global_step == 1:
            self.trainer.should_stop = True


def votes_whatever_the_gradient(outdir, strategy=None):
    """Every upstream gradient with both votes, one fit each; the strategy from the argument,
    else the environment."""
    result = {}
    for upstream, (precision, factor, dtype) in UPSTREAM.items():
        for vote in VOTES:
            disttrain.seed_everything(0)
            stop = vote == "stop"
            module = Voter((6, 6) if stop else (6, 1), dtype, factor, stop)
            trainer = Trainer(
                max_epochs=1,
                precision=precision,
                accelerator="cpu",
                num_sanity_val_steps=0,
                limit_val_batches=0,
                enable_checkpointing=False,
                logger=None,
                strategy=strategy or os.environ["STRATEGY"],
                timeout=20,
                # NaN from above makes the weights NaN, so the next step's loss is NaN: the
                # votes, not that guard, are what this test is about
                stop_on_nonfinite_loss=False,
                default_root_dir=str(Path(outdir) / f"{upstream}-{vote}"),
            )
            trainer.fit(module)
            result[f"{upstream}/{vote}"] = (trainer.global_step, module.weights)
    write_result(outdir, int(os.environ["RANK"]), result)


def ddp(outdir):
    votes_whatever_the_gradient(outdir, "ddp")


def fsdp(outdir):
    votes_whatever_the_gradient(outdir, "fsdp")


def both_strategies(outdir):
    """Both strategies' runs in one launch, each in its own directory (``OUTDIR/STRATEGY``)."""
    run_scenarios(outdir, ddp, fsdp)


@pytest.fixture(scope="session")
def both(tmp_path_factory) -> Path:
    """``both_strategies``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "vote_gradient-both", __file__, "both_strategies", nproc=2, timeout=400
    )  # 240 s each before


@pytest.mark.timeout(500)  # with the fixture's run (or the wait for it)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_hears_both_votes_whatever_gradient_reaches_the_loss(both, strategy):
    ends_after = ENDS_AFTER[strategy]
    expected = {f"{u}/{v}": ends_after[v] for u in UPSTREAM for v in VOTES}
    rank0, rank1 = read_results(both / strategy, 2)
    for run, step in expected.items():
        assert rank0[run][0] == rank1[run][0] == step, run
        assert rank0[run][1] == rank1[run][1], run  # GradScaler skipped the same steps


@pytest.mark.parametrize(
    "from_above",
    [1.0, 65536.0, float("inf"), float("nan"), 0.0, -3.0],
    ids=["one", "scale", "inf", "nan", "zero", "negative"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_weights_gradient_is_exactly_the_ballot(from_above, dtype):
    vote = StopVote(torch.device("cpu"))
    vote.cast(1, True)
    loss = torch.tensor(0.25, dtype=dtype, requires_grad=True)
    carried = vote.carried_by(loss)
    assert carried.dtype == dtype and carried.item() == loss.item()
    vote.cast_nonfinite(torch.tensor([True]))  # cast after the forward, read by its backward
    carried.backward(torch.tensor(from_above, dtype=dtype))
    assert vote.weight.grad.tolist() == [0.0, 1.0, 1.0]
    # the loss's own gradient passes through untouched
    torch.testing.assert_close(
        loss.grad, torch.tensor(from_above, dtype=dtype), equal_nan=True, rtol=0, atol=0
    )


if __name__ == "__main__":
    run_scenario(globals())
