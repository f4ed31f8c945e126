"""``max_time``: an agreed stop after the step where a rank's training time runs out (no
collective per step), then a checkpoint, and fit ends as usual."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from common import Regressor, run_scenario
from conftest import run_beside

from disttrain import ConfigError, Trainer
from disttrain.checkpoint import format as checkpoint
from disttrain.config.options import max_time_seconds


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("00:00:00:02", 2.0),
        ("01:02:03:04", 93784.0),
        ({"minutes": 1, "seconds": 5}, 65.0),
        (30, 30.0),
        (0.5, 0.5),
        (None, None),
    ],
)
def test_max_time_takes_a_string_a_mapping_or_seconds(value, seconds):
    assert max_time_seconds(value) == seconds
    Trainer(max_time=value, logger=None)


@pytest.mark.parametrize("value", ["1:00:00", "00:00:00:xx", {"weeks": 1}, 0, -3, True, [1]])
def test_a_wrong_max_time_names_the_option(value):
    with pytest.raises(ConfigError) as err:
        Trainer(max_time=value, logger=None)
    assert err.value.key == "max_time"


class Slow(Regressor):
    """Each step takes 0.1 s on rank 0 (the others wait for it in the all-reduce); rank 1's
    clock runs out first."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0:
            time.sleep(0.1)
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        self.ended = True


def test_every_rank_stops_after_the_same_step_and_a_checkpoint_is_written(tmp_path):
    proc = run_beside(__file__, "timed", tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["step"] == reports[1]["step"]
    step = reports[0]["step"]
    assert 3 <= step < 40, step  # stopped by the clock: not at once, not at max_epochs
    assert all(r["ended"] for r in reports)  # fit ended as usual
    saved = [checkpoint.load(p)["progress"]["global_step"] for p in reports[0]["checkpoints"]]
    assert step in saved
    assert f"max_time reached: stopped after step {step}" in proc.stdout


def timed(outdir: str) -> None:
    rank = int(os.environ["RANK"])
    # rank 1 has less time: its vote ends the run for both, after the same step
    trainer = Trainer(
        max_epochs=10,
        max_time=1.2 if rank == 1 else 60,
        default_root_dir=outdir,
        logger=None,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    module = Slow()
    trainer.fit(module)
    found = sorted(str(p) for p in (Path(outdir) / "checkpoints").glob("epoch=*.ckpt"))
    report = {"step": trainer.global_step, "ended": module.ended, "checkpoints": found}
    (Path(outdir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run_scenario(globals())
