"""A NaN or inf loss on one rank (``stop_on_nonfinite_loss``, ``disttrain/loop/stopping.py``):
every rank stops after the same step with an error naming the rank and the step, writes no
checkpoint of the poisoned state (not ModelCheckpoint's, not last.ckpt, not exported weights)
and exits nonzero; ``resume="auto"`` goes on from the last good checkpoint. A GradScaler that
skips a step (inf gradients, a finite loss) trains on; with the guard off a NaN loss trains on
as before. On real processes: two ranks (one torchrun launch for the cases that go on, the
stopping one last), then a resume, and the debug mode."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch
import yaml
from common import Regressor, read_results, run_scenario, write_result
from conftest import launch, run_alone, run_beside

from disttrain import ModelCheckpoint, NonFiniteLoss, Trainer
from disttrain.checkpoint.format import load

NAN_AT = 3  # the step (1-based) whose loss is NaN on rank 1: epoch 0 has steps 1-4


class NaNAt(Regressor):
    """The loss is NaN on ``rank`` in the forward of step ``step`` (at the window's first
    micro-batch with accumulation); ``scale_up`` instead multiplies the loss by 1e38 in that
    step's backward: inf gradients from a finite loss, which a GradScaler skips."""

    def __init__(self, step: int | None = NAN_AT, rank: int = 1, scale_up: bool = False):
        super().__init__(n_train=16, n_val=4, batch_size=2)
        self.step, self.rank, self.scale_up = step, rank, scale_up
        self.at_start: dict = {}

    def _now(self, batch_idx: int) -> bool:
        window = self.trainer.config.accumulate_grad_batches
        first = batch_idx % window == 0
        return first and self.global_rank == self.rank and self.global_step + 1 == self.step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        if self._now(batch_idx) and not self.scale_up:
            return loss * float("nan")
        return loss

    def backward(self, trainer, loss, optimizer, optimizer_idx):
        now = self.scale_up and self.global_rank == self.rank and self.global_step + 1 == self.step
        (loss * 1e38 if now else loss).backward()

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        self.log("val_loss", loss)
        return loss

    def on_train_start(self):
        self.at_start = {"step": self.global_step, "finite": finite(self)}


def finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def trainer_in(root: Path, **options) -> Trainer:
    options = {
        "max_epochs": 2,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "timeout": 30,
        "default_root_dir": str(root),
        # a checkpoint every step, the last one kept: a poisoned one would replace the good
        "callbacks": [ModelCheckpoint(every_n_steps=1, keep_last_k=1)],
        **options,
    }
    return Trainer(**options)


def metric_rows(root: Path) -> list[dict]:
    with open(root / "metrics.csv") as file:
        return list(csv.DictReader(file))


def nan_metrics(root: Path) -> list[dict]:
    rows = metric_rows(root)
    return [r for r in rows if any(v and math.isnan(float(v)) for v in r.values())]


def checkpoints(root: Path) -> dict[str, int]:
    """Every checkpoint file in the run's directory, by name: its step."""
    found = sorted((root / "checkpoints").glob("*.ckpt"))
    return {p.name: load(p)["progress"]["global_step"] for p in found}


# -- what the ranks run ------------------------------------------------------------------------


def goes_on(out: Path, rank: int) -> dict:
    """The cases that train on, and the guard at a micro-batch that is not a window's last."""
    result = {}
    trainer = trainer_in(out / "off", stop_on_nonfinite_loss=False)  # the old behaviour
    module = NaNAt()
    trainer.fit(module)
    trainer.export_weights(out / "off" / "weights.pt")
    result["off"] = {"step": trainer.global_step, "finite": finite(module)}
    trainer = trainer_in(out / "fp16", precision="16-mixed")
    module = NaNAt(scale_up=True)  # the scaler skips step 3: inf gradients, a finite loss
    trainer.fit(module)
    scale = trainer.scaler.get_scale() if trainer.scaler else None
    result["fp16"] = {"step": trainer.global_step, "finite": finite(module), "scale": scale}
    # NaN in the first of two micro-batches of step 6; a checkpoint at each epoch's end only,
    # so the stop vote (not a save at that step) stops it
    trainer = trainer_in(out / "accumulate", accumulate_grad_batches=2, max_epochs=4, callbacks=[])
    module = NaNAt(step=6)
    result["accumulate"] = stopped_by(trainer, module)
    # FSDP: no DDP model carries the vote; the per-step agreement does
    trainer = trainer_in(out / "fsdp", strategy="fsdp", callbacks=[])
    result["fsdp"] = stopped_by(trainer, NaNAt())
    return result


def stopped_by(trainer: Trainer, module: NaNAt) -> dict:
    try:
        trainer.fit(module)
        return {"step": trainer.global_step, "error": None}
    except NonFiniteLoss as error:
        return {"step": trainer.global_step, "error": str(error)}


def nan_on_rank_one(outdir: str) -> None:
    """``goes_on``'s cases, then the guard on (the default) with the NaN loss: its error ends
    the process, after each rank wrote where it stopped."""
    out, rank = Path(outdir), int(os.environ["RANK"])
    if os.environ.get("ONLY_GUARDED") is None:
        write_result(out, rank, goes_on(out, rank))
    trainer = trainer_in(out / "on")
    module = NaNAt()
    try:
        trainer.fit(module)
        trainer.export_weights(out / "on" / "weights.pt")
    finally:
        stopped = {"step": trainer.global_step}
        (out / f"stopped{rank}.json").write_text(json.dumps(stopped))


def resumes(outdir: str) -> None:
    trainer = trainer_in(Path(outdir) / "on", resume="auto")
    module = NaNAt(step=None)
    trainer.fit(module)
    result = {"start": module.at_start, "step": trainer.global_step, "finite": finite(module)}
    write_result(outdir, trainer.global_rank, result)


def nan_alone(outdir: str) -> None:
    """The debug mode (one process): the NaN loss at step 2 of rank 0; an export asked for
    after the stop is refused."""
    trainer = trainer_in(Path(outdir), max_epochs=1)
    try:
        trainer.fit(NaNAt(step=2, rank=0))
    finally:
        try:
            trainer.export_weights(Path(outdir) / "weights.pt")
        except NonFiniteLoss as refused:
            print(f"export refused: {refused}")


# -- the tests ---------------------------------------------------------------------------------


def test_a_nan_loss_on_one_rank_stops_every_rank_and_resume_goes_on_from_the_last_good(
    tmp_path,
):
    out = tmp_path / "out"
    proc = run_beside(__file__, "nan_on_rank_one", out, timeout=300, expect_ok=False)
    log = proc.stdout
    assert proc.returncode == 1, log[-6000:]  # a failure: the launcher's exit code
    # the guard off: trained on to the end on NaN weights, as before
    rank0, rank1 = read_results(out, 2)
    assert rank0["off"] == rank1["off"] == {"step": 8, "finite": False}
    assert not finite_state(out / "off" / "weights.pt")
    assert nan_metrics(out / "off")  # validation on NaN weights logged NaN
    # 16-mixed: the skipped step is no NaN loss; the scale went down, training went on
    assert rank0["fp16"] == rank1["fp16"]
    assert rank0["fp16"]["step"] == 8 and rank0["fp16"]["finite"], rank0["fp16"]
    assert rank0["fp16"]["scale"] < 65536.0
    # accumulation: a NaN loss in a window's first micro-batch stops after that window's step
    for result in (rank0, rank1):
        assert result["accumulate"]["step"] == 6, result["accumulate"]
        assert "the loss was nan on rank 1 at step 6" in result["accumulate"]["error"]
    assert max(checkpoints(out / "accumulate").values()) == 4  # epoch 0's: steps 1-4
    for result in (rank0, rank1):
        assert result["fsdp"]["step"] == NAN_AT, result["fsdp"]
        assert f"the loss was nan on rank 1 at step {NAN_AT}" in result["fsdp"]["error"]
    # the guard on: every rank after the same step, the error names rank 1 and the step
    stopped = [json.loads((out / f"stopped{r}.json").read_text()) for r in (0, 1)]
    assert stopped == [{"step": NAN_AT}] * 2
    assert f"the loss was nan on rank 1 at step {NAN_AT}" in log, log[-6000:]
    on = out / "on"
    saved = checkpoints(on)
    assert saved and max(saved.values()) == NAN_AT - 1, saved  # last.ckpt among them
    assert not (on / "weights.pt").exists()
    assert nan_metrics(on) == []
    assert max(int(r["step"]) for r in metric_rows(on)) <= NAN_AT  # nothing trained after
    # resume="auto": from the last good checkpoint, on finite weights, to the end
    run_beside(__file__, "resumes", out, timeout=180)
    for result in read_results(out, 2):
        assert result == {"start": {"step": NAN_AT - 1, "finite": True}, "step": 8, "finite": True}
    assert nan_metrics(on) == []


def test_the_debug_mode_stops_on_a_nan_loss_too(tmp_path):
    proc = run_alone(__file__, "nan_alone", tmp_path, timeout=120, expect_ok=False)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "the loss was nan on rank 0 at step 2" in proc.stdout, proc.stdout[-4000:]
    assert "export refused: the loss was nan on rank 0 at step 2" in proc.stdout
    assert not (tmp_path / "weights.pt").exists()
    assert max(checkpoints(tmp_path).values()) == 1


def test_the_disttrain_command_fails_with_the_rank_and_the_step(tmp_path):
    config = {
        "model": {"class_path": "test_nonfinite.NaNAt"},
        "trainer": {"max_epochs": 2, "num_sanity_val_steps": 0, "accelerator": "cpu"},
        "launch": {"nproc_per_node": 2},
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = launch(path)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"the loss was nan on rank 1 at step {NAN_AT}" in proc.stderr, proc.stderr[-4000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))  # epoch 0 never ended


def finite_state(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in torch.load(path).values())


if __name__ == "__main__":
    run_scenario(globals())
