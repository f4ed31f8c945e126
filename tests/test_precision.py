"""Precision by Lightning's names: each value and alias accepted from Python and YAML, and the
``*-true`` precisions holding parameters (and the optimizer's state) in their dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from common import Regressor, run_scenario
from conftest import run_beside

from disttrain import ConfigError, Trainer
from disttrain.config import runfile

ACCEPTED = {
    "32-true": "32-true",
    "16-mixed": "16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "16-true": "16-true",
    "64-true": "64-true",
    32: "32-true",
    "32": "32-true",
    16: "16-mixed",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    64: "64-true",
    "64": "64-true",
}
QUIET = dict(logger=None, enable_checkpointing=False, enable_progress_bar=False)


@pytest.mark.parametrize("value", list(ACCEPTED), ids=[repr(v) for v in ACCEPTED])
def test_each_precision_and_alias_is_accepted_by_the_trainer_and_yaml(tmp_path, value):
    assert Trainer(precision=value, **QUIET).config.precision == ACCEPTED[value]
    path = tmp_path / "run.yaml"
    text = yaml.safe_dump(
        {
            "model": {"class_path": "disttrain.examples.regression.Regression"},
            "trainer": {"max_epochs": 1, "precision": value},
            "run_dir": str(tmp_path / "run"),
        }
    )
    path.write_text(text)
    assert runfile.load(path).trainer.precision == ACCEPTED[value]


@pytest.mark.parametrize("value", ["fp8", "bf16-true ", 8, True, 32.0, "mixed"])
def test_a_wrong_precision_names_the_option_and_the_accepted_values(value):
    with pytest.raises(ConfigError) as err:
        Trainer(precision=value, **QUIET)
    assert err.value.key == "precision"
    for name in ("'32-true'", "'bf16-mixed'", "'bf16-true'", "'16-true'", "'bf16'"):
        assert name in str(err.value), err.value


class Recording(Regressor):
    """Records the dtypes its steps see: the batch's features and an untyped new tensor."""

    def __init__(self, eps: float = 1e-8):
        super().__init__(n_train=8, n_val=4)
        self.step_dtypes: set = set()
        self.eps = eps  # Adam's

    def training_step(self, batch, batch_idx):
        self.step_dtypes.add((batch[0].dtype, torch.zeros(1).dtype, batch[2].dtype))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.step_dtypes.add((batch[0].dtype, torch.zeros(1).dtype, batch[2].dtype))
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, eps=self.eps)


def _fit_true(precision: str, outdir: Path, eps: float = 1e-8) -> Recording:
    module = Recording(eps)
    Trainer(
        max_epochs=2, precision=precision, default_root_dir=str(outdir), accelerator="cpu", **QUIET
    ).fit(module)
    return module


def test_bf16_true_holds_parameters_and_optimizer_state_in_bf16(tmp_path):
    module = _fit_true("bf16-true", tmp_path)
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    # the batch's floats converted, its integers left alone, untyped tensors bf16 in the step
    assert module.step_dtypes == {(torch.bfloat16, torch.bfloat16, torch.int64)}
    assert torch.get_default_dtype() == torch.float32  # only inside the step
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_64_true_trains_in_float64(tmp_path):
    module = _fit_true("64-true", tmp_path)
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert module.step_dtypes == {(torch.float64, torch.float64, torch.int64)}


def test_16_true_holds_parameters_in_fp16_where_the_cpu_supports_it(tmp_path):
    try:  # fp16 matmuls and Adam on the CPU need a recent torch
        torch.nn.Linear(2, 2).half()(torch.ones(1, 2, dtype=torch.float16)).sum().backward()
    except RuntimeError as err:
        pytest.skip(f"fp16 on this CPU: {err}")
    # Adam's default eps (1e-8) is 0 in fp16: its step divides by zero and the loss of step 2
    # is NaN (stop_on_nonfinite_loss stops there); 1e-4 is representable
    module = _fit_true("16-true", tmp_path, eps=1e-4)
    assert {p.dtype for p in module.parameters()} == {torch.float16}
    assert module.step_dtypes == {(torch.float16, torch.float16, torch.int64)}
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_true_trains_on_two_ranks(tmp_path):
    run_beside(__file__, "bf16_true_two_ranks", tmp_path)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for report in reports:
        assert {t.dtype for t in report["weights"].values()} == {torch.bfloat16}
        assert report["step"] == 4 and report["changed"]
    for key, tensor in reports[0]["weights"].items():
        assert torch.equal(tensor, reports[1]["weights"][key]), key  # DDP kept them alike


# -- what the ranks run ------------------------------------------------------------------------


def bf16_true_two_ranks(outdir: str) -> None:
    module = Recording()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = Trainer(
        max_epochs=2, precision="bf16-true", default_root_dir=outdir, accelerator="cpu", **QUIET
    )
    trainer.fit(module)
    weights = module.state_dict()
    changed = any(not torch.equal(before[k].bfloat16(), weights[k]) for k in weights)
    report = {"weights": weights, "step": trainer.global_step, "changed": changed}
    torch.save(report, Path(outdir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_scenario(globals())
