"""Each rank draws its own random numbers, reproducibly, from a model built alike on every rank.

nanoGPT's ``get_batch`` draws its windows with ``torch.randint``; a dataset that does the same
in ``__getitem__`` (or a step that draws) must get different draws on each rank, or every
rank trains on the same batches. The draws come from ``(seed, rank)`` (loader workers: from
``(seed, epoch, sample index)``), so a rerun and a resumed run draw the same again."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from common import read_results, run_scenario, write_result
from conftest import run_beside
from torch.utils.data import DataLoader, Dataset

import disttrain
from disttrain.checkpoint import format as checkpoint
from disttrain.checkpoint.resume import most_advanced


class RandomWindows(Dataset):
    """nanoGPT's get_batch as a map-style dataset: each item is a window at a random offset."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        offset = torch.randint(1000, (1,))
        return offset.float().expand(4) / 1000, offset


class Drawing(disttrain.Module):
    def __init__(self, num_workers: int = 0):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.num_workers = num_workers
        self.draws: list[list[int]] = []  # [epoch, batch_idx, step's own draw, *offsets]

    def training_step(self, batch, batch_idx):
        x, offsets = batch
        step_draw = int(torch.randint(1000, (1,)))
        self.draws.append([self.current_epoch, batch_idx, step_draw, *offsets.flatten().tolist()])
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(RandomWindows(), batch_size=2, num_workers=self.num_workers)


def _fit(run_dir: Path, num_workers: int = 0, **options) -> tuple[Drawing, list]:
    trainer = disttrain.Trainer(
        default_root_dir=str(run_dir),
        seed=int(os.environ["SEED"]),
        max_epochs=2,
        logger=None,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **options,
    )
    module = Drawing(num_workers)  # built after the trainer: seeded alike on every rank
    initial = [p.detach().clone().flatten().tolist() for p in module.parameters()]
    trainer.fit(module)
    return module, initial


def draws(outdir: str) -> None:
    """The draws of an unbroken run, of a run with loader workers, and of the steps after a
    resume from mid-epoch 1 (step 3) and from the end of epoch 0 (step 2)."""
    root = Path(outdir)
    full, initial = _fit(root / "full")
    result = {"full": full.draws, "initial": initial}
    if os.environ.get("WORKERS") == "1":
        result["workers"] = _fit(root / "workers", num_workers=2)[0].draws
    if os.environ.get("RESUME") == "1":
        for name, stop_after in {"mid_epoch": 3, "epoch_boundary": 2}.items():
            _fit(root / name, max_steps=stop_after)
            progress = checkpoint.load(most_advanced(root / name / "checkpoints"))["progress"]
            resumed = _fit(root / name, resume="auto")[0]
            result[name] = {"draws": resumed.draws, "step": progress["global_step"]}
    write_result(outdir, int(os.environ["RANK"]), result)


def test_each_rank_draws_its_own_numbers_reproducibly_from_a_model_built_alike(tmp_path):
    run_beside(__file__, "draws", tmp_path / "a", SEED=0, RESUME=1, WORKERS=1)
    run_beside(__file__, "draws", tmp_path / "b", SEED=0, WORKERS=1)
    run_beside(__file__, "draws", tmp_path / "c", SEED=1)
    (a0, a1), (b0, b1), (c0, _) = (read_results(tmp_path / x, 2) for x in "abc")
    assert a0["initial"] == a1["initial"]  # the model starts alike on every rank
    assert len(a0["full"]) == 4  # 2 epochs of 2 batches on each rank
    for kind in ("full", "workers"):
        # the dataset's offsets and the step's draws differ between ranks
        for mine, theirs in zip(a0[kind], a1[kind]):
            assert mine[2] != theirs[2] and mine[3:] != theirs[3:], (kind, mine, theirs)
        # the same seed draws the same on each rank; another seed, other draws
        assert (a0[kind], a1[kind]) == (b0[kind], b1[kind]), kind
    assert a0["full"] != c0["full"]
    for report in (a0, a1):  # a sample's draws are its own: the same with 0 and 2 workers
        assert [d[3:] for d in report["full"]] == [d[3:] for d in report["workers"]]
    for report in (a0, a1):
        for name in ("mid_epoch", "epoch_boundary"):  # a resumed run draws what the
            resumed = report[name]  # unbroken one drew after its checkpoint
            assert resumed["draws"] == report["full"][resumed["step"] :], name


def test_a_dataset_that_draws_nothing_is_read_plainly_after_its_first_batch():
    """Seeding each sample costs ~20 us: only datasets that draw pay it, in the main process."""
    import random as python_random

    from torch.utils.data import TensorDataset

    from disttrain.data.sample_seeds import SeededSamples

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return python_random.random()

    plain, drawing = SeededSamples(TensorDataset(torch.arange(8.0)), 0), SeededSamples(Draws(), 0)
    state = torch.get_rng_state()
    assert drawing.__getitems__([1, 2]) == drawing.__getitems__([1, 2])  # seeded by index
    plain.__getitems__([1, 2])
    # the decision is the unit here (its effect is only time): read it
    assert (plain._draws, drawing._draws) == (False, True)
    assert torch.equal(torch.get_rng_state(), state)  # the rank's own draws untouched


if __name__ == "__main__":
    run_scenario(globals())
