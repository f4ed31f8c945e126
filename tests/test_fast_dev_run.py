"""``fast_dev_run``: N batches each of training, validation and test, one epoch, and nothing
left on disk (no checkpoint, no logger file, no run file); one printed line says so."""

from __future__ import annotations

import pytest
from common import Regressor

from disttrain import ConfigError, ModelCheckpoint, Trainer


@pytest.mark.parametrize("value, n", [(True, 1), (3, 3)])
def test_fast_dev_run_runs_n_batches_of_each_and_writes_nothing(tmp_path, disttrain_log, value, n):
    module = Regressor(n_train=16, n_val=16)  # 8 batches of 2 each
    trainer = Trainer(
        fast_dev_run=value,
        max_epochs=5,
        num_sanity_val_steps=2,
        default_root_dir=str(tmp_path / "run"),
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "run" / "mine"))],
        logger="csv",
        enable_progress_bar=False,
    )
    trainer.fit(module)
    assert len(module.seen) == 2 * n and trainer.global_step == n  # one epoch of n batches
    assert len(module.val_seen) == 2 * n  # validation: n batches, no sanity check
    trainer.test(module)
    assert len(module.val_seen) == 4 * n  # test: n batches
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # not even the run directory
    said = [
        r.getMessage() for r in disttrain_log.records if r.getMessage().startswith("fast_dev_run:")
    ]
    assert not any(r.getMessage().startswith("run directory") for r in disttrain_log.records)
    batches = f"{n} batch{'' if n == 1 else 'es'}"
    assert said == [
        f"fast_dev_run: {batches} each of training, validation and test, one epoch, no sanity "
        "check; no checkpoints, no logger, no run files are written"
    ]


@pytest.mark.parametrize("value", [-1, "yes", 1.5])
def test_a_wrong_fast_dev_run_names_the_option(value):
    with pytest.raises(ConfigError) as err:
        Trainer(fast_dev_run=value)
    assert err.value.key == "fast_dev_run"
