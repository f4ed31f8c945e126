"""``export_weights`` to a ``.safetensors`` file (the optional ``safetensors`` extra): the plain
module state dict, read back with ``safetensors.torch.load_file`` alone, equal to the ``.pt``
export, tied weights included, and by ``load_from_checkpoint``; under DDP and FSDP (gathered
from the shards) on two ranks, in one process, and a clear error naming the extra where
safetensors is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from common import Regressor, run_scenario
from conftest import run_beside
from safetensors.torch import load_file

from disttrain import Trainer


class Tied(torch.nn.Module):
    """An encoder and a decoder sharing one weight (as a language model's embedding and head)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class Exporting(Regressor):
    """Exports its weights as ``.pt`` and ``.safetensors`` from ``on_train_end`` (every rank,
    inside fit: under FSDP the shards are gathered there)."""

    def __init__(self, where: Path) -> None:
        super().__init__(n_train=16, batch_size=2)
        self.net = torch.nn.Sequential(Tied(), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        self.where = where

    def on_train_end(self):
        self.trainer.export_weights(self.where / "weights.pt")
        self.trainer.export_weights(self.where / "weights.safetensors")


def quiet_trainer(root: Path, strategy: str = "auto") -> Trainer:
    return Trainer(
        max_epochs=1,
        strategy=strategy,
        accelerator="cpu",
        logger=None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )


def fit_and_export(root: Path, strategy: str = "auto") -> None:
    trainer = quiet_trainer(root, strategy)
    trainer.fit(Exporting(root))


def both_strategies(outdir: str) -> None:
    for strategy in ("ddp", "fsdp"):
        fit_and_export(Path(outdir) / strategy, strategy)


def assert_same_as_pt(where: Path) -> None:
    pt = torch.load(where / "weights.pt", weights_only=True)
    loaded = load_file(where / "weights.safetensors")  # safetensors alone, no disttrain
    assert loaded.keys() == pt.keys()
    assert {"net.0.enc.weight", "net.0.dec.weight"} <= loaded.keys()  # the tied pair, both
    for key, tensor in pt.items():
        assert torch.equal(loaded[key], tensor), key
    module = Exporting.load_from_checkpoint(where / "weights.safetensors", where=where)
    assert module.net[0].dec.weight is module.net[0].enc.weight  # still tied
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, pt[key]), key


def test_ddp_and_fsdp_on_two_ranks_export_safetensors_equal_to_the_pt_export(tmp_path):
    run_beside(__file__, "both_strategies", tmp_path, timeout=240)
    for strategy in ("ddp", "fsdp"):
        assert_same_as_pt(tmp_path / strategy)


def test_one_process_exports_safetensors_too(tmp_path):
    fit_and_export(tmp_path)
    assert_same_as_pt(tmp_path)


def test_without_safetensors_the_error_names_the_extra(tmp_path, monkeypatch):
    trainer = quiet_trainer(tmp_path)
    trainer.fit(Regressor(n_train=4))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors: ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install 'disttrain\[safetensors\]'"):
        trainer.export_weights(tmp_path / "weights.safetensors")
    assert not (tmp_path / "weights.safetensors").exists()


if __name__ == "__main__":
    run_scenario(globals())
