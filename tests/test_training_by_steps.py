"""Training by steps: ``max_steps`` alone trains exactly that many optimizer steps over any
loader (map-style, an endless stream); validation every N batches inside an epoch
(``val_check_interval``) and checkpoints every N steps (``ModelCheckpoint(every_n_train_steps=N)``);
a run stopped after a mid-epoch validation and checkpoint resumes to the very weights of the
uninterrupted run.

Each scenario is one 2-rank torchrun launch doing several small fits, each in its own run
directory; rank 0 writes what it saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, Resumable, run_scenario, run_scenarios
from conftest import shared_launch
from torch.utils.data import DataLoader, IterableDataset

from disttrain import ConfigError, ModelCheckpoint, Trainer

QUIET = dict(logger=None, enable_progress_bar=False, num_sanity_val_steps=0, timeout=30, seed=5)


class Endless(IterableDataset):
    """nanoGPT's data: random windows forever; each rank draws its own (seeded by rank)."""

    shards_by_rank = True

    def __iter__(self):
        data = IndexedData(64)
        g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
        while True:
            i = int(torch.randint(64, (1,), generator=g))
            yield data[i]


class OnStream(Regressor):
    def train_dataloader(self):
        return DataLoader(Endless(), batch_size=2)


class CountsValidations(Resumable):
    """Resumable (dropout, shuffling, momentum, a step-wise schedule) that writes down the
    global step of each validation pass."""

    def __init__(self, **kw):
        super().__init__(n_train=48, **kw)  # 12 batches of 2 per rank at 2 ranks
        self.validated_at: list[int] = []

    def validation_epoch_end(self, outputs):
        self.validated_at.append(self.trainer.global_step)


def _write(outdir: str, trainer: Trainer, name: str, payload: dict) -> None:
    if trainer.global_rank == 0:
        (Path(outdir) / f"{name}.json").write_text(json.dumps(payload))


def _weights(module: torch.nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in module.parameters()]


# -- the scenarios, on each torchrun rank -------------------------------------------------
def max_steps_alone(outdir: str) -> None:
    # one batch per rank per epoch: 1005 steps need 1005 epochs (no default epoch limit)
    trainer = Trainer(max_steps=1005, default_root_dir=f"{outdir}/map", **QUIET)
    trainer.fit(Regressor(n_train=4, batch_size=2, lr=0.001))
    _write(outdir, trainer, "map", {"steps": trainer.global_step, "epoch": trainer.current_epoch})
    for max_epochs in (None, -1):  # unset, or -1 as Lightning spells it
        trainer = Trainer(
            max_steps=7, max_epochs=max_epochs, default_root_dir=f"{outdir}/s{max_epochs}", **QUIET
        )
        trainer.fit(OnStream())
        _write(outdir, trainer, f"stream{max_epochs}", {"steps": trainer.global_step})


def validation_inside_the_epoch(outdir: str) -> None:
    for interval in (4, 0.25, 5):
        module = CountsValidations()
        every_epoch = None if interval == 5 else 1
        trainer = Trainer(
            max_epochs=2,
            val_check_interval=interval,
            check_val_every_n_epoch=every_epoch,
            limit_val_batches=2,
            default_root_dir=f"{outdir}/v{interval}",
            **QUIET,
        )
        trainer.fit(module)
        _write(outdir, trainer, f"val{interval}", {"at": module.validated_at})


def _resume_case(outdir: str, name: str, max_steps: int, accumulate: int) -> list[list[float]]:
    checkpoint = ModelCheckpoint(every_n_train_steps=2 * 4 // accumulate, every_n_epochs=None)
    trainer = Trainer(
        max_steps=max_steps,
        val_check_interval=4,
        accumulate_grad_batches=accumulate,
        limit_val_batches=2,
        callbacks=[checkpoint],
        resume="auto",
        default_root_dir=f"{outdir}/{name}",
        **QUIET,
    )
    module = CountsValidations()  # after the trainer, which seeds: the same start each time
    trainer.fit(module)
    _write(outdir, trainer, name, {"at": module.validated_at, "step": trainer.global_step})
    return _weights(module)


def resume_after_a_mid_epoch_validation(outdir: str) -> None:
    for accumulate in (1, 2):
        total = 20 // accumulate  # 1 epoch and 8 batches into the second
        whole = _resume_case(outdir, f"whole{accumulate}", total, accumulate)
        _resume_case(outdir, f"parted{accumulate}", 8 // accumulate, accumulate)  # mid-epoch
        parted = _resume_case(outdir, f"parted{accumulate}", total, accumulate)
        if os.environ["RANK"] == "0":  # (the process group ends with each fit)
            same = all(torch.equal(torch.tensor(a), torch.tensor(b)) for a, b in zip(whole, parted))
            (Path(outdir) / f"same{accumulate}.json").write_text(json.dumps(same))


def on_two_ranks(outdir: str) -> None:
    """The three scenarios above in one launch, each in its own directory (``OUTDIR/NAME``)."""
    run_scenarios(
        outdir, max_steps_alone, validation_inside_the_epoch, resume_after_a_mid_epoch_validation
    )


# -- the tests ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "training_by_steps-two_ranks", __file__, "on_two_ranks", timeout=480
    )


def _read(outdir: Path, name: str):
    return json.loads((outdir / f"{name}.json").read_text())


@pytest.mark.timeout(600)  # with the fixture's run (or the wait for it)
def test_max_steps_alone_trains_exactly_that_many_steps_over_any_loader(two_ranks):
    outdir = two_ranks / "max_steps_alone"
    assert _read(outdir, "map") == {"steps": 1005, "epoch": 1004}
    assert _read(outdir, "streamNone") == {"steps": 7}
    assert _read(outdir, "stream-1") == {"steps": 7}


@pytest.mark.timeout(600)
def test_val_check_interval_validates_inside_the_epoch(two_ranks):
    outdir = two_ranks / "validation_inside_the_epoch"
    # 12 batches an epoch: after batches 4 and 8, and at the epoch's end (no double at 12)
    assert _read(outdir, "val4")["at"] == [4, 8, 12, 16, 20, 24]
    assert _read(outdir, "val0.25")["at"] == [3, 6, 9, 12, 15, 18, 21, 24]
    # check_val_every_n_epoch=None: every 5 batches counted across epochs, none at the end
    assert _read(outdir, "val5")["at"] == [5, 10, 15, 20]


@pytest.mark.timeout(600)
def test_a_resume_from_a_mid_epoch_validation_and_checkpoint_is_exact(two_ranks):
    outdir = two_ranks / "resume_after_a_mid_epoch_validation"
    for accumulate in (1, 2):
        whole = _read(outdir, f"whole{accumulate}")
        parted = _read(outdir, f"parted{accumulate}")
        assert whole["step"] == parted["step"] == 20 // accumulate
        # the resumed run validates at the same steps as the rest of the uninterrupted one
        assert parted["at"] == [s for s in whole["at"] if s > 8 // accumulate]
        assert _read(outdir, f"same{accumulate}") is True


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_epochs=0), "max_epochs: must be -1 (no limit) or at least 1"),
        (dict(val_check_interval=0), "val_check_interval: must be"),
        (dict(val_check_interval=1.5), "val_check_interval: must be"),
        (
            dict(val_check_interval=3, accumulate_grad_batches=2),
            "val_check_interval: 3 batches end inside an accumulation window",
        ),
        (
            dict(check_val_every_n_epoch=None),
            "check_val_every_n_epoch: None (validation counted across epochs) needs an int "
            "val_check_interval",
        ),
    ],
)
def test_wrong_step_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(**options)


def test_a_fractional_interval_needs_a_loader_with_a_length(tmp_path):
    trainer = Trainer(val_check_interval=0.5, default_root_dir=str(tmp_path), **QUIET)
    with pytest.raises(Exception, match=r"val_check_interval=0\.5 is a fraction"):
        trainer.fit(OnStream())


def test_max_steps_minus_one_is_no_limit():
    assert Trainer(max_steps=-1).max_steps is None


if __name__ == "__main__":
    run_scenario(globals())
