"""Models, data and recorders that several test files share, in process and on torchrun ranks.

What only one test uses lives beside that test (its scenario functions, the modules its
launches name)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy
import torch
from torch.utils.data import DataLoader, Dataset

import disttrain
import disttrain.examples.regression
from disttrain import Callback, Hook

NOTIFY_HOOKS = [h.value for h, rule in disttrain.HOOK_TABLE.items() if rule.callbacks]


class IndexedData(Dataset):
    """Sample i is (features, target, i): deterministic, so any rank can name what it saw."""

    def __init__(self, n: int, dim: int = 4) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.linspace(-1.0, 1.0, dim) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Regressor(disttrain.Module):
    """A small linear regression module with configurable data and optimiser."""

    def __init__(self, n_train=16, n_val=7, batch_size=2, shuffle=False, lr=0.1, dim=4):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.n_train, self.n_val, self.batch_size, self.shuffle, self.lr = (
            n_train,
            n_val,
            batch_size,
            shuffle,
            lr,
        )
        self.seen: list[int] = []
        self.val_seen: list[int] = []

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.extend(idx.tolist())
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        self.val_seen.extend(idx.tolist())
        return torch.nn.functional.mse_loss(self(x), y, reduction="sum")

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(
            IndexedData(self.n_train), batch_size=self.batch_size, shuffle=self.shuffle
        )

    def val_dataloader(self):
        return DataLoader(IndexedData(self.n_val), batch_size=self.batch_size)

    test_dataloader = val_dataloader


class TwoHeads(Regressor):
    """Two optimizers, each over its own head: exercises optimizer_idx and unused parameters."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.other = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx, optimizer_idx):
        x, y, _ = batch
        head = self.net if optimizer_idx == 0 else self.other
        return torch.nn.functional.mse_loss(head(x).squeeze(-1), y)

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net.parameters(), lr=0.1),
            torch.optim.SGD(self.other.parameters(), lr=0.05, momentum=0.9),
        ]


class StatefulPrepare(Regressor):
    """Assigns ``self.vocab`` in prepare_data, which runs on some ranks only: refused."""

    def prepare_data(self):
        self.vocab = {"a": 1}


class Wide(Regressor):
    """Parameters dominate: two wide layers, so sharding them halves each rank's share."""

    def __init__(self):
        super().__init__(n_train=32, batch_size=4, shuffle=True)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1)
        )
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


class WideExport(Wide):
    """Wide, exporting its whole weights at the end of fit (a collective under FSDP)."""

    def __init__(self, export):
        super().__init__()
        self.export = export

    def on_fit_end(self):
        self.trainer.export_weights(self.export)


def _recording(name):
    def hook(self, *args):
        self.calls.append(_describe(name, args))
        if name == "transfer_batch_to_device":
            return disttrain.ModelHooks.transfer_batch_to_device(self, *args)
        if name == "backward":
            return disttrain.ModelHooks.backward(self, *args)
        return None

    hook.__name__ = name
    return hook


def _describe(name, args):
    if name in ("setup", "teardown"):
        return f"{name}({args[0]})"
    if name == "backward":
        return f"backward({args[3]})"
    return name


class Recorder(Regressor):
    """Records every hook and step method it runs, in order, into ``self.calls``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[str] = []

    def training_step(self, batch, batch_idx, *opt):
        self.calls.append("training_step")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.calls.append("validation_step")
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.calls.append("test_step")
        return super().validation_step(batch, batch_idx)

    def validation_epoch_end(self, outputs):
        self.calls.append("validation_epoch_end")

    def test_epoch_end(self, outputs):
        self.calls.append("test_epoch_end")

    def training_epoch_end(self, outputs):
        self.calls.append("training_epoch_end")

    def predict_step(self, batch, batch_idx):
        self.calls.append("predict_step")
        return batch[2]

    def predict_dataloader(self):
        return self.val_dataloader()


for _hook in Hook:
    setattr(Recorder, _hook.value, _recording(_hook.value))


class RecordingCallback(Callback):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls


def _cb_recording(name):
    def hook(self, trainer, module, *args):
        assert module is trainer.module
        self.calls.append("cb:" + _describe(name, args))

    hook.__name__ = name
    return hook


for _name in NOTIFY_HOOKS:
    setattr(RecordingCallback, _name, _cb_recording(_name))


def write_result(outdir: str | os.PathLike, rank: int, payload: dict) -> None:
    path = Path(outdir) / f"rank{rank}.json"
    path.write_text(json.dumps(payload))


def read_results(outdir: str | os.PathLike, world_size: int) -> list[dict]:
    return [json.loads((Path(outdir) / f"rank{r}.json").read_text()) for r in range(world_size)]


class FailsOnRankOne(disttrain.examples.regression.Regression):
    def on_fit_start(self) -> None:
        if self.global_rank == 1:
            raise RuntimeError("on_fit_start exploded on rank 1")


class Resumable(Regressor):
    """Uses every piece of state a resume must restore: dropout (RNG), shuffling (sampler),
    momentum (optimizer state) and a step-wise LR schedule (scheduler state)."""

    def __init__(self, **kw):
        kw.setdefault("n_train", 24)
        kw.setdefault("shuffle", True)
        super().__init__(**kw)
        self.net.insert(1, torch.nn.Dropout(0.3))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return [opt], [{"scheduler": sched, "interval": "step"}]


class Augmented(IndexedData):
    """Each sample gets noise drawn in ``__getitem__`` from torch, Python and NumPy."""

    def __getitem__(self, i):
        x, y, idx = super().__getitem__(i)
        noise = torch.randn(x.shape) + random.random() + float(numpy.random.rand())
        return x + 0.1 * noise, y, idx


def read_augmented(shard: tuple[int, int]):
    """Shard ``(first, n)``: samples ``first .. first + n - 1``, with noise drawn from the
    worker's global generators (seeded per sample by ShardedStream in loader workers)."""
    data = Augmented(48)
    return (data[i] for i in range(shard[0], shard[0] + shard[1]))


def sharded_stream() -> disttrain.ShardedStream:
    """48 augmented samples in 12 shards of 4, a shuffle buffer of 3."""
    shards = [(4 * s, 4) for s in range(12)]
    return disttrain.ShardedStream(shards, read_augmented, shuffle_buffer=3)


class FaultyJob(Resumable):
    """A job for the fault tests, driven by init args: where to write what it did, when to
    kill or SIGTERM itself (once, on one rank), when to raise."""

    def __init__(
        self,
        report_dir: str,
        signal_at: int = -1,
        signal_rank: int = 1,
        signal_name: str = "",
        raise_at: int = -1,
        n_train: int = 24,
    ) -> None:
        super().__init__(n_train=n_train)
        self.report_dir, self.signal_at, self.signal_rank = report_dir, signal_at, signal_rank
        self.signal_name, self.raise_at = signal_name, raise_at

    def on_train_start(self) -> None:
        env = self.trainer.env
        marker = Path(self.report_dir, f"start-rank{env.rank}-attempt{env.restart_count}")
        marker.write_text(repr(time.time()))

    def on_batch_end(self) -> None:
        rank, step = self.global_rank, self.global_step
        if step == self.raise_at and rank == 1:
            raise ValueError(f"broken batch at step {step}")
        once = Path(self.report_dir, "signalled")
        if step == self.signal_at and rank == self.signal_rank and not once.exists():
            once.write_text(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def on_fit_end(self) -> None:
        if self.global_rank == 0:
            torch.save(
                {k: v.clone() for k, v in self.state_dict().items()},
                Path(self.report_dir, "final.pt"),
            )


class ChaoticJob(FaultyJob):
    """FaultyJob killed five times in one run: in restart attempt k, rank ``ranks[k]`` SIGKILLs
    itself after step ``steps[k]`` (a seeded draw: increasing steps, so each attempt, resumed
    from its predecessor's last checkpoint, reaches its own)."""

    def __init__(self, report_dir: str, chaos_seed: int = 0, kills: int = 5, **kw) -> None:
        super().__init__(report_dir, **kw)
        draw = random.Random(chaos_seed)
        self.kill_steps = sorted(draw.sample(range(2, 17), kills))  # of 18 steps at 2 ranks
        self.kill_ranks = [draw.randrange(2) for _ in range(kills)]

    def on_batch_end(self) -> None:
        attempt = self.trainer.env.restart_count
        if attempt >= len(self.kill_steps):
            return
        if (self.global_step, self.global_rank) == (
            self.kill_steps[attempt],
            self.kill_ranks[attempt],
        ):
            Path(self.report_dir, f"killed-{attempt}").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class LogsMetrics(Regressor):
    """Logs validation metrics of every reduction kind; training logs per step and per epoch."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_loss_epoch_mean", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        err = (self(x) - y) ** 2
        self.log("val_mse", err.mean())
        self.log("val_max", err.max(), reduce="max")
        self.log("val_min", err.min(), reduce="min")
        self.log("val_n", float(len(y)), reduce="sum")

    def validation_epoch_end(self, outputs):
        return None


def exact_validation(model: torch.nn.Module, n_val: int) -> dict[str, float]:
    data = IndexedData(n_val)
    with torch.no_grad():
        err = (model(data.x) - data.y) ** 2
    return {
        "val_mse": err.mean().item(),
        "val_max": err.max().item(),
        "val_min": err.min().item(),
        "val_n": float(n_val),
    }


def run_scenarios(outdir: str | os.PathLike, *scenarios) -> None:
    """Several scenarios in one launch, one after the other: each ``f`` runs as ``f(OUTDIR/NAME)``
    in that directory (its own working directory too, so default run directories never meet),
    where its test reads what it wrote."""
    here = os.getcwd()
    for scenario in scenarios:
        own = Path(outdir) / scenario.__name__
        own.mkdir(parents=True, exist_ok=True)
        os.chdir(own)
        try:
            scenario(str(own))
        finally:
            os.chdir(here)


def run_scenario(namespace: dict) -> None:
    """A test file run by torchrun as ``FILE NAME OUTDIR``: call its function ``NAME(OUTDIR)``
    on this rank (see ``conftest.run_beside``)."""
    import sys

    name, outdir = sys.argv[1], sys.argv[2]
    namespace[name](outdir)
