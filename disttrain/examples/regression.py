"""The smallest end-to-end job: a linear regression on generated data (for smoke tests)."""

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
        return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y, reduction="sum")
        return torch.stack([loss, torch.tensor(float(len(y)))])

    test_step = validation_step

    def validation_epoch_end(self, outputs):
        local = torch.stack(outputs).sum(0) if outputs else torch.zeros(2)
        total, count = self.trainer.all_reduce(local).tolist()
        self.val_losses.append(total / count)
        return {"val_loss": total / count}

    test_epoch_end = validation_epoch_end

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    test_dataloader = val_dataloader
