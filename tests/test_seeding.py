"""A Python script run twice trains bitwise the same weights, and a user's own seeding stands.

Each scenario below is a script as users write them, run as its own debug-mode process (no
torchrun): the operating system seeds torch afresh in every process, so only real seeding
makes two runs agree.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain


class Noisy(disttrain.Module):
    """Draws from torch and Python's random at construction, dropout and shuffling in fit."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
        )
        self.scale = random.random()  # a draw of Python's generator while building
        self.first_draw: float | None = None

    def on_train_start(self):
        self.first_draw = torch.rand(1).item()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x * self.scale), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.arange(64.0).reshape(16, 4) / 64
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)


OPTIONS = dict(max_epochs=2, logger=None, enable_checkpointing=False, enable_progress_bar=False)


def _report(outdir: str, module: Noisy, trainer: disttrain.Trainer) -> None:
    torch.save(
        {
            "weights": module.state_dict(),
            "first_draw": module.first_draw,
            "seed": trainer.seed,
        },
        Path(outdir) / "report.pt",
    )


def trainer_first(outdir: str) -> None:
    trainer = disttrain.Trainer(default_root_dir=outdir, **OPTIONS)
    module = Noisy()
    trainer.fit(module)
    _report(outdir, module, trainer)


def seeded_by_user(outdir: str) -> None:
    disttrain.seed_everything(int(sys.argv[3]))
    module = Noisy()
    trainer = disttrain.Trainer(default_root_dir=outdir, **OPTIONS)
    trainer.fit(module)
    _report(outdir, module, trainer)


def torch_seeded_then_explicit_trainer_seed(outdir: str) -> None:
    torch.manual_seed(42)  # seeded by hand, as nanoGPT does
    random.seed(42)
    module = Noisy()
    trainer = disttrain.Trainer(default_root_dir=outdir, seed=7, **OPTIONS)
    trainer.fit(module)
    _report(outdir, module, trainer)


def model_first(outdir: str) -> None:
    module = Noisy()
    trainer = disttrain.Trainer(default_root_dir=outdir, **OPTIONS)
    trainer.fit(module)
    _report(outdir, module, trainer)


def _run(tmp_path: Path, name: str, *args: str) -> tuple[dict, str]:
    outdir = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
    outdir.mkdir()
    proc = subprocess.run(
        [sys.executable, __file__, name, str(outdir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(outdir / "report.pt", weights_only=True), proc.stderr


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def test_a_script_that_builds_the_trainer_first_trains_the_same_weights_twice(tmp_path):
    first, log = _run(tmp_path, "trainer_first")
    second, _ = _run(tmp_path, "trainer_first")
    assert _same_weights(first, second)
    assert first["seed"] == 0
    assert "built before any seed" not in log


def test_the_users_seed_everything_stands_and_is_the_runs_seed(tmp_path):
    first, log = _run(tmp_path, "seeded_by_user", "42")
    again, _ = _run(tmp_path, "seeded_by_user", "42")
    other, _ = _run(tmp_path, "seeded_by_user", "43")
    assert _same_weights(first, again) and first["first_draw"] == again["first_draw"]
    assert first["seed"] == 42 and other["seed"] == 43
    # the trainer did not reseed with its default 0: what comes after differs by seed
    assert first["first_draw"] != other["first_draw"]
    assert "built before any seed" not in log


def test_an_explicit_trainer_seed_is_applied_after_a_users_torch_seed(tmp_path):
    first, _ = _run(tmp_path, "torch_seeded_then_explicit_trainer_seed")
    second, _ = _run(tmp_path, "torch_seeded_then_explicit_trainer_seed")
    assert first["seed"] == 7
    assert _same_weights(first, second)


def test_a_model_built_before_any_seed_is_named_in_a_warning(tmp_path):
    _, log = _run(tmp_path, "model_first")
    assert "Noisy was built before any seed was set" in log
    assert "disttrain.seed_everything(0)" in log


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from common import run_scenario

    run_scenario(globals())
