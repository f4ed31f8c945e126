"""The shipped examples: every tensor on the module's device, metrics logged and labelled by
stage, and the documented commands (fit, test, plot) on the shipped configs.

The device checks run on CPU: the module and its batch go to the ``meta`` device, so a tensor
an example builds on the CPU (``torch.tensor(...)``, ``torch.zeros(k)``) fails as it would next
to a CUDA loss or in NCCL's all-reduce.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, disttrain_cli

from disttrain.cli import main as cli
from disttrain.examples.charlm import CharLM
from disttrain.examples.digits import DigitsClassifier, DigitsData
from disttrain.examples.regression import Regression
from disttrain.loggers import NullLogger
from disttrain.loop import optim
from disttrain.observe.metrics import Reporter

META = torch.device("meta")
EXAMPLES = ("regression", "digits", "charlm")


@pytest.fixture(scope="module")
def charlm_data(tmp_path_factory) -> Path:
    """The tokenised corpus, prepared once for this file's CharLM tests."""
    data_dir = tmp_path_factory.mktemp("charlm-data")
    CharLM(data_dir=str(data_dir)).prepare_data()
    return data_dir


def build(name: str, charlm_data: Path) -> tuple[Any, dict[str, Any]]:
    """An example module after ``setup("fit")`` and its train/val/test loaders."""
    if name == "regression":
        module = Regression(n_samples=64)
        module.setup("fit")
        source: Any = module
    elif name == "digits":
        module, source = DigitsClassifier(), DigitsData(batch_size=16)
        source.setup("fit")
    else:
        module = CharLM(data_dir=str(charlm_data), block_size=16, n_embd=32, n_layer=1)
        module.setup("fit")
        source = module
    loaders = {
        "train": source.train_dataloader(),
        "val": source.val_dataloader(),
        "test": source.test_dataloader(),
    }
    return module, {split: loader for split, loader in loaders.items() if loader is not None}


class MetaTrainer:
    """What the examples' steps read of a trainer; its ``all_reduce`` checks the device as
    NCCL would and answers with ones on the CPU (so ``.tolist()`` works after it)."""

    def __init__(self, module: Any) -> None:
        self.device = META
        self.reporter = Reporter(NullLogger(), every_n_steps=1, sync_steps=False)
        self.running_limited_hook = None
        self.sanity_checking = False
        self.current_epoch = self.global_step = 0
        self.optimizers, _ = optim.normalise(module.configure_optimizers())
        self.reduced: list[torch.Tensor] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        assert tensor.device == self.device, f"all_reduce of a tensor on {tensor.device}"
        self.reduced.append(tensor)
        return torch.ones(tensor.shape, dtype=tensor.dtype)


def on_meta(name: str, charlm_data: Path) -> tuple[Any, MetaTrainer, dict[str, Any]]:
    """The example on the meta device, attached to a ``MetaTrainer``; one meta batch per split."""
    module, loaders = build(name, charlm_data)
    module.to(META)
    trainer = MetaTrainer(module)
    module.trainer = trainer
    assert module.device == META and all(p.device == META for p in module.parameters())
    batches = {split: [t.to(META) for t in next(iter(loader))] for split, loader in loaders.items()}
    return module, trainer, batches


def evaluate(module: Any, trainer: MetaTrainer, kind: str, batch: Any, n_batches: int) -> Any:
    """``{kind}_step`` on ``n_batches`` copies of ``batch``, then ``{kind}_epoch_end``."""
    trainer.reporter.evaluating, trainer.reporter.batch = True, batch
    module.eval()
    with torch.no_grad():
        outputs = [getattr(module, f"{kind}_step")(batch, i) for i in range(n_batches)]
        result = getattr(module, f"{kind}_epoch_end")(outputs)
    trainer.reporter.evaluating = False
    return result


@pytest.mark.parametrize("n_batches", [2, 0], ids=["batches", "no-batches"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_evaluation_builds_every_tensor_on_the_module_device(name, n_batches, charlm_data):
    module, trainer, batches = on_meta(name, charlm_data)
    for kind in ("validation", "test"):
        # the val batch for both: the test split is checked on its own below
        evaluate(module, trainer, kind, batches["val"], n_batches)
    assert [t.device for t in trainer.reduced] == [META, META]


@pytest.mark.parametrize("name", EXAMPLES)
def test_training_step_logs_loss_and_learning_rate(name, charlm_data):
    module, trainer, batches = on_meta(name, charlm_data)
    module.train()
    loss = module.training_step(batches["train"], 0)
    assert loss.device == META and loss.dim() == 0
    logged = trainer.reporter.train.step
    assert set(logged) == {"train_loss", "lr"}
    assert logged["train_loss"].device == META
    assert logged["lr"] == trainer.optimizers[0].param_groups[0]["lr"]
    assert "train_loss" in trainer.reporter.train.prog_bar


@pytest.mark.parametrize("name", EXAMPLES)
def test_evaluation_metrics_are_labelled_by_stage(name, charlm_data):
    module, trainer, batches = on_meta(name, charlm_data)
    expected = {"loss", "acc"} if name == "digits" else {"loss"}
    for kind, stage in (("validation", "val"), ("test", "test")):
        result = evaluate(module, trainer, kind, batches[stage], 2)
        logged = trainer.reporter.eval.take_epoch()
        assert set(logged) == set(result) == {f"{stage}_{m}" for m in expected}
        assert all(reduce == "max" for reduce, _, _ in logged.values())  # same on every rank


def test_charlm_test_split_is_held_out_and_train_is_unchanged(charlm_data):
    module, _ = build("charlm", charlm_data)
    ids = torch.load(module._cache(), weights_only=True)["ids"]
    n = len(ids)
    assert torch.equal(module.train_ids, ids[: int(n * 0.9)])  # the 90% trained before
    assert len(module.val_ids) == int(n * 0.05)
    assert torch.equal(torch.cat([module.train_ids, module.val_ids, module.test_ids]), ids)
    assert len(module.test_dataloader().dataset) > 300  # windows of 17 characters


# -- the documented commands on the shipped configs -------------------------------------------
def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key)]


def test_smoke_run_logs_its_metrics_and_plots_them(tmp_path):
    run_dir = tmp_path / "run"
    config = str(ROOT / "configs" / "smoke.yaml")
    proc = disttrain_cli("launch", "fit", "--config", config, f"run_dir={run_dir}", timeout=120)
    assert proc.returncode == 0, proc.stderr[-6000:]
    columns, rows = read_csv(run_dir / "metrics.csv")
    assert {"train_loss", "lr", "val_loss"} <= set(columns)
    assert len(values(rows, "train_loss")) == 6  # 2 epochs of 3 steps, every step logged
    assert values(rows, "lr") == [0.05] * 6
    assert len(values(rows, "val_loss")) == 2  # one per epoch; the sanity check is not logged
    assert all(math.isfinite(v) for key in ("train_loss", "val_loss") for v in values(rows, key))
    progress = [line for line in proc.stderr.splitlines() if "steps/s" in line]
    assert progress and all("train_loss" in line for line in progress)
    # the run says where its files went (a user's first question)
    lines = proc.stderr.splitlines()
    assert f"[rank 0] run directory: {run_dir}" in lines
    assert f"[rank 0] checkpoints: {run_dir / 'checkpoints' / 'epoch=1-step=6.ckpt'}" in lines
    assert f"[rank 0] metrics: {run_dir / 'metrics.csv'}" in lines

    plotted = disttrain_cli("plot", str(run_dir), timeout=60)
    assert plotted.returncode == 0, plotted.stderr
    png = Path(plotted.stdout.strip())
    assert png == run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _only_step_and_epoch(run_dir: Path) -> None:
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,epoch\n6,0.0\n12,1.0\n")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no run dir", "no such run directory"),
        ("no metrics.csv", "no metrics.csv"),
        ("no metrics", "no metrics to plot"),
        ("no matplotlib", "pip install 'disttrain[plot]'"),
    ],
)
def test_plot_errors_are_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, capsys, case, message):
    run_dir = tmp_path / "run"
    if case == "no metrics.csv":
        run_dir.mkdir()
    elif case == "no metrics":
        _only_step_and_epoch(run_dir)
    elif case == "no matplotlib":
        run_dir.mkdir()
        (run_dir / "metrics.csv").write_text("step,epoch,train_loss\n1,,0.5\n2,0.0,0.4\n")
        for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert cli.main(["plot", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("disttrain plot: ") and message in err


def test_plot_error_from_the_command_has_no_traceback(tmp_path):
    _only_step_and_epoch(tmp_path / "run")
    proc = disttrain_cli("plot", str(tmp_path / "run"), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"disttrain plot: {tmp_path / 'run' / 'metrics.csv'}: no metrics to plot "
        "(log some with self.log in the module)"
    ]


def test_default_config_fit_then_test_of_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    config = str(ROOT / "configs" / "default.yaml")
    short = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2",
        "model.init_args.sample_chars=20",
    ]
    fit = disttrain_cli("launch", "fit", "--config", config, f"run_dir={run_dir}", *short)
    assert fit.returncode == 0, fit.stderr[-6000:]
    columns, rows = read_csv(run_dir / "metrics.csv")
    assert {"train_loss", "lr", "val_loss"} <= set(columns)
    # the config's monitors: the learning rate, tokens per second at each rank and in all
    monitors = {"lr-AdamW", "throughput/tokens_per_sec", "throughput/epoch/tokens_per_sec"}
    assert monitors <= set(columns), columns
    assert values(rows, "lr-AdamW") == values(rows, "lr")
    assert all(math.isfinite(v) for key in ("train_loss", "val_loss") for v in values(rows, key))

    test = disttrain_cli(
        "test",
        "--config",
        config,
        f"run_dir={run_dir}",
        "trainer.resume=auto",
        "trainer.limit_test_batches=2",
        timeout=120,
    )
    assert test.returncode == 0, test.stderr[-6000:]
    assert "test_loss" in test.stderr and "val_loss" not in test.stderr
    assert f"evaluating the weights of {run_dir / 'checkpoints'}" in test.stderr  # the fit's


def test_digits_test_run_reports_test_metrics(tmp_path):
    proc = disttrain_cli(
        "test", "--config", str(ROOT / "configs" / "digits.yaml"), f"run_dir={tmp_path / 'run'}"
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "test_loss" in proc.stderr and "test_acc" in proc.stderr
    assert "val_" not in proc.stderr
    columns, rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert {"test_loss", "test_acc"} <= set(columns) and "val_loss" not in columns
    assert 0.0 <= values(rows, "test_acc")[0] <= 1.0
