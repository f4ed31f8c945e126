"""How long training stops for each checkpoint: synchronous against ``async_checkpointing``.

The model, data and trainer options of a YAML config (default ``configs/default.yaml``: the
character-level transformer, AdamW) trained for a few steps at a time, with a checkpoint
every ``--every`` steps. The stall of one checkpoint is the time the training loop spends in
``ModelCheckpoint.save`` on global rank 0: gathering the state, and then either writing it
(synchronous) or copying it to host memory and handing it to the writer thread (async),
plus, in the async case, waiting for the previous write if it is still running. Rounds
alternate the two modes in the same processes; the figures are the median stall over all
checkpoints of each mode, and the paired ratio (the median over rounds of each round's
synchronous median over its async median: robust to the machine drifting between rounds).

    python benchmarks/checkpoint_stall.py                      # one process
    torchrun --nproc-per-node=2 benchmarks/checkpoint_stall.py # the config's 2 ranks (DDP)
    python benchmarks/checkpoint_stall.py --rounds 6 --checkpoints 8 --every 5
    python benchmarks/checkpoint_stall.py model.init_args.n_embd=512 model.init_args.n_layer=8

Run directories go under ``$STALL_DIR`` (default ``runs/checkpoint-stall``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

from disttrain import ModelCheckpoint, Trainer
from disttrain.config import runfile
from disttrain.rng import seed_for_run

ROOT = Path(__file__).resolve().parent.parent


class TimedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that records how long each save held the training loop."""

    def __init__(self, stalls: list[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.stalls = stalls

    def save(self, trainer):
        start = time.perf_counter()
        path = super().save(trainer)
        self.stalls.append(time.perf_counter() - start)
        return path


def one_fit(config: str, asynchronous: bool, args: argparse.Namespace, root: str) -> list[float]:
    """The stalls of ``args.checkpoints`` checkpoints in one fit (the last, taken as fit ends
    and waited for there, left out)."""
    if os.environ.get("RANK", "0") == "0":  # a fresh run each time (the others wait in fit)
        shutil.rmtree(root, ignore_errors=True)
    run = runfile.load(config, [*args.overrides, f"run_dir={root}"])
    options = runfile.build_callbacks(run)
    stalls: list[float] = []
    checkpoints = TimedCheckpoint(
        stalls, every_n_train_steps=args.every, every_n_epochs=None, keep_last_k=1
    )
    seed_for_run(run.seed)
    module = run.model.build()
    config = dataclasses.replace(
        options,
        callbacks=[checkpoints],
        max_steps=args.every * args.checkpoints,
        max_epochs=None,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        logger=None,
        enable_progress_bar=False,
        default_root_dir=root,
        async_checkpointing=asynchronous,
        resume=None,
    )
    trainer = Trainer(config)
    trainer.fit(module, datamodule=run.data.build() if run.data else None)
    return stalls[:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=6, help="per fit")
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the config")
    args = parser.parse_args()
    logging.getLogger("disttrain").setLevel(logging.WARNING)
    rank = int(os.environ.get("RANK", "0"))
    medians: dict[bool, list[float]] = {False: [], True: []}
    every: dict[bool, list[float]] = {False: [], True: []}
    shared = os.environ.get("STALL_DIR", "runs/checkpoint-stall")  # one for every rank
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for asynchronous in order:
            root = str(Path(shared) / f"r{r}-{'async' if asynchronous else 'sync'}")
            stalls = one_fit(args.config, asynchronous, args, root)
            medians[asynchronous].append(statistics.median(stalls))
            every[asynchronous].extend(stalls)
    if rank != 0:
        return
    size = sum(f.stat().st_size for f in Path(root).glob("checkpoints/*.ckpt") if f.is_file())
    world = os.environ.get("WORLD_SIZE", "1")
    print(f"{args.config}: world size {world}, a checkpoint of {size / 1e6:.1f} MB")
    for asynchronous in (False, True):
        name = "async" if asynchronous else "sync"
        xs = every[asynchronous]
        print(
            f"{name:5s} stall per checkpoint: median {1e3 * statistics.median(xs):.1f} ms "
            f"(min {1e3 * min(xs):.1f}, max {1e3 * max(xs):.1f}; {len(xs)} checkpoints)"
        )
    paired = statistics.median(s / a for s, a in zip(medians[False], medians[True]))
    print(f"sync / async, paired over {args.rounds} rounds: {paired:.1f}x")


if __name__ == "__main__":
    main()
