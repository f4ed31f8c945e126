"""A classifier of handwritten digits: scikit-learn's bundled 8x8 digits set (1797 images).

The data ships inside scikit-learn (``pip install disttrain[examples]``), so no download is
needed. The split is fixed (seeded), features are scaled to [0, 1], and the reported
validation accuracy is exact across ranks: every validation image is counted once. It logs
``train_loss`` and ``lr`` per step and ``val_loss``/``val_acc`` per validation loop;
``Trainer.test`` evaluates the same held-out 20% and labels it ``test_loss``/``test_acc``.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain

log = logging.getLogger("disttrain.examples.digits")


class DigitsData(disttrain.DataModule):
    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, split_seed: int = 0):
        self.batch_size, self.val_fraction, self.split_seed = batch_size, val_fraction, split_seed

    def setup(self, stage: str) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "the digits example needs scikit-learn: pip install 'disttrain[examples]'"
            ) from err
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(len(x) * self.val_fraction)
        self.val_set = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train_set = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader


class DigitsClassifier(disttrain.Module):
    def __init__(self, hidden: int = 128, lr: float = 1e-2, dropout: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, 10),
        )
        self.val_accuracy: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(-1) == y).sum()
        count = torch.tensor(float(len(y)), device=loss.device)
        return torch.stack([loss, correct.float(), count])

    test_step = validation_step

    def validation_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "val")

    def test_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "test")

    def _evaluation_end(self, outputs: list[torch.Tensor], stage: str) -> dict[str, float]:
        # a rank without batches still joins the all_reduce, with zeros on the module's device
        local = torch.stack(outputs).sum(0) if outputs else torch.zeros(3, device=self.device)
        loss, correct, count = self.trainer.all_reduce(local.double()).tolist()
        metrics = {f"{stage}_loss": loss / count, f"{stage}_acc": correct / count}
        if self.trainer.sanity_checking:
            return metrics
        if stage == "val":
            self.val_accuracy.append(metrics["val_acc"])
        log.info(
            "%s%s_loss %.4f  %s_acc %.4f (%d images)",
            f"epoch {self.current_epoch}  " if stage == "val" else "",
            stage,
            metrics[f"{stage}_loss"],
            stage,
            metrics[f"{stage}_acc"],
            count,
        )
        # every rank holds the same reduced values: "max" passes them on unchanged
        self.log_dict(metrics, reduce="max", prog_bar=True)
        return metrics

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)]
