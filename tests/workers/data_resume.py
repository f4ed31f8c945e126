"""Data resume scenarios (issue 13, points 3 and 5): ``data_resume.py NAME OUTDIR``.

Every run draws random augmentation inside its loader workers (``torch.randn``, ``random``
and NumPy in ``__getitem__`` or in a stream's ``__iter__``) and uses dropout; each scenario
trains unbroken, then stopped mid-epoch and resumed, and writes its rank's weights.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from common import Augmented, IndexedData, Resumable, sharded_stream, write_result
from torch.utils.data import DataLoader, IterableDataset

import disttrain
from disttrain import Trainer
from disttrain.data.streams import reader_position


class NoisyStream(IterableDataset):
    """Reads its reader's share of 48 samples (``reader_position``), adding noise from its
    own generator, seeded from the loader worker's seed (new with every loader iterator:
    replaying the epoch would draw other noise) and saved by ``state_dict``."""

    shards_by_rank = True

    def __init__(self, n: int = 48) -> None:
        self.data, self.epoch, self.loaded, self.now = IndexedData(n), 0, None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return dict(self.now)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state

    def __iter__(self):
        reader, readers = reader_position()
        mine = range(reader, len(self.data), readers)
        g = torch.Generator().manual_seed(torch.initial_seed())
        start, self.loaded = (0, None) if self.loaded is None else (self.loaded, None)
        if start:
            start, rng = start["next"], start["rng"]
            g.set_state(rng)
        for k in range(start, len(mine)):
            x, y, idx = self.data[mine[k]]
            x = x + 0.1 * torch.randn(x.shape, generator=g)
            self.now = {"next": k + 1, "rng": g.get_state()}
            yield x, y, idx


class ForgetfulStream(NoisyStream):
    """The same stream drawing from the worker's global generator, without state methods."""

    state_dict = load_state_dict = None  # type: ignore[assignment]

    def __iter__(self):
        reader, readers = reader_position()
        for i in range(reader, len(self.data), readers):
            x, y, idx = self.data[i]
            yield x + 0.1 * torch.randn(x.shape), y, idx


class Job(Resumable):
    """Dropout, momentum, a step-wise schedule, and one of the data kinds above."""

    def __init__(self, kind: str, workers: int) -> None:
        super().__init__(n_train=48)
        self.kind, self.workers = kind, workers
        self.samples: dict[tuple[int, int], list[float]] = {}
        self.trained: list[tuple[int, int]] = []  # (epoch, index) in training order

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        for row, i in zip(x.tolist(), idx.tolist()):
            self.samples[(self.current_epoch, i)] = row
            self.trained.append((self.current_epoch, i))
        return torch.nn.functional.mse_loss(self(x), y)

    def train_dataloader(self):
        if self.kind == "map":
            data = Augmented(self.n_train)
            return DataLoader(data, batch_size=2, shuffle=True, num_workers=self.workers)
        if self.kind == "persistent":  # workers that live on: later epochs must not turn
            return DataLoader(
                sharded_stream(), batch_size=2, num_workers=2, persistent_workers=True
            )
        kinds = {"stream": NoisyStream, "forgetful": ForgetfulStream, "sharded": sharded_stream}
        stream = kinds[self.kind]()
        return DataLoader(stream, batch_size=2, num_workers=self.workers)


def train(run_dir: Path, kind: str, workers: int = 2, **options) -> tuple[dict, Job]:
    disttrain.seed_everything(0)
    module = Job(kind, workers)
    trainer = Trainer(
        default_root_dir=str(run_dir), num_sanity_val_steps=0, seed=5, timeout=30, **options
    )
    trainer.fit(module)
    return {k: v.clone() for k, v in module.state_dict().items()}, module


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resume(outdir: str) -> None:
    """For each data kind: unbroken 3 epochs against stopped at a mid-epoch step (after an
    odd number of batches: the next batch is the second worker's) and resumed."""
    root, rank = Path(outdir), int(os.environ["RANK"])
    per_epoch = 48 // (2 * int(os.environ["WORLD_SIZE"]))
    result = {}
    for kind in sys.argv[3].split(","):
        full, unbroken = train(root / kind / "full", kind, max_epochs=3)
        train(root / kind / "part", kind, max_epochs=3, max_steps=per_epoch + 3)
        resumed, _ = train(root / kind / "part", kind, max_epochs=3, resume="auto")
        result[kind] = {"bitwise": same(full, resumed)}
        if kind == "map":  # the samples do not depend on the number of loader workers
            _, one_worker = train(root / kind / "one", kind, workers=1, max_epochs=1)
            epoch0 = {k: v for k, v in unbroken.samples.items() if k[0] == 0}
            result[kind]["same_with_one_worker"] = epoch0 == one_worker.samples
            result[kind]["samples"] = {f"{e}/{i}": row for (e, i), row in epoch0.items()}
    write_result(outdir, rank, result)


class KilledThrice(Job):
    """For ``disttrain launch``: 2 loader workers and augmentation, ``kind`` of data; at each
    ``step:rank`` of ``kills`` that rank SIGKILLs itself, once (a marker file remembers)."""

    def __init__(self, report_dir: str, kind: str, kills: str) -> None:
        super().__init__(kind, workers=2)
        self.report_dir = Path(report_dir)
        self.kills = {int(s): int(r) for s, r in (k.split(":") for k in kills.split(","))}

    def on_train_start(self) -> None:
        env = self.trainer.env
        (self.report_dir / f"start-rank{env.rank}-attempt{env.restart_count}").touch()

    def on_batch_end(self) -> None:
        step = self.global_step
        marker = self.report_dir / f"killed-at-{step}"
        if self.kills.get(step) == self.global_rank and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_fit_end(self) -> None:  # every rank: whole tensors also under FSDP
        weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for k, v in self.state_dict().items()
        }
        if self.global_rank == 0:
            torch.save(weights, self.report_dir / "final.pt")


def reshard(outdir: str) -> None:
    """Map-style data, 2 loader workers: ``first`` trains 2 epochs but stops 3 batches into
    epoch 1; ``rest`` goes on from that checkpoint at this run's world size. Each rank
    writes the samples of epoch 1 it trained and the augmented samples it saw."""
    stage, run_dir = sys.argv[3], Path(sys.argv[4])
    options: dict = {"max_steps": 48 // 4 + 3} if stage == "first" else {"resume": "auto"}
    _, module = train(run_dir, "map", max_epochs=2, **options)
    epoch1 = [i for (e, i) in module.trained if e == 1]
    rows = {f"{e}/{i}": row for (e, i), row in module.samples.items()}
    write_result(outdir, int(os.environ["RANK"]), {"epoch1": epoch1, "samples": rows})


if __name__ == "__main__":
    globals()[sys.argv[1]](sys.argv[2])
