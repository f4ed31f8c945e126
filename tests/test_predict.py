"""Trainer.predict: every sample predicted once across ranks, unpadded; predictions in dataset
order on every rank; a PredictionWriter's per-rank files; the CLI; a failing predict_step."""

from __future__ import annotations

import os
import textwrap
from collections import Counter

import pytest
import torch
from common import IndexedData, Regressor, read_results, run_scenario, write_result
from conftest import run_beside
from torch.utils.data import DataLoader

import disttrain
from disttrain.callbacks import PredictionWriter
from disttrain.cli import main as cli


class Predictor(Regressor):
    """Predicts ``(dataset index, model output)`` per sample; records what it predicted and
    whether it ran in eval mode under inference mode."""

    def __init__(self, n_predict=7, workers=0, fail_on_rank=-1, **kw):
        super().__init__(**kw)
        self.n_predict, self.workers, self.fail_on_rank = n_predict, workers, fail_on_rank
        self.predicted: list[int] = []
        self.modes: set[tuple[bool, bool]] = set()

    def predict_step(self, batch, batch_idx):
        x, _, idx = batch
        if self.global_rank == self.fail_on_rank and batch_idx == 1:
            raise ValueError(f"predict_step broke on batch {batch_idx}")
        self.predicted.extend(idx.tolist())
        self.modes.add((self.training, torch.is_inference_mode_enabled()))
        return {"index": idx, "y": self(x)}

    def predict_dataloader(self):
        return DataLoader(IndexedData(self.n_predict), batch_size=2, num_workers=self.workers)


def expected_outputs(module: torch.nn.Module, n: int) -> torch.Tensor:
    with torch.no_grad():
        return module(IndexedData(n).x)


def _quiet(tmp, **options) -> disttrain.Trainer:
    return disttrain.Trainer(
        default_root_dir=str(tmp),
        enable_checkpointing=False,
        enable_progress_bar=False,
        **options,
    )


def _summary(module: Predictor, predictions) -> dict:
    got = {"predicted": list(module.predicted), "modes": sorted(module.modes)}
    if predictions is not None:
        got["index"] = torch.cat([p["index"] for p in predictions]).tolist()
        got["y"] = torch.cat([p["y"] for p in predictions]).tolist()
        got["devices"] = sorted({str(p["y"].device) for p in predictions})
    got["expected"] = expected_outputs(module, module.n_predict).tolist()
    return got


# -- on torchrun ranks ----------------------------------------------------------------------
def after_ddp_fit(outdir):
    """Fit one step under DDP, then predict 7 samples with a loader worker and a writer."""
    module = Predictor(n_predict=7, workers=1)
    writer = PredictionWriter(os.path.join(outdir, "written"), write_interval="batch")
    trainer = _quiet(
        os.path.join(outdir, "run"),
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[writer],
    )
    trainer.fit(module)
    predictions = trainer.predict(module)
    write_result(outdir, trainer.global_rank, _summary(module, predictions))


def three_ranks(outdir):
    """A predict_step that fails on rank 1; then 11 samples over 3 ranks, written per epoch
    and not gathered."""
    writer = PredictionWriter(os.path.join(outdir, "written"), write_interval="epoch")
    trainer = _quiet(os.path.join(outdir, "run"), callbacks=[writer], timeout=60)
    module = Predictor(n_predict=11, fail_on_rank=1)  # after the trainer: seeded alike
    error = None
    try:
        trainer.predict(module)
    except disttrain.HookFailed as failed:
        error = str(failed)
    module.fail_on_rank, module.predicted = -1, []
    returned = trainer.predict(module, return_predictions=False)
    got = _summary(module, None)
    got["returned"], got["error"] = repr(returned), error
    write_result(outdir, trainer.global_rank, got)


def _each_once(results, n):
    counts = Counter(i for result in results for i in result["predicted"])
    assert counts == Counter(range(n)), counts


def test_two_ranks_predict_each_sample_once_and_return_dataset_order_after_ddp(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "after_ddp_fit", outdir, nproc=2)
    results = read_results(outdir, 2)
    _each_once(results, 7)
    for rank, result in enumerate(results):
        assert result["index"] == list(range(7)), f"rank {rank}"
        assert result["y"] == pytest.approx(result["expected"], abs=1e-6), f"rank {rank}"
        assert result["devices"] == ["cpu"]
        assert result["modes"] == [[False, True]]  # eval mode, inference mode
    written = PredictionWriter.read(outdir / "written")
    assert torch.cat([p["index"] for p in written]).tolist() == list(range(7))
    assert {p.name for p in (outdir / "written").iterdir()} == {"rank0", "rank1"}


def test_three_ranks_write_per_rank_files_and_a_failing_step_stops_every_rank(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "three_ranks", outdir, nproc=3)
    results = read_results(outdir, 3)
    _each_once(results, 11)
    written = PredictionWriter.read(outdir / "written")
    assert torch.cat([p["index"] for p in written]).tolist() == list(range(11))
    y = torch.cat([p["y"] for p in written]).tolist()
    assert y == pytest.approx(results[0]["expected"], abs=1e-6)
    for result in results:
        assert result["returned"] == "None"
        assert "rank 1" in result["error"] and "predict_step broke on batch 1" in result["error"]
        assert "predict" in result["error"].splitlines()[0], result["error"]


# -- in one process (the debug mode) ---------------------------------------------------------
def test_one_process_predicts_in_order_from_a_checkpoint_and_from_given_loaders(tmp_path):
    trained = Predictor()
    trainer = disttrain.Trainer(
        default_root_dir=str(tmp_path / "run"), max_epochs=1, enable_progress_bar=False
    )
    trainer.fit(trained)
    fresh = Predictor()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    predictions = _quiet(tmp_path / "p").predict(fresh, ckpt_path=str(ckpt))
    got = _summary(fresh, predictions)
    assert got["index"] == list(range(7)) and got["modes"] == [(False, True)]
    assert got["y"] == pytest.approx(expected_outputs(trained, 7).tolist(), abs=1e-6)
    assert fresh.training  # the mode it came in
    loader = DataLoader(IndexedData(5), batch_size=3)
    predictions = _quiet(tmp_path / "q").predict(fresh, dataloaders=loader)
    assert [p["index"].tolist() for p in predictions] == [[0, 1, 2], [3, 4]]


def test_predict_refuses_a_shuffling_loader(tmp_path):
    module = Predictor()
    loader = DataLoader(IndexedData(5), batch_size=3, shuffle=True)
    with pytest.raises(ValueError, match=r"predict.*must not shuffle"):
        _quiet(tmp_path).predict(module, dataloaders=loader)


CONFIG = """\
model:
  class_path: disttrain.examples.regression.Regression
  init_args: {n_samples: 40, batch_size: 4}
trainer:
  enable_progress_bar: false
seed: 0
"""


def test_cli_predict_writes_every_sample_to_the_run_directory(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG + f"run_dir: {tmp_path / 'run'}\n")
    assert cli.main(["predict", "--config", str(path)]) == 0
    # a later command in this process (or its children) must not be told to resume with this one
    assert "DISTTRAIN_RESUME_COMMAND" not in os.environ
    written = PredictionWriter.read(tmp_path / "run" / "predictions")
    assert torch.cat(written).shape == (10,)  # the example's 10 validation samples
    assert (tmp_path / "run" / "predict.config.yaml").exists()
    assert cli.main(["hooks", "--config", str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()]
    for hook in ("on_predict_start", "on_predict_batch_start", "on_predict_batch_end"):
        assert hook in rows, out
    text = textwrap.dedent(out)
    assert "predict" in text.splitlines()[0]


if __name__ == "__main__":
    run_scenario(globals())
