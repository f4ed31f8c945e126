"""Loggers as objects: every rank builds them, global rank 0 alone writes; MLflow and W&B
(offline) read back through their own formats; a resumed fit logs into the same run.

The two-rank scenario runs two fits, as a script run by every rank would: the first stops
at ``max_steps=6`` (mid-epoch 1), the second resumes it (``resume="auto"``) to step 10, each
with new logger objects. Every logger has a ``save_dir`` named after its rank, so a file
written by rank 1 would show as ``logs-rank1``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import yaml
from common import LogsMetrics, read_results, run_scenario, write_result
from conftest import ROOT, disttrain_cli, run_beside

import disttrain
from disttrain.config import runfile as runconfig
from disttrain.config.options import ConfigError
from disttrain.loggers import (
    CSVLogger,
    Logger,
    LoggerGroup,
    MLflowLogger,
    NullLogger,
    TensorBoardLogger,
    WandbLogger,
)

EVERY_2 = 2  # log_every_n_steps: step rows at 2, 4, ...; 4 steps an epoch at 2 ranks
WANDB_QUIET = {"console": "off", "x_disable_stats": True, "silent": True}


class Recording(Logger):
    """A user's own tracker: records every call, writes them to ``calls.json`` when done."""

    def __init__(self, save_dir=None):
        super().__init__(save_dir)
        self.calls: list = []

    @property
    def experiment(self):
        return self

    def resume_from(self, step):
        self.calls.append(["resume_from", step])

    def log_hyperparams(self, params):
        self.calls.append(["log_hyperparams", sorted(params)])

    def log_metrics(self, metrics, step):
        self.calls.append(["log_metrics", step, sorted(metrics)])

    def finalize(self, status="success"):
        self.calls.append(["finalize", status])
        self.save_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / "calls.json").write_text(json.dumps(self.calls))


def _loggers(save_dir: Path) -> list[Logger]:
    return [
        CSVLogger(save_dir),
        TensorBoardLogger(save_dir),
        MLflowLogger(experiment_name="test", save_dir=save_dir),
        WandbLogger(project="test", save_dir=save_dir, offline=True, settings=WANDB_QUIET),
        Recording(save_dir / "mine"),
    ]


def every_rank_builds_loggers(outdir):
    """Two fits on every rank, each building its loggers as a script would."""
    rank = int(os.environ["RANK"])
    save_dir = Path(outdir) / f"logs-rank{rank}"
    result = {}
    for fit, options in (("first", {"max_steps": 6}), ("resumed", {"max_steps": 10})):
        loggers = _loggers(save_dir)
        trainer = disttrain.Trainer(
            max_epochs=3,
            logger=loggers,
            log_every_n_steps=EVERY_2,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            default_root_dir=str(Path(outdir) / "run"),
            resume="auto",
            seed=1,
            **options,
        )
        trainer.fit(LogsMetrics(n_train=16, n_val=4))
        result[fit] = {
            "logger": type(trainer.logger).__name__,
            "members": [type(m).__name__ for m in trainer.logger.loggers],
            "save_dir": str(trainer.logger.save_dir),
            "recorded": loggers[-1].calls,
            "ids": [loggers[2].run_id, loggers[3].run_id],
        }
    write_result(outdir, rank, result)


def test_loggers_built_on_every_rank_write_on_rank_zero_and_resume_their_runs(
    tmp_path, monkeypatch
):
    outdir = tmp_path / "out"
    run_beside(__file__, "every_rank_builds_loggers", outdir, nproc=2, timeout=240)
    zero, one = read_results(outdir, 2)
    assert not (outdir / "logs-rank1").exists()  # not one file from rank 1, nor a directory
    assert sorted(p.name for p in (outdir / "run").iterdir()) == ["checkpoints"]
    logs = outdir / "logs-rank0"
    for name in ("metrics.csv", "hparams.yaml", "tensorboard", "mlruns", "wandb", "mine"):
        assert (logs / name).exists(), name
    for rank, (result, kind) in enumerate(((zero, "LoggerGroup"), (one, "NullLogger"))):
        for fit in ("first", "resumed"):
            assert result[fit]["logger"] == kind
            assert result[fit]["save_dir"] == str(outdir / f"logs-rank{rank}")  # its own
    assert one["first"]["members"] == ["NullLogger"] * 5
    assert one["first"]["recorded"] == one["resumed"]["recorded"] == []  # never called
    assert one["first"]["ids"] == [None, None]  # no run started on rank 1

    # a user's own Logger: the trainer's calls, in order; the resumed fit joins at step 6
    first, resumed = zero["first"]["recorded"], zero["resumed"]["recorded"]
    assert first[:2] == [["resume_from", None], ["log_hyperparams", ["trainer"]]]
    assert resumed[0] == ["resume_from", 6]
    assert first[-1] == resumed[-1] == ["finalize", "success"]
    steps = [c[1] for c in first + resumed if c[0] == "log_metrics"]
    assert sorted(set(steps)) == [2, 4, 6, 8, 10]

    # MLflow: one run across both fits; params, and every step's metrics, read back
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    client = mlflow_tracking.MlflowClient(tracking_uri=(logs / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [zero["first"]["ids"][0]] == [zero["resumed"]["ids"][0]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer/max_steps"] == "6"  # kept: MLflow params do not change
    assert run.data.params["trainer/log_every_n_steps"] == str(EVERY_2)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [4, 8]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")] == [4, 8]

    # W&B offline: one directory per fit, both of the same run, steps continuing
    wandb_id = zero["first"]["ids"][1]
    assert zero["resumed"]["ids"][1] == wandb_id
    offline = sorted((logs / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in offline] == [wandb_id, wandb_id]
    fits = [wandb_records(next(p.glob("run-*.wandb"))) for p in offline]
    assert [fit["steps"]["train_loss"] for fit in fits] == [[2, 4, 6], [8, 10]]
    assert fits[0]["config"]["trainer"]["max_steps"] == 6
    assert fits[1]["config"]["trainer"]["max_steps"] == 10  # W&B's config follows the run
    assert fits[0]["run_id"] == fits[1]["run_id"] == wandb_id


def wandb_records(path: Path) -> dict:
    """An offline run's ``.wandb`` file read back: a LevelDB-style log (a 7-byte header, then
    32 KiB blocks of records, each with a 7-byte header: checksum, length, type) of W&B's
    ``Record`` protobufs. Returns the run id, its config and each metric's logged steps."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            records.append(pending)
    found: dict = {"steps": {}, "config": {}, "run_id": None}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run_id"] = record.run.run_id
            items = record.run.config.update
            found["config"].update({_key(i): json.loads(i.value_json) for i in items})
        elif kind == "config":
            items = record.config.update
            found["config"].update({_key(i): json.loads(i.value_json) for i in items})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            for key in row:
                found["steps"].setdefault(key, []).append(row.get("trainer/global_step"))
    found["config"] = {
        k: v.get("value", v) if isinstance(v, dict) else v for k, v in found["config"].items()
    }
    return found


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


# -- the option: Python and YAML, validated alike ----------------------------------------------
def test_logger_option_takes_names_objects_lists_and_false(tmp_path):
    run_dir = str(tmp_path / "run")
    mine = CSVLogger(tmp_path / "mine")
    single = disttrain.Trainer(logger=mine, default_root_dir=run_dir)
    assert single.logger is mine  # the object itself on the rank that writes
    named = disttrain.Trainer(logger=["csv", "tensorboard"], default_root_dir=run_dir)
    assert isinstance(named.logger, LoggerGroup)
    assert [m.log_dir for m in named.logger] == [Path(run_dir), Path(run_dir) / "tensorboard"]
    for off in (False, None, []):
        assert type(disttrain.Trainer(logger=off).logger) is NullLogger
    assert disttrain.TrainerConfig(logger=True).logger == "csv"  # Lightning's logger=True
    assert not (tmp_path / "run").exists() and not (tmp_path / "mine").exists()  # lazy

    with pytest.raises(ConfigError, match=r"^logger: unknown logger 'mlfow' \(did you mean"):
        disttrain.Trainer(logger="mlfow")
    with pytest.raises(ConfigError, match=r"^logger\.1: expected a logger name"):
        disttrain.Trainer(logger=["csv", 3])


def _validate(logger) -> runconfig.RunConfig:
    raw = {
        "model": {"class_path": "disttrain.examples.regression.Regression"},
        "trainer": {"logger": logger},
    }
    return runconfig.validate(raw, "job.yaml")


def test_yaml_logger_specs_are_checked_like_callbacks():
    spec = {"class_path": "disttrain.loggers.MLflowLogger", "init_args": {"run_name": "a"}}
    run = _validate(["csv", spec])
    assert run.trainer.logger == ["csv", spec]
    assert run.resolved["trainer"]["logger"] == ["csv", spec]  # config.yaml repeats it
    problems = {
        "trainer.logger.1.class_path: 'disttrain.callbacks.ModelCheckpoint' is not a "
        "disttrain.Logger": ["csv", {"class_path": "disttrain.callbacks.ModelCheckpoint"}],
        "trainer.logger.init_args.experiment: MLflowLogger takes no argument 'experiment'": {
            "class_path": "disttrain.loggers.MLflowLogger",
            "init_args": {"experiment": "x"},
        },
        "trainer.logger: unknown logger 'tensorbord'": "tensorbord",
        "trainer.logger.0: expected a logger name": [7],
    }
    for message, logger in problems.items():
        with pytest.raises(ConfigError) as err:
            _validate(logger)
        assert str(err.value).startswith(f"job.yaml: {message}"), str(err.value)


def test_yaml_names_an_mlflow_logger_by_class_path(tmp_path, monkeypatch):
    run = tmp_path / "run"
    spec = "{class_path: disttrain.loggers.MLflowLogger, init_args: {experiment_name: yaml}}"
    proc = disttrain_cli(
        "fit",
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        f"run_dir={run}",
        f"trainer.logger=[csv, {spec}]",
        "trainer.max_epochs=1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "metrics.csv").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"][1] == {
        "class_path": "disttrain.loggers.MLflowLogger",
        "init_args": {"experiment_name": "yaml"},
    }
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    client = mlflow_tracking.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("yaml").experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "epoch")] == [6]


if __name__ == "__main__":
    run_scenario(globals())
