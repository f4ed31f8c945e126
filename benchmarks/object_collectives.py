"""The cost of disttrain's object collectives per call: ``gather_object`` of a small metrics
dict like the one every training epoch gathers (``MetricStore.take_epoch`` and a stop vote),
``broadcast_object`` of a hook's result, and torch's own ``all_gather_object`` on the same
gloo group for reference. The three run interleaved, one block of calls each per round, so
a machine that drifts between rounds shifts them alike; the figure is the median over every
call after warm-up (each call timed on its own; the ranks call in lockstep).

    python benchmarks/object_collectives.py                  # 2 ranks, 20 rounds of 200 calls
    python benchmarks/object_collectives.py --rounds 5 --calls 100

It starts itself under ``torchrun --standalone`` at 2 ranks; global rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

# what a training epoch gathers: every logged metric's (reduce, total, weight), a stop vote
EPOCH = (
    {
        "train_loss": ("mean", 12.34567, 64.0),
        "train_acc": ("mean", 0.875, 64.0),
        "grad_norm": ("max", 3.25, 1.0),
        "tokens": ("sum", 4096.0, 1.0),
    },
    False,
)
WARMUP = 20


def _bench(rounds: int, calls: int) -> None:
    from disttrain.dist.collectives import connect
    from disttrain.dist.env import DistEnv

    env = DistEnv.from_environ()
    collectives = connect(env, torch.device("cpu"), timeout=60, long_timeout=60)
    group = collectives._long_control  # where disttrain's gather_object runs

    def torch_gather(obj: object) -> list:
        out = [None] * env.world_size
        dist.all_gather_object(out, obj, group=group)
        return out

    paths = {
        "disttrain gather_object": lambda: collectives.gather_object(EPOCH),
        "disttrain broadcast_object": lambda: collectives.broadcast_object(EPOCH),
        "torch all_gather_object": lambda: torch_gather(EPOCH),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, call in paths.items():
            assert call() in ([EPOCH] * env.world_size, EPOCH)
            for i in range(WARMUP + calls):
                started = time.perf_counter()
                call()
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - started)
    if env.rank == 0:
        print(f"torch {torch.__version__}, world size {env.world_size}, gloo, {rounds} rounds")
        for name, values in times.items():
            median = statistics.median(values) * 1e6
            print(f"{name:28s} median {median:7.1f} us per call ({len(values)} calls)")
    collectives.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:
        _bench(args.rounds, args.calls)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", __file__, f"--rounds={args.rounds}", f"--calls={args.calls}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path or root}
    sys.exit(subprocess.call(command, env=env))


if __name__ == "__main__":
    main()
