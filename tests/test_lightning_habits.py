"""A training script written the way a Lightning 2.x user writes it runs on 2 ranks: loaders
handed to ``fit`` (positionally and by keyword), ``ckpt_path``, ``estimated_stepping_batches``
sizing a OneCycleLR, ``self.log(..., sync_dist=True)``, ``ModelCheckpoint(filename=...)`` and
its ``best_model_path``, ``EarlyStopping(verbose=True)``, ``gradient_clip_algorithm="value"``
and ``seed_everything(42, workers=True)``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, run_scenario
from conftest import run_beside
from torch.utils.data import DataLoader

import disttrain
from disttrain import EarlyStopping, ModelCheckpoint, Trainer

CLIP = 0.01


class LitStyle(Regressor):
    def __init__(self):
        super().__init__(lr=0.05)
        self.largest_grad = 0.0

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        self.estimated = self.trainer.estimated_stepping_batches
        # steps past total_steps raise: the estimate must be exact
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.1, total_steps=self.estimated
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def on_before_zero_grad(self, optimizer):
        grads = [p.grad.abs().max().item() for p in self.parameters() if p.grad is not None]
        self.largest_grad = max([self.largest_grad, *grads])


def lightning_script(outdir: str) -> None:
    disttrain.seed_everything(42, workers=True)
    model = LitStyle()
    train = DataLoader(IndexedData(16), batch_size=2)  # 4 batches per rank at 2 ranks
    checkpoint = ModelCheckpoint(filename="{epoch}-{val_loss:.2f}", monitor="val_loss")
    trainer = Trainer(
        max_epochs=2,
        gradient_clip_val=CLIP,
        gradient_clip_algorithm="value",
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", verbose=True)],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=f"{outdir}/run",
    )
    trainer.fit(model, train, val_dataloaders=DataLoader(IndexedData(6), batch_size=2))
    report = {
        "estimated": model.estimated,
        "steps": trainer.global_step,
        "largest_grad": model.largest_grad,
        "best": checkpoint.best_model_path,
        "best_score": checkpoint.best_model_score,
        "files": sorted(os.listdir(f"{outdir}/run/checkpoints")),
    }
    again = Trainer(max_epochs=2, logger=False, default_root_dir=f"{outdir}/again")
    again.fit(LitStyle(), train_dataloaders=train, ckpt_path=checkpoint.best_model_path)
    report["resumed_steps"] = again.global_step
    if again.global_rank == 0:
        Path(outdir, "report.json").write_text(json.dumps(report))


def test_a_lightning_style_script_runs_on_two_ranks(tmp_path):
    proc = run_beside(__file__, "lightning_script", tmp_path, timeout=180)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["estimated"] == 8 and report["steps"] == 8  # 2 epochs of 4 steps
    assert 0 < report["largest_grad"] <= CLIP  # clipped by value, each element
    best = Path(report["best"])
    assert best.is_file() and re.fullmatch(r"epoch=\d-val_loss=\d+\.\d\d\.ckpt", best.name)
    assert f"val_loss={report['best_score']:.2f}" in best.name
    assert "EarlyStopping: val_loss improved to" in proc.stdout
    # resumed from the best checkpoint given as ckpt_path (epoch 0's or 1's), on to the end
    assert f"resumed from {best}" in proc.stdout
    assert report["resumed_steps"] == 8


def test_lightning_options_that_would_do_something_else_are_refused(tmp_path):
    with pytest.raises(ValueError, match="workers=False"):
        disttrain.seed_everything(1, workers=False)
    with pytest.raises(disttrain.ConfigError, match="gradient_clip_algorithm"):
        Trainer(gradient_clip_algorithm="norm2")
    with pytest.raises(ValueError, match="filename"):
        ModelCheckpoint(filename="{epoch:q}")
    loader = DataLoader(IndexedData(4), batch_size=2)
    with pytest.raises(TypeError, match="not both"):
        Trainer(default_root_dir=str(tmp_path)).fit(
            Regressor(), disttrain.DataModule(), train_dataloaders=loader
        )


@pytest.mark.parametrize("mode, enabled, warn_only", [(True, True, False), ("warn", True, True)])
def test_deterministic_turns_on_torchs_deterministic_algorithms(mode, enabled, warn_only):
    code = (
        "import torch, disttrain, os; "
        f"disttrain.Trainer(deterministic={mode!r}, logger=None); "
        "print(torch.are_deterministic_algorithms_enabled(), "
        "torch.is_deterministic_algorithms_warn_only_enabled(), "
        "torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.stdout.split() == [str(enabled), str(warn_only), "False", ":4096:8"], out.stderr
    with pytest.raises(disttrain.ConfigError, match="deterministic"):
        Trainer(deterministic="maybe")


if __name__ == "__main__":
    run_scenario(globals())
