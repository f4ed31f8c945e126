"""disttrain against a hand-written loop: time per step, collectives per step, cold start, RSS.

Workloads: ``tiny`` (MLP 32-64-10, batch 32: the framework's per-step work dominates) and
``compute`` (MLP 512-2048-2048-10, batch 256: the arithmetic dominates). Both loops run in
the same processes, interleaved (hand, disttrain, hand, ...), over the same DataLoader setup
(a DistributedSampler), the same model and optimizer; disttrain runs with its defaults
(checkpoint callback, CSV logger, progress output, preemption handling, flight recorder).
Step times are stamped when ``optimizer.step()`` returns (the same hook in both loops).
The figures: the median step time over all rounds after warm-up, with min and max, their
ratio, and the "paired" ratio (the median over rounds of each round's disttrain median over
the hand-written median of the same round: robust to the machine drifting between rounds).
Rows: one process (no DDP), then DDP over gloo under torchrun at world size 1 (DDP's and
disttrain's distributed costs without two ranks competing for the cores) and 2.

Collectives per steady-state step are counted by wrapping every ``torch.distributed``
collective; DDP's gradient all-reduce runs in its C++ reducer in both loops and is the one
not counted (disttrain's stop votes ride inside it). Cold start is process start to the end of
the first step, imports included; peak RSS is the process's maximum resident set.

    python benchmarks/overhead.py                 # everything, ~2 minutes on 2 cores
    python benchmarks/overhead.py --workloads tiny --rounds 5 --steps 400
    python benchmarks/overhead.py --accelerator cuda   # on GPUs: NCCL, cuda:LOCAL_RANK
    python benchmarks/overhead.py --monitors      # and disttrain with its monitors on

With ``--monitors`` each round also runs disttrain with the learning-rate and throughput
monitors on (``LearningRateMonitor()``, ``ThroughputMonitor()``: their defaults, logging every
``log_every_n_steps``), interleaved with the run without them (their order alternates from
round to round); ``monitors paired`` is the median over rounds of each round's median step
time with the monitors over the one without, and the collectives are counted with them on.

With ``--accelerator cuda`` both loops run on ``cuda:LOCAL_RANK`` (NCCL under torchrun), the
batches come from pinned memory without blocking, and each step's stamp waits for the GPU
(``torch.cuda.synchronize``, in both loops alike), so the times are of the GPU's work.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

WARMUP = 20
WORKLOADS = {  # name: (layer sizes, batch size)
    "tiny": ((32, 64, 10), 32),
    "compute": ((512, 2048, 2048, 10), 256),
}
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_object",
    "barrier",
    "broadcast_object_list",
    "gather_object",
    "reduce_scatter",
    "all_to_all",
    "gather",
    "scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "send",
    "recv",
)


def monitors_on() -> bool:
    """Whether ``--monitors`` asked for the monitor variant (inherited by torchrun workers)."""
    return os.environ.get("BENCH_MONITORS") == "1"


def monitor_callbacks() -> list:
    from disttrain.callbacks import LearningRateMonitor, ThroughputMonitor

    return [LearningRateMonitor(), ThroughputMonitor()]


def accelerator() -> str:
    """``cpu`` or ``cuda``: set once by ``--accelerator``, inherited by the torchrun workers."""
    return os.environ.get("BENCH_ACCELERATOR", "cpu")


def device() -> torch.device:
    if accelerator() != "cuda":
        return torch.device("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    return dev


def make_data(workload: str, steps: int, world_size: int) -> TensorDataset:
    sizes, batch = WORKLOADS[workload]
    g = torch.Generator().manual_seed(0)
    n = batch * world_size * (steps + WARMUP)
    x = torch.randn(n, sizes[0], generator=g)
    return TensorDataset(x, torch.randint(0, sizes[-1], (n,), generator=g))


def make_net(workload: str) -> torch.nn.Module:
    sizes, _ = WORKLOADS[workload]
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def hand_written(workload: str, data: TensorDataset, rank: int, world: int) -> list[float]:
    dev = device()
    net = make_net(workload).to(dev)
    ids = [dev.index] if dev.type == "cuda" else None
    model = DistributedDataParallel(net, device_ids=ids) if dist.is_initialized() else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stamps = stamped(opt)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True)
    loader = DataLoader(
        data, batch_size=WORKLOADS[workload][1], sampler=sampler, pin_memory=dev.type == "cuda"
    )
    sampler.set_epoch(0)
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return stamps


def stamped(optimizer: torch.optim.Optimizer) -> list[float]:
    """The times at which ``optimizer.step()`` returns: the same clock at the same point of
    both loops, without adding a callback (and its dispatch) to disttrain's."""
    stamps: list[float] = []
    if accelerator() == "cuda":  # the GPU's time, the same wait in both loops

        def stamp(*_: object) -> None:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        optimizer.register_step_post_hook(stamp)
    else:
        optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    return stamps


def with_disttrain(workload: str, data: TensorDataset, run_dir: str, **options) -> list[float]:
    import disttrain

    class MLP(disttrain.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(workload)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            self.stamps = stamped(optimizer)
            return optimizer

        def train_dataloader(self):
            return DataLoader(data, batch_size=WORKLOADS[workload][1], shuffle=True)

    trainer = disttrain.Trainer(
        max_epochs=1,
        num_sanity_val_steps=0,
        default_root_dir=run_dir,
        accelerator=accelerator(),
        **options,
    )
    module = MLP()
    trainer.fit(module)
    return module.stamps


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :])]


class CollectiveCounter:
    """Counts every torch.distributed collective called from Python between ``mark`` calls.

    DDP's gradient all-reduce (which also carries disttrain's stop votes) runs in DDP's C++
    reducer and is not a Python call: in both loops it is the one collective not counted.
    """

    def __init__(self) -> None:
        self.current: collections.Counter = collections.Counter()
        self.windows: list[dict] = []
        for name in COLLECTIVES:
            setattr(dist, name, self._counting(name, getattr(dist, name)))

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.current[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def mark(self) -> None:
        self.windows.append(dict(self.current))
        self.current.clear()


def measure(workload: str, rounds: int, steps: int) -> dict:
    """Interleaved rounds in this process (a torchrun worker when WORLD_SIZE > 1)."""
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp = "RANK" in os.environ  # under torchrun both loops use DDP, at world size 1 too
    if ddp:
        dist.init_process_group("nccl" if device().type == "cuda" else "gloo")
    data = make_data(workload, steps, world)
    variants = ["disttrain", "monitors"] if monitors_on() else ["disttrain"]
    times: dict[str, list[float]] = {"hand": [], **{v: [] for v in variants}}
    paired: list[float] = []  # per round: disttrain's median over the hand-written loop's
    paired_monitors: list[float] = []  # per round: with the monitors over without them
    run_dir = tempfile.mkdtemp(prefix="disttrain-bench-")
    for r in range(rounds):  # each fit in a directory of its own: a fresh fit never mixes
        hand = step_times(hand_written(workload, data, rank, world))
        times["hand"] += hand
        medians = {"hand": statistics.median(hand)}
        for variant in variants if r % 2 == 0 else variants[::-1]:
            options = {"callbacks": monitor_callbacks()} if variant == "monitors" else {}
            where = os.path.join(run_dir, f"round{r}-{variant}")
            ours = step_times(with_disttrain(workload, data, where, **options))
            times[variant] += ours
            medians[variant] = statistics.median(ours)
        paired.append(medians["disttrain"] / medians["hand"])
        if monitors_on():
            paired_monitors.append(medians["monitors"] / medians["disttrain"])
    count_dir = os.path.join(run_dir, "count")
    collectives = count_collectives(workload, data, rank, world, count_dir) if ddp else {}
    if dist.is_initialized():
        dist.destroy_process_group()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "workload": workload,
        "world_size": world,
        "ddp": ddp,
        "hand_ms": med["hand"],
        "disttrain_ms": med["disttrain"],
        "ratio": med["disttrain"] / med["hand"],
        "paired_ratio": statistics.median(paired),
        "hand_min_max": [min(times["hand"]) * 1e3, max(times["hand"]) * 1e3],
        "disttrain_min_max": [min(times["disttrain"]) * 1e3, max(times["disttrain"]) * 1e3],
        "collectives": collectives,
        **(
            {
                "monitors_ms": med["monitors"],
                "monitors_paired": statistics.median(paired_monitors),
                "monitors_paired_rounds": paired_monitors,
            }
            if monitors_on()
            else {}
        ),
    }


def count_collectives(workload, data, rank, world, run_dir) -> dict:
    """Python-level collectives per steady-state step: hand-written DDP vs disttrain (with
    ``--monitors``: with them on, logging every 2 steps so that log points are counted)."""
    import disttrain

    counter = CollectiveCounter()

    class Mark(disttrain.Callback):
        def on_batch_start(self, trainer, module, batch):
            counter.mark()

    small = torch.utils.data.Subset(data, range(WORKLOADS[workload][1] * world * 12))
    trainer = disttrain.Trainer(
        max_epochs=1,
        num_sanity_val_steps=0,
        callbacks=[Mark(), *(monitor_callbacks() if monitors_on() else [])],
        log_every_n_steps=2 if monitors_on() else 50,
        default_root_dir=run_dir,
        accelerator=accelerator(),
    )

    class MLP(disttrain.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(workload)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(small, batch_size=WORKLOADS[workload][1], shuffle=True)

    trainer.fit(MLP())
    steady = counter.windows[2:]  # windows between consecutive steps, after two warm-up steps
    return {
        "disttrain_extra_per_step": max(sum(w.values()) for w in steady),
        "hand_written_extra_per_step": 0,
    }


def cold_start(kind: str, workload: str) -> tuple[float, float]:
    """(seconds from process start to the first finished step, peak RSS MB) of a fresh
    process running one short loop of ``kind`` ("hand" or "disttrain")."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = (
        f"import sys, time; sys.path.insert(0, {here!r}); import overhead as o\n"
        f"data = o.make_data({workload!r}, 4, 1)\n"
        "import tempfile\n"
        f"stamps = o.hand_written({workload!r}, data, 0, 1) if {kind!r} == 'hand' else "
        f"o.with_disttrain({workload!r}, data, tempfile.mkdtemp(), enable_progress_bar=False)\n"
        "import resource\n"
        "print(stamps[0] - time.perf_counter() + time.time(), "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    first_step, rss = map(float, out.split()[-2:])
    return first_step - start, rss


def ddp_rows(nproc: int, rounds: int, steps: int) -> list[dict]:
    """The tiny workload under torchrun with ``nproc`` ranks (gloo)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        os.path.abspath(__file__),
        f"--rounds={rounds}",
        f"--steps={steps}",
        "--workloads=tiny",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workloads", default="tiny,compute")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default=None)
    parser.add_argument(
        "--monitors", action="store_true", help="also with the LR and throughput monitors"
    )
    args = parser.parse_args()
    if args.accelerator:
        os.environ["BENCH_ACCELERATOR"] = args.accelerator
    if args.monitors:
        os.environ["BENCH_MONITORS"] = "1"
    if "RANK" in os.environ:  # a torchrun worker
        for workload in args.workloads.split(","):
            result = measure(workload, args.rounds, args.steps)
            if int(os.environ["RANK"]) == 0:
                print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for workload in args.workloads.split(","):
        steps = args.steps if workload == "tiny" else max(30, args.steps // 10)
        rows.append(measure(workload, args.rounds, steps))
    gpus = torch.cuda.device_count() if accelerator() == "cuda" else 2
    for nproc in (1, 2)[: max(1, min(2, gpus))]:  # world size 1: DDP's cost alone
        rows += ddp_rows(nproc, args.rounds, args.steps)
    print(
        f"{'workload':<10}{'ranks':>6}{'DDP':>5}{'hand ms':>10}{'disttrain ms':>14}{'ratio':>8}"
        f"{'paired':>8}{'  disttrain min-max ms':>24}{'  extra collectives/step':>26}"
    )
    for r in rows:
        extra = r["collectives"].get("disttrain_extra_per_step", "-")
        lo, hi = r["disttrain_min_max"]
        print(
            f"{r['workload']:<10}{r['world_size']:>6}{'yes' if r['ddp'] else 'no':>5}"
            f"{r['hand_ms']:>10.3f}{r['disttrain_ms']:>14.3f}{r['ratio']:>8.3f}"
            f"{r['paired_ratio']:>8.3f}{f'{lo:.3f}-{hi:.3f}':>24}{extra!s:>26}"
        )
    if monitors_on():
        head = f"{'workload':<10}{'ranks':>6}{'DDP':>5}{'monitors off ms':>17}{'on ms':>9}"
        print(f"\n{head}{'on/off paired':>15}")
        for r in rows:
            print(
                f"{r['workload']:<10}{r['world_size']:>6}{'yes' if r['ddp'] else 'no':>5}"
                f"{r['disttrain_ms']:>17.3f}"
                f"{r['monitors_ms']:>9.3f}{r['monitors_paired']:>15.3f}  rounds: "
                + " ".join(f"{x:.3f}" for x in r["monitors_paired_rounds"])
            )
    starts = {kind: [cold_start(kind, "tiny") for _ in range(3)] for kind in ("hand", "disttrain")}
    for kind, runs in starts.items():
        print(
            f"cold start {kind:<10} median {statistics.median(s for s, _ in runs):.2f} s to the "
            f"first step; peak RSS {statistics.median(m for _, m in runs):.0f} MB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "cold_start": starts}, f, indent=1)


if __name__ == "__main__":
    main()
