"""The smallest end-to-end job: a linear regression on generated data (for smoke tests).

It logs what every example logs: ``train_loss`` and ``lr`` per step, ``val_loss`` per
validation loop and ``test_loss`` for ``Trainer.test`` (exact over the ranks);
``Trainer.predict`` predicts the validation samples.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain


class Regression(disttrain.Module):
    def __init__(
        self, n_samples: int = 256, n_features: int = 8, batch_size: int = 16, lr: float = 0.05
    ) -> None:
        super().__init__()
        self.n_samples, self.n_features, self.batch_size, self.lr = (
            n_samples,
            n_features,
            batch_size,
            lr,
        )
        self.net = torch.nn.Linear(n_features, 1)
        self.val_losses: list[float] = []

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n_samples, self.n_features, generator=g)
        y = x @ torch.linspace(-1, 1, self.n_features) + 0.05 * torch.randn(
            self.n_samples, generator=g
        )
        split = self.n_samples * 3 // 4
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y, reduction="sum")
        return torch.stack([loss, torch.tensor(float(len(y)), device=loss.device)])

    test_step = validation_step

    def validation_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "val")

    def test_epoch_end(self, outputs):
        return self._evaluation_end(outputs, "test")

    def _evaluation_end(self, outputs: list[torch.Tensor], stage: str) -> dict[str, float]:
        # a rank without batches still joins the all_reduce, with zeros on the module's device
        local = torch.stack(outputs).sum(0) if outputs else torch.zeros(2, device=self.device)
        total, count = self.trainer.all_reduce(local).tolist()
        loss = total / count  # exact: every sample counted once
        if stage == "val" and not self.trainer.sanity_checking:
            self.val_losses.append(loss)
        # every rank holds the same reduced value: "max" passes it on unchanged
        self.log(f"{stage}_loss", loss, reduce="max", prog_bar=True)
        return {f"{stage}_loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self.net(x).squeeze(-1)

    predict_dataloader = val_dataloader
