"""A user's first hour with the files a run leaves: metrics history across resumes, the
config a run is repeated from, the run directory, override errors, and small CLI promises.

Every test runs the ``disttrain`` command in real processes on ``configs/smoke.yaml`` (one
debug process: the fastest real run; six batches of 16 per epoch, so steps 6, 12, ... end the
epochs) and reads the files it wrote.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, disttrain_cli

SMOKE = ROOT / "configs" / "smoke.yaml"
EVERY_2 = "trainer.log_every_n_steps=2"  # a step row every other step: 2, 4, 6, ...
KEEP_ALL = (
    "trainer.callbacks=[{class_path: disttrain.ModelCheckpoint, init_args: {keep_last_k: 9}}]"
)


def fit(run_dir: Path, *overrides: str, config: Path = SMOKE) -> str:
    proc = disttrain_cli("fit", "--config", str(config), f"run_dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["step"]) for r in rows]


# -- 1. resuming continues the history ------------------------------------------------------
def test_resumed_fits_continue_metrics_csv(tmp_path):
    """Needs ``self.logger.resume_from(...)`` in ``Trainer.fit`` (see the logger's docstring)."""
    run = tmp_path / "run"
    fit(run, EVERY_2, KEEP_ALL)
    first = metrics(run)
    assert steps(first) == [2, 4, 6, 8, 10, 12]

    # resume=auto with more epochs: the history goes on after step 12, none of it lost
    fit(run, EVERY_2, KEEP_ALL, "trainer.resume=auto", "trainer.max_epochs=3")
    rows = metrics(run)
    assert steps(rows) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert rows[:6] == first  # the epoch-end row of step 12 included
    assert [r["epoch"] for r in rows if "epoch" in r] == ["0.0", "1.0", "2.0"]

    # resuming an older checkpoint replaces what came after it, once
    older = run / "checkpoints" / "epoch=0-step=6.ckpt"
    fit(run, EVERY_2, KEEP_ALL, f"trainer.resume={older}", "trainer.max_epochs=2")
    rows = metrics(run)
    assert steps(rows) == [2, 4, 6, 8, 10, 12]
    assert rows[:3] == first[:3]
    assert [r["epoch"] for r in rows if "epoch" in r] == ["0.0", "1.0"]

    # a fresh fit in the same directory (its checkpoints deleted) starts a new history
    shutil.rmtree(run / "checkpoints")
    fit(run, EVERY_2, "trainer.max_epochs=1")
    assert steps(metrics(run)) == [2, 4, 6]


def test_resumed_fit_purges_later_tensorboard_events(tmp_path):
    """TensorBoard hides the events an interrupted run wrote after the resume step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tb = ("trainer.logger=tensorboard", EVERY_2, KEEP_ALL)
    fit(run, *tb)
    older = run / "checkpoints" / "epoch=0-step=6.ckpt"
    fit(run, *tb, f"trainer.resume={older}", "trainer.max_epochs=2")

    newest = max((run / "tensorboard").glob("events.out.tfevents.*"), key=os.path.getmtime)
    purge_marks = [
        e.step
        for e in EventAccumulator(str(newest))._generator.Load()
        if e.HasField("session_log") and e.session_log.status == e.session_log.START
    ]
    assert purge_marks == [7]  # events at steps >= 7 from before are hidden
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [e.step for e in events.Scalars("epoch")]
    assert logged == [6, 12]


# -- 2. evaluations leave the fit's config alone; the config repeats the run ----------------
def test_validate_and_test_keep_config_yaml_and_the_history(tmp_path):
    """Needs ``write_run_files(self, stage)`` in ``Trainer._run_evaluation``."""
    run = tmp_path / "run"
    fit(run, EVERY_2, "trainer.resume=auto")  # resume=auto on a fresh dir: trains from scratch
    config = (run / "config.yaml").read_text()
    assert yaml.safe_load(config)["trainer"]["resume"] is None  # a repeat trains again
    history = metrics(run)

    for stage in ("validate", "test"):
        proc = disttrain_cli(
            stage, "--config", str(SMOKE), f"run_dir={run}", "trainer.resume=auto", EVERY_2
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert (run / "config.yaml").read_text() == config
        evaluated = yaml.safe_load((run / f"{stage}.config.yaml").read_text())
        assert evaluated["trainer"]["resume"] == "auto"
    rows = metrics(run)
    assert rows[: len(history)] == history  # evaluations add rows, they take none away
    assert len(rows) == len(history) + 2

    again = tmp_path / "again"  # the config repeats the run: both epochs trained again
    repeat = disttrain_cli("fit", "--config", str(run / "config.yaml"), f"run_dir={again}")
    assert repeat.returncode == 0, repeat.stderr[-4000:]
    assert "resumed from" not in repeat.stderr
    assert metrics(again) == history


# -- 3. run_dir is the one key naming the run directory -------------------------------------
def test_copied_config_with_only_run_dir_changed_runs_there(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    fit(first)
    text = (first / "config.yaml").read_text()
    assert "default_root_dir" not in text
    copy = tmp_path / "copy.yaml"
    copy.write_text(text.replace(f"run_dir: {first}\n", f"run_dir: {second}\n"))
    assert copy.read_text() != text
    fit(second, config=copy)
    assert (second / "metrics.csv").exists()
    assert sorted(p.name for p in (second / "checkpoints").glob("*.ckpt"))


def test_old_configs_naming_only_default_root_dir_still_work(tmp_path):
    root = tmp_path / "r"
    text = (
        SMOKE.read_text()
        .replace("run_dir: runs/smoke\n", "")
        .replace("  accelerator: cpu\n", f"  accelerator: cpu\n  default_root_dir: {root}\n")
    )
    old = tmp_path / "old.yaml"
    old.write_text(text)
    proc = disttrain_cli("print-config", "--config", str(old))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["run_dir"] == str(root)

    both = tmp_path / "both.yaml"  # both keys, disagreeing: which one was meant is unknowable
    both.write_text(text + f"run_dir: {tmp_path / 'other'}\n")
    proc = disttrain_cli("print-config", "--config", str(both))
    assert proc.returncode == 2
    line = text.splitlines().index(f"  default_root_dir: {root}") + 1
    assert f"{both}:{line}: trainer.default_root_dir: disagrees with run_dir" in proc.stderr
    assert "delete trainer.default_root_dir" in proc.stderr


# -- 4. an override's error names the override ----------------------------------------------
def test_a_typo_in_an_override_is_reported_as_the_override():
    proc = disttrain_cli("fit", "--config", str(SMOKE), "trainer.max_epoch=3")
    assert proc.returncode == 2
    assert proc.stderr == (
        "disttrain: config error: override 'trainer.max_epoch=3' (command line): "
        "trainer.max_epoch: unknown trainer option (did you mean 'trainer.max_epochs'?)\n"
    )
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--set=sed=1",
            "sed: unknown key; expected one of model, data, trainer, launch, seed, "
            "run_dir (did you mean 'seed'?)",
        ),
        (
            "launch.nproc=2",
            "launch.nproc: unknown key; expected one of nproc_per_node, nnodes, "
            "node_rank, rdzv_endpoint, max_restarts (did you mean 'launch.nproc_per_node'?)",
        ),
        (
            "model.init_argz.lr=1",
            "model.init_argz: unknown key; expected one of class_path, "
            "init_args (did you mean 'model.init_args'?)",
        ),
        (
            "model.init_args.n_sample=3",
            "model.init_args.n_sample: Regression takes no argument "
            "'n_sample' (it takes: n_samples, n_features, batch_size, lr) (did you mean "
            "'model.init_args.n_samples'?)",
        ),
        ("trainer.max_epochs=one", "trainer.max_epochs: expected int or null, got str 'one'"),
        ("model.init_args.lr=fast", "model.init_args.lr: expected float, got str 'fast'"),
        ("trainer.max_epochs=[1", "trainer.max_epochs: the value is not valid YAML: "),
        ("seed.x=1", "seed: is not a section; cannot set a key in it"),
        ("model={class_path: nowhere.Model}", "model.class_path: cannot import 'nowhere.Model'"),
    ],
)
def test_every_kind_of_override_error_names_the_override(capsys, override, message):
    from disttrain.cli import main as cli

    assert cli.main(["print-config", "--config", str(SMOKE), override]) == 2
    err = capsys.readouterr().err
    item = override.removeprefix("--set=")
    assert err.startswith(f"disttrain: config error: override {item!r} (command line): {message}")
    assert err.count("\n") == 1


def test_errors_in_the_file_keep_file_and_line(tmp_path, capsys):
    from disttrain.cli import main as cli

    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("max_epochs: 2", "max_epoch: 2"))
    line = bad.read_text().splitlines().index("  max_epoch: 2") + 1
    assert cli.main(["print-config", "--config", str(bad), "trainer.accelerator=cpu"]) == 2
    assert capsys.readouterr().err == (
        f"disttrain: config error: {bad}:{line}: trainer.max_epoch: unknown trainer option "
        "(did you mean 'trainer.max_epochs'?)\n"
    )


# -- 5. small things -------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["0", "-1"])
def test_hooks_refuses_a_world_size_below_one(size):
    proc = disttrain_cli("hooks", "--config", str(SMOKE), "--world-size", size)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"disttrain: config error: --world-size: must be at least 1, got {size}\n"


def test_version():
    import torch

    import disttrain

    proc = disttrain_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"disttrain {disttrain.__version__} (torch {torch.__version__})\n"
    assert re.fullmatch(r"disttrain \d+\.\d+\.\d+ \(torch \S+\)\n", proc.stdout)


def test_run_files_honour_the_umask(tmp_path):
    run = tmp_path / "run"
    previous = os.umask(0o027)  # inherited by the command's process
    try:
        fit(run, "trainer.max_epochs=1")
    finally:
        os.umask(previous)
    files = [run / "config.yaml", run / "metrics.csv", run / "hparams.yaml"]
    files += sorted((run / "checkpoints").glob("*.ckpt"))
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert modes == {p.name: oct(0o640) for p in files}
    assert not list(run.rglob(".*.tmp"))


def test_validate_reports_the_step_of_the_checkpoint_it_evaluates(tmp_path):
    """Needs ``restore_weights`` to set the trainer's epoch and step (see the report)."""
    run = tmp_path / "run"
    fit(run)  # two epochs of six steps: the last checkpoint is epoch=1-step=12
    proc = disttrain_cli(
        "validate", "--config", str(SMOKE), f"run_dir={run}", "trainer.resume=auto"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = metrics(run)[-1]
    assert last["step"] == "12" and "val_loss" in last
