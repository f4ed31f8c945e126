"""A ``torchmetrics.Metric`` passed to ``self.log`` is computed over every rank, exactly: on 2
ranks with 7 validation samples (4 and 3 per rank, so a mean of the ranks' means is wrong), a
mean absolute error and a Spearman correlation (a metric whose state is every sample, not a
sum) equal the values computed over the whole set in one process; the sanity check's batches
do not count; a step value is the batch's own.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, run_scenario
from conftest import run_beside

from disttrain import Trainer

torchmetrics = pytest.importorskip("torchmetrics")

N_VAL = 7


def fixed_predictions(x: torch.Tensor) -> torch.Tensor:
    """Predictions that do not depend on training: the exact values are known up front."""
    return x.sum(1) * 0.3


class WithMetrics(Regressor):
    def __init__(self):
        super().__init__(n_train=8, n_val=N_VAL, batch_size=2)
        self.val_mae = torchmetrics.MeanAbsoluteError()
        self.val_spearman = torchmetrics.SpearmanCorrCoef()
        self.train_mae = torchmetrics.MeanAbsoluteError()
        self.step_values: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.step_values.append(self.train_mae(fixed_predictions(x), y).item())
        self.log("train_mae", self.train_mae, on_step=True, on_epoch=True)
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.val_mae.update(fixed_predictions(x), y)
        self.val_spearman.update(fixed_predictions(x), y)
        self.log("val_mae", self.val_mae)
        self.log("val_spearman", self.val_spearman)


def metrics_on_two_ranks(outdir: str) -> None:
    trainer = Trainer(
        max_epochs=2,
        num_sanity_val_steps=1,  # its batch updates the metrics; it must not count
        logger="csv",
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=outdir,
    )
    module = WithMetrics()
    trainer.fit(module)
    if trainer.global_rank == 0:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        report = {"metrics": metrics, "step_values": module.step_values}
        Path(outdir, "report.json").write_text(json.dumps(report))


def test_a_torchmetrics_metric_is_exact_across_ranks(tmp_path):
    run_beside(__file__, "metrics_on_two_ranks", tmp_path, timeout=180)
    report = json.loads((tmp_path / "report.json").read_text())
    metrics = report["metrics"]
    data = IndexedData(N_VAL)
    preds, target = fixed_predictions(data.x), data.y
    exact_mae = torchmetrics.functional.mean_absolute_error(preds, target).item()
    exact_spearman = torchmetrics.functional.spearman_corrcoef(preds, target).item()
    assert metrics["val_mae"] == pytest.approx(exact_mae, rel=1e-6)
    assert metrics["val_spearman"] == pytest.approx(exact_spearman, rel=1e-6)
    # each epoch's validation, the first too (after the sanity check's batches)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    validations = [float(row["val_mae"]) for row in rows if row.get("val_mae")]
    assert validations == pytest.approx([exact_mae, exact_mae], rel=1e-6)
    # the training epoch's value: every sample of the epoch, over both ranks
    train = IndexedData(8)
    exact_train = torchmetrics.functional.mean_absolute_error(
        fixed_predictions(train.x), train.y
    ).item()
    assert metrics["train_mae_epoch"] == pytest.approx(exact_train, rel=1e-6)
    # a step value is the batch's own: rank 0's last batch
    assert metrics["train_mae_step"] == pytest.approx(report["step_values"][-1], rel=1e-6)


def test_logging_a_metric_on_step_before_calling_it_says_what_to_do(tmp_path):
    class LogsUncalled(Regressor):
        def __init__(self):
            super().__init__(n_train=4)
            self.mae = torchmetrics.MeanAbsoluteError()

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            self.mae.update(self(x), y)
            self.log("mae", self.mae, on_step=True)
            return torch.nn.functional.mse_loss(self(x), y)

    trainer = Trainer(max_epochs=1, logger=None, default_root_dir=str(tmp_path))
    with pytest.raises(Exception, match="call metric\\(preds, target\\) before logging it"):
        trainer.fit(LogsUncalled())


if __name__ == "__main__":
    run_scenario(globals())
