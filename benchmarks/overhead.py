"""Per-step overhead of disttrain against a hand-written loop, on a tiny MLP (32-64-10, batch 32).

The model is so small that the framework's own per-step work dominates. Both loops run in the
same processes, interleaved (hand, disttrain, hand, ...), over the same DataLoader setup
(DistributedSampler), with the same optimizer. Each round times every step; the figure is
the median step time over all rounds after warm-up.

    python benchmarks/overhead.py            # single process, then 2-rank DDP via torchrun
    python benchmarks/overhead.py --rounds 5 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import disttrain

WARMUP = 20


def make_data(steps: int, world_size: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    n = 32 * world_size * (steps + WARMUP)
    return TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def make_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def hand_written(data: TensorDataset, rank: int, world_size: int) -> list[float]:
    net = make_net()
    model = DistributedDataParallel(net) if dist.is_initialized() else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    stamps = []
    sampler.set_epoch(0)
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        stamps.append(time.perf_counter())
    return stamps


class TinyMLP(disttrain.Module):
    def __init__(self, data: TensorDataset) -> None:
        super().__init__()
        self.net = make_net()
        self.data = data

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=32, shuffle=True)


class Stamps(disttrain.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_batch_end(self, trainer, module) -> None:
        self.stamps.append(time.perf_counter())


def with_disttrain(data: TensorDataset) -> list[float]:
    stamps = Stamps()
    trainer = disttrain.Trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[stamps])
    trainer.fit(TinyMLP(data))
    return stamps.stamps


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :])]


def measure(rounds: int, steps: int) -> dict:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        dist.init_process_group("gloo")
    data = make_data(steps, world_size)
    times: dict[str, list[float]] = {"hand": [], "disttrain": []}
    for _ in range(rounds):
        times["hand"] += step_times(hand_written(data, rank, world_size))
        times["disttrain"] += step_times(with_disttrain(data))
    if dist.is_initialized():
        dist.destroy_process_group()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "world_size": world_size,
        "hand_ms": round(med["hand"], 4),
        "disttrain_ms": round(med["disttrain"], 4),
        "ratio": round(med["disttrain"] / med["hand"], 3),
        "disttrain_min_max_ms": [
            round(min(times["disttrain"]) * 1e3, 4),
            round(max(times["disttrain"]) * 1e3, 4),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--worker", action="store_true", help="internal: measure in this process")
    args = parser.parse_args()
    if args.worker or "RANK" in os.environ:
        result = measure(args.rounds, args.steps)
        if int(os.environ.get("RANK", 0)) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    rows = [measure(args.rounds, args.steps)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        __file__,
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    ).stdout
    rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    print(f"{'setting':<22}{'hand ms/step':>14}{'disttrain ms/step':>19}{'ratio':>8}")
    for row in rows:
        name = "single process" if row["world_size"] == 1 else f"DDP {row['world_size']} ranks"
        print(f"{name:<22}{row['hand_ms']:>14.3f}{row['disttrain_ms']:>19.3f}{row['ratio']:>8.3f}")


if __name__ == "__main__":
    main()
