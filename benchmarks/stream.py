"""The streaming example against the map-style one: steps/s, data-wait share, val_loss.

``configs/stream.yaml`` (``CharStreamLM``: token shard files through ``ShardedStream``, a
shuffle buffer and 2 loader workers per rank) and ``configs/default.yaml`` (``CharLM``:
map-style windows through a ``DistributedSampler``, no workers) train the same model with the
same batch size. Both are loaded from their YAML files as ``disttrain fit`` loads them, and fit
one after the other in the same 2 ranks (``torchrun``, gloo), in a run directory each,
interleaved (map, stream, stream, map, ...): this shared machine drifts by tens of percent
within a minute, so the figures compare fits seconds apart. Round ``r`` seeds both with ``r``.

Every fit runs with ``profiler: simple`` and ``StepClock``, a callback that stamps each step:

- **steps/s**: rank 0's steps over the time from each epoch's start to its last step (loader
  worker start-up, the shuffle buffer's first fill and every wait for data included), and the
  steady rate over the steps after the first ``WARMUP`` of each epoch;
- **data wait**: the profiler's ``data loading`` time over the same epoch time, the largest
  share over the ranks;
- **collectives per steady step**: every ``torch.distributed`` call from Python between one
  step's ``on_batch_start`` and the next's in the same epoch, after two steps (DDP's gradient
  all-reduce runs in C++ and is not counted; disttrain's stop and data-ended votes ride in it);
- **val_loss** after the last epoch (with ``--epochs``: a fit cut by ``max_steps`` in the
  middle of an epoch does not validate).

The figures: the median over rounds of each rate, the paired ratio (the median over rounds of
stream / map of the same round), the data-wait shares, and val_loss per seed (the spread over
seeds is the noise the two configs' difference is judged against).

    python benchmarks/stream.py                        # speed: 12 rounds of 40-step fits,
                                                       # about 5 minutes on 2 cores
    python benchmarks/stream.py --rounds 3 --epochs 4  # val_loss after the configs' 4 epochs
    python benchmarks/stream.py --set model.init_args.num_workers=0   # the stream, overridden
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from overhead import CollectiveCounter  # benchmarks/: this script's folder

import disttrain
from disttrain.config import runfile as runconfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"map": ROOT / "configs" / "default.yaml", "stream": ROOT / "configs" / "stream.yaml"}
WARMUP = 10  # steps of each epoch left out of the steady rate
# torch.distributed calls from Python, by name (overhead.py's counter: it wraps every
# collective, so it is made once, in the worker)
CALLS: collections.Counter = collections.Counter()


class StepClock(disttrain.Callback):
    """Per epoch: its start and every step's end (time, the profiler's data-loading total),
    and the collectives of each whole step."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    @staticmethod
    def _stamp(trainer: Any) -> dict[str, float]:
        waited = trainer.profiler.totals.get("data loading", 0.0) if trainer.profiler else 0.0
        return {"time": time.perf_counter(), "waited": waited}

    def on_epoch_start(self, trainer, module) -> None:
        self.epochs.append({"start": self._stamp(trainer), "steps": [], "collectives": []})
        CALLS.clear()

    def on_batch_start(self, trainer, module, batch) -> None:
        epoch = self.epochs[-1]
        if epoch["steps"]:  # the calls since the previous step's start: one whole step
            epoch["collectives"].append(sum(CALLS.values()))
        CALLS.clear()

    def on_batch_end(self, trainer, module) -> None:
        self.epochs[-1]["steps"].append(self._stamp(trainer))


def rates(epochs: list[dict[str, Any]]) -> dict[str, float]:
    """One rank's steps/s (whole epochs and steady), data-wait share, collectives per step."""
    steps = in_epochs = waited = steady_steps = steady_time = steady_waited = 0.0
    most_collectives = 0
    for epoch in epochs:
        stamps = epoch["steps"]
        if not stamps:
            continue
        steps += len(stamps)
        in_epochs += stamps[-1]["time"] - epoch["start"]["time"]
        waited += stamps[-1]["waited"] - epoch["start"]["waited"]
        if len(stamps) > WARMUP + 1:
            steady_steps += len(stamps) - 1 - WARMUP
            steady_time += stamps[-1]["time"] - stamps[WARMUP]["time"]
            steady_waited += stamps[-1]["waited"] - stamps[WARMUP]["waited"]
        most_collectives = max([most_collectives, *epoch["collectives"][2:]])
    return {
        "steps": steps,
        "steps_per_s": steps / in_epochs,
        "steady_steps_per_s": steady_steps / steady_time if steady_time else float("nan"),
        "data_wait": waited / in_epochs,
        "steady_data_wait": steady_waited / steady_time if steady_time else float("nan"),
        "collectives_per_step": most_collectives,
    }


def fit(kind: str, seed: int, length: list[str], run_dir: str, extra: list[str]) -> dict[str, Any]:
    """One fit of ``kind``'s config on every rank, as ``disttrain fit`` runs it; the figures
    of every rank and val_loss."""
    overrides = [f"run_dir={run_dir}", f"seed={seed}", "trainer.profiler=simple", *length, *extra]
    overrides += ["trainer.enable_progress_bar=false", "model.init_args.sample_chars=0"]
    run = runconfig.load(CONFIGS[kind], overrides)
    disttrain.seed_everything(seed)  # before the model is built, as the command does
    clock = StepClock()
    options = dataclasses.replace(run.trainer, callbacks=[clock])
    trainer = disttrain.Trainer(options, resolved_config=run.resolved)
    trainer.fit(run.model.build())
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, rates(clock.epochs))
    val_loss = trainer.callback_metrics.get("val_loss", float("nan"))
    return {"ranks": per_rank, "val_loss": float(val_loss)}


def worker(args: argparse.Namespace) -> None:
    """A torchrun worker: every round's fits, interleaved; rank 0 prints the results."""
    logging.getLogger("disttrain").setLevel(logging.WARNING)
    dist.init_process_group("gloo")  # kept open over the fits: disttrain uses it
    global CALLS
    CALLS = CollectiveCounter().current
    length = (
        [f"trainer.max_epochs={args.epochs}"]
        if args.epochs
        else [f"trainer.max_steps={args.steps}", "trainer.limit_val_batches=0"]
    )
    length += ["trainer.num_sanity_val_steps=0"] if not args.epochs else []
    tmp = tempfile.mkdtemp(prefix="disttrain-stream-bench-") if dist.get_rank() == 0 else None
    box = [tmp]
    dist.broadcast_object_list(box)
    for r in range(args.rounds):
        order = ("map", "stream") if r % 2 == 0 else ("stream", "map")
        for kind in order:
            extra = args.set if kind == "stream" else []
            result = fit(kind, r, length, os.path.join(box[0], f"round{r}-{kind}"), extra)
            if dist.get_rank() == 0:
                print("RESULT " + json.dumps({"round": r, "kind": kind, **result}), flush=True)
    dist.barrier()
    if tmp is not None:
        shutil.rmtree(tmp)
    dist.destroy_process_group()


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's rates; the largest data-wait share and collective count over the ranks."""
    ranks = result["ranks"]
    if len({r["steps"] for r in ranks}) != 1:
        raise RuntimeError(f"ranks trained different numbers of steps: {ranks}")
    return {
        **ranks[0],
        "data_wait": max(r["data_wait"] for r in ranks),
        "steady_data_wait": max(r["steady_data_wait"] for r in ranks),
        "collectives_per_step": max(r["collectives_per_step"] for r in ranks),
        "val_loss": result["val_loss"],
    }


def describe(result: dict[str, Any]) -> str:
    return (
        f"{result['steps']:.0f} steps  {result['steps_per_s']:.2f} steps/s "
        f"(steady {result['steady_steps_per_s']:.2f})  data wait {100 * result['data_wait']:.2f}%"
        f" (steady {100 * result['steady_data_wait']:.2f}%)  collectives/step "
        f"{result['collectives_per_step']}  val_loss {result['val_loss']:.4f}"
    )


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    for key in ("steps_per_s", "steady_steps_per_s"):
        paired = [s[key] / m[key] for m, s in zip(results["map"], results["stream"])]
        rounds = ", ".join(f"{p:.3f}" for p in paired)
        print(
            f"{key:<20} map {median('map', key):.2f}  stream {median('stream', key):.2f}  "
            f"ratio of medians {median('stream', key) / median('map', key):.3f}  "
            f"paired {statistics.median(paired):.3f} (rounds: {rounds})"
        )
    for kind in ("map", "stream"):
        waits = [100 * r["data_wait"] for r in results[kind]]
        steady = statistics.median(100 * r["steady_data_wait"] for r in results[kind])
        collectives = max(r["collectives_per_step"] for r in results[kind])
        print(
            f"{kind:<6} data wait median {statistics.median(waits):.2f}% (max {max(waits):.2f}%,"
            f" steady median {steady:.2f}%)  collectives/steady step {collectives}"
            + val_losses(results[kind])
        )


def val_losses(results: list[dict[str, Any]]) -> str:
    """val_loss per seed, their mean and spread (fits of whole epochs only)."""
    losses = [r["val_loss"] for r in results]
    if not all(math.isfinite(v) for v in losses):
        return ""
    spread = f" sd {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
    per_seed = ", ".join(f"{v:.4f}" for v in losses)
    return f"  val_loss per seed {per_seed}  mean {statistics.mean(losses):.4f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40, help="steps per fit (no validation)")
    parser.add_argument("--epochs", type=int, default=0, help="whole epochs per fit instead")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for configs/stream.yaml, e.g. model.init_args.num_workers=1",
    )
    args = parser.parse_args()
    if "RANK" in os.environ:
        return worker(args)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        __file__, *sys.argv[1:],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for 2 ranks
    results: dict[str, list[dict[str, Any]]] = {"map": [], "stream": []}
    with (
        tempfile.TemporaryFile("w+") as log,  # the workers' own output, shown if they fail
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                raw = json.loads(line[7:])
                result = summary(raw)
                results[raw["kind"]].append(result)
                print(f"round {raw['round']} {raw['kind']:<6} {describe(result)}", flush=True)
        if proc.wait() != 0:
            log.seek(0)
            print(log.read()[-6000:], file=sys.stderr)
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
