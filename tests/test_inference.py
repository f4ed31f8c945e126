"""Inference without a trainer: ``save_hyperparameters`` in ``__init__``, a fit on 2 ranks, then
``Module.load_from_checkpoint`` in a plain process gives the trained model's outputs; and
``trainer.export_weights`` after ``fit`` has returned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from common import IndexedData, run_scenario, run_scenarios
from conftest import shared_launch
from torch.utils.data import DataLoader

import disttrain
from disttrain import CheckpointError

X = torch.linspace(-1, 1, 12).reshape(3, 4)  # inputs the outputs are compared on


class Sized(disttrain.Module):
    """A regressor whose shape and learning rate come from ``__init__``."""

    def __init__(self, hidden: int = 8, lr: float = 0.1, note: str = "x", *, dims=(4, 1)):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dims[0], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dims[1])
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

    def train_dataloader(self):
        return DataLoader(IndexedData(16), batch_size=2)


class Unsaved(disttrain.Module):
    def __init__(self, hidden: int = 8, gen=None, keep: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=[] if keep else ["gen"])


def test_save_hyperparameters_records_the_init_arguments():
    module = Sized(16, note="y")
    assert module.hparams == {"hidden": 16, "lr": 0.1, "note": "y", "dims": (4, 1)}
    assert module.hparams.hidden == 16  # attribute access, as in Lightning
    assert Unsaved(3, gen=torch.Generator()).hparams == {"hidden": 3, "keep": False}
    assert Unsaved(3, gen=None, keep=True).hparams == {"hidden": 3, "gen": None, "keep": True}
    with pytest.raises(TypeError, match=r"save_hyperparameters: 'gen' .*Generator.*ignore"):
        Unsaved(3, gen=torch.Generator(), keep=True)


def test_a_model_trained_on_two_ranks_loads_for_inference_in_a_plain_process(two_ranks):
    outdir = two_ranks / "train_and_export"
    expected = torch.load(outdir / "outputs.pt")
    checkpoint = next((outdir / "checkpoints").glob("epoch=1-*.ckpt"))
    loaded = Sized.load_from_checkpoint(checkpoint)
    assert not loaded.training and loaded.hparams["hidden"] == 6
    assert loaded.net[0].out_features == 6  # built from the saved hyperparameters
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
    # the exported weights: the hyperparameters come as arguments (the file is a state dict)
    exported = Sized.load_from_checkpoint(outdir / "weights.pt", hidden=6, map_location="cpu")
    with torch.no_grad():
        assert torch.equal(exported(X), expected)
    with pytest.raises(CheckpointError, match="hidden") as wrong:  # a wrong shape is named
        Sized.load_from_checkpoint(outdir / "weights.pt")
    assert f"{outdir / 'weights.pt'}: its weights do not fit Sized" in str(wrong.value)
    assert "of another shape 3: net.0.weight (checkpoint [6, 4], module [8, 4])" in str(wrong.value)
    overridden = Sized.load_from_checkpoint(checkpoint, lr=0.5)  # an override wins
    assert overridden.hparams["lr"] == 0.5
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Sized.load_from_checkpoint(outdir / "nothing.ckpt")


class Sharded(Sized):
    def on_train_end(self):  # under FSDP the outputs need the process group: inside fit
        with torch.no_grad():
            self.outputs = self(X)


def test_a_sharded_checkpoint_directory_loads_in_a_plain_process(two_ranks):
    outdir = two_ranks / "train_sharded"
    checkpoint = next((outdir / "checkpoints").glob("epoch=1-*.ckpt"))
    assert checkpoint.is_dir()  # DCP shards of both ranks
    loaded = Sharded.load_from_checkpoint(checkpoint)
    with torch.no_grad():
        assert torch.equal(loaded(X), torch.load(outdir / "outputs.pt"))
    assert "load_from_checkpoint" in (outdir / "export_error.txt").read_text()


def train_sharded(outdir: str) -> None:
    trainer = disttrain.Trainer(
        max_epochs=2,
        default_root_dir=outdir,
        logger=None,
        enable_progress_bar=False,
        strategy="fsdp",
    )
    module = Sharded(hidden=6)
    trainer.fit(module)
    try:
        trainer.export_weights(Path(outdir) / "weights.pt")
    except RuntimeError as err:  # the shards need the process group fit closed
        (Path(outdir) / "export_error.txt").write_text(str(err))
    if int(os.environ["RANK"]) == 0:
        torch.save(module.outputs, Path(outdir) / "outputs.pt")


def train_and_export(outdir: str) -> None:
    trainer = disttrain.Trainer(
        max_epochs=2, default_root_dir=outdir, logger=None, enable_progress_bar=False
    )
    module = Sized(hidden=6)
    trainer.fit(module)
    trainer.export_weights(Path(outdir) / "weights.pt")  # after fit returned
    if int(os.environ["RANK"]) == 0:
        with torch.no_grad():
            torch.save(module.eval()(X), Path(outdir) / "outputs.pt")


def on_two_ranks(outdir: str) -> None:
    """Both 2-rank fits in one launch, each in its own directory (``OUTDIR/NAME``)."""
    run_scenarios(outdir, train_and_export, train_sharded)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session
    (``conftest.shared_launch``) for the tests that read it."""

    return shared_launch(
        tmp_path_factory, "inference-two_ranks", __file__, "on_two_ranks", timeout=180
    )


if __name__ == "__main__":
    run_scenario(globals())
