"""Peak memory per rank, DDP against FSDP2, for a model whose parameters dominate memory.

A 16.8 M-parameter MLP trained with Adam (parameters, gradients and two moments: about 270 MB
in fp32 under DDP, on every rank), one epoch of 8 steps, 2 ranks on CPU with gloo:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/fsdp_memory.py ddp
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/fsdp_memory.py fsdp

Each rank prints its peak resident set and the parameter elements it holds.
"""

from __future__ import annotations

import resource
import sys
import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain


class Big(disttrain.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(2048, 4096)
        self.b = torch.nn.Linear(4096, 2048)
        self.c = torch.nn.Linear(2048, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 2048, generator=g), torch.randint(0, 8, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def on_fit_end(self) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        local = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.parameters()
        )
        print(
            f"{self.trainer.config.strategy} rank {self.global_rank}: peak RSS {rss:.0f} MB, "
            f"parameters held {local / 1e6:.2f} M",
            flush=True,
        )


if __name__ == "__main__":
    strategy = sys.argv[1] if len(sys.argv) > 1 else "fsdp"
    disttrain.Trainer(
        max_epochs=1,
        strategy=strategy,
        enable_checkpointing=False,
        enable_progress_bar=False,
        logger=None,
        default_root_dir=tempfile.mkdtemp(),
    ).fit(Big())
