"""What each rank holds under DDP, FSDP, HSDP (2 x 2) and FSDP + tensor parallelism (dp 2 x
tp 2), for a model whose parameters dominate: 8 x Linear(1024, 1024) (8.4 M parameters, 33.6
MB in fp32), one optimizer step of Adam, 4 ranks on CPU with gloo:

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        benchmarks/mesh_memory.py

Rank 0 prints one row per layout: the bytes of parameters and of optimizer state (Adam's two
moments and its step) each rank holds after the step, counted as the local shards of the
DTensors (``to_local()``), min and max over the ranks. Gradients are freed by ``zero_grad``.
"""

from __future__ import annotations

import tempfile

import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain

WIDTH, DEPTH = 1024, 8


class Stack(disttrain.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
        self.held: list[dict[str, int]] = []  # every rank's, gathered

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

    def configure_model(self, mesh):
        if mesh is None or mesh["tp"].size() == 1:
            return
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        plan = {
            f"layers.{i}": ColwiseParallel() if i % 2 == 0 else RowwiseParallel()
            for i in range(DEPTH)
        }
        parallelize_module(self, mesh["tp"], plan)

    def fsdp_blocks(self):
        return list(self.layers)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        x = torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x), batch_size=4)

    def on_train_end(self) -> None:
        optimizer = self.trainer.optimizers[0]
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        mine = {
            "params": sum(_local_bytes(p) for p in self.parameters()),
            "optimizer": sum(_local_bytes(t) for t in state),
        }
        self.held = self.trainer.collectives.gather_object(mine)  # every rank runs the hook


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


LAYOUTS = {
    "DDP": {"strategy": "ddp"},
    "FSDP (4)": {"strategy": "fsdp"},
    "HSDP (2 x 2)": {"strategy": "hsdp", "mesh": {"dp_replicate": 2, "dp_shard": 2}},
    "FSDP + TP (dp 2 x tp 2)": {"strategy": "fsdp", "mesh": {"tp": 2}},
}


def _cell(per_rank: list[dict[str, int]], key: str) -> str:
    low, high = (f(r[key] for r in per_rank) / 1e6 for f in (min, max))
    return f"{low:.1f}" if high - low < 0.05 else f"{low:.1f} to {high:.1f}"


if __name__ == "__main__":
    rows = []
    for name, options in LAYOUTS.items():
        disttrain.seed_everything(0)
        module = Stack()
        trainer = disttrain.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            default_root_dir=tempfile.mkdtemp(),
            **options,
        )
        trainer.fit(module)
        rows.append(
            f"| {name} | {_cell(module.held, 'params')} | {_cell(module.held, 'optimizer')} |"
        )
    if trainer.global_rank == 0:
        print("| layout | parameters per rank (MB) | optimizer state per rank (MB) |")
        print("|---|---|---|")
        print("\n".join(rows), flush=True)
