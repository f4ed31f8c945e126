"""The disttrain command: strict configs (exit 2, key named, nothing written), overrides, help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import SMOKE, disttrain_cli

from disttrain.cli import main as cli
from disttrain.config import runfile as runconfig

ROOT = Path(__file__).resolve().parent.parent
GOOD = """\
model:
  class_path: disttrain.examples.regression.Regression
  init_args: {n_samples: 64, batch_size: 16}
trainer:
  max_epochs: 1
launch:
  nproc_per_node: 2
seed: 0
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    path.write_text(text + f"run_dir: {run_dir}\n")
    return path


BAD = [
    # (what is wrong, the text replaced in GOOD, the replacement, the key the error must name)
    ("unknown top key", "seed: 0", "seed: 0\nsed: 1", "sed"),
    ("unknown trainer key", "max_epochs: 1", "max_epoch: 1", "trainer.max_epoch"),
    ("wrong type", "max_epochs: 1", "max_epochs: one", "trainer.max_epochs"),
    ("bad precision", "max_epochs: 1", "precision: fp8", "trainer.precision"),
    (
        "missing model",
        "model:\n  class_path: disttrain.examples.regression.Regression\n"
        "  init_args: {n_samples: 64, batch_size: 16}\n",
        "",
        "model",
    ),
    (
        "class does not import",
        "disttrain.examples.regression.Regression",
        "disttrain.examples.nowhere.Regression",
        "model.class_path",
    ),
    (
        "class is no Module",
        "disttrain.examples.regression.Regression",
        "collections.OrderedDict",
        "model.class_path",
    ),
    ("init arg not in signature", "n_samples: 64", "n_sample: 64", "model.init_args.n_sample"),
    ("init arg of wrong type", "n_samples: 64", "n_samples: many", "model.init_args.n_samples"),
    ("unknown launch key", "nproc_per_node: 2", "nprocs: 2", "launch.nprocs"),
    (
        "bad callback",
        "max_epochs: 1",
        "max_epochs: 1\n  callbacks: [{class_path: collections.OrderedDict}]",
        "trainer.callbacks.0.class_path",
    ),
    ("yaml syntax", "max_epochs: 1", "max_epochs: [1", "(yaml)"),
]


@pytest.mark.parametrize("what, old, new, key", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(
    tmp_path, capsys, what, old, new, key
):
    path = write_config(tmp_path, GOOD.replace(old, new))
    assert cli.main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and str(path) in err, err
    assert not (tmp_path / "run").exists()


def test_errors_carry_the_line(tmp_path, capsys):
    path = write_config(tmp_path, GOOD.replace("max_epochs: 1", "max_epochs: one"))
    assert cli.main(["print-config", "--config", str(path)]) == 2
    assert f"{path}:5: trainer.max_epochs: expected int" in capsys.readouterr().err
    path = write_config(tmp_path, GOOD.replace("max_epochs: 1", "max_epochs: [1"))
    assert cli.main(["print-config", "--config", str(path)]) == 2
    assert f"{path}:6: (yaml): YAML syntax error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_epochs=many", "trainer.max_epochs"),
        ("trainer.nope=1", "trainer.nope"),
        ("model.init_args.lr=fast", "model.init_args.lr"),
    ],
)
def test_overrides_go_through_the_same_validation(tmp_path, capsys, override, key):
    path = write_config(tmp_path, GOOD)
    assert cli.main(["fit", "--config", str(path), override]) == 2
    assert f"{key}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_overrides_by_set_and_bare_and_print_config(tmp_path, capsys):
    path = write_config(tmp_path, GOOD)
    argv = [
        "print-config",
        "--config",
        str(path),
        "--set",
        "trainer.max_epochs=3",
        "model.init_args.lr=0.5",
        "trainer.precision=bf16-mixed",
    ]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["trainer"]["precision"] == "bf16-mixed"
    assert printed["model"]["init_args"]["lr"] == 0.5
    assert printed["trainer"]["num_sanity_val_steps"] == 2  # defaults are filled in
    assert "default_root_dir" not in printed["trainer"]  # run_dir is the one key


def test_launch_with_a_bad_config_spawns_nothing(tmp_path):
    path = write_config(tmp_path, GOOD.replace("max_epochs: 1", "max_epochs: 0"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "disttrain", "launch", "fit", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "trainer.max_epochs: must be -1 (no limit) or at least 1" in err
    assert "torch.distributed" not in err and "rank" not in out
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of its process group is left
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command", ["fit", "validate", "test", "predict", "launch", "print-config"]
)
def test_help_lists_every_option(command):
    out = subprocess.run(
        [sys.executable, "-m", "disttrain", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout
    if command == "launch":
        for flag in ("--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--max-restarts"):
            assert flag in out.stdout


def test_console_script_is_installed():
    import importlib.metadata

    (entry,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "disttrain"
    ]
    assert entry.value == "disttrain.cli.main:main"


def test_every_shipped_config_is_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        run = runconfig.load(path)
        assert run.launch.nproc_per_node == 2, path


def test_resolved_config_repeats_the_run(tmp_path):
    path = write_config(tmp_path, GOOD)
    first = runconfig.load(path, ["trainer.max_epochs=2"])
    again_path = tmp_path / "again.yaml"
    again_path.write_text(runconfig.dump(first.resolved))
    assert runconfig.load(again_path).resolved == first.resolved


def test_data_module_needs_the_data_base_class(tmp_path, capsys):
    text = GOOD + textwrap.dedent("""\
        data:
          class_path: disttrain.examples.regression.Regression
        """)
    assert cli.main(["fit", "--config", str(write_config(tmp_path, text))]) == 2
    assert (
        "data.class_path: 'disttrain.examples.regression.Regression' is not a disttrain.DataModule"
        in capsys.readouterr().err
    )


# -- a run directory nobody can write: refused in one line, before any worker starts -------
def _unwritable_run_dir(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A run_dir that cannot be created or written, and what the refusal says about it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    if case == "is a file":
        return blocker, "is a file, not a directory"
    if case == "under a file":
        return blocker / "run", f"{blocker} is a file, not a directory"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:  # as root, permissions stop nothing: the refusal is then not this test's to see
        (locked / "probe").touch()
    except PermissionError:
        return locked / "run", "Permission denied"
    pytest.skip("this user writes into read-only directories (root)")


@pytest.mark.parametrize("case", ["is a file", "under a file", "read-only parent"])
@pytest.mark.parametrize("command", [["launch", "--nproc-per-node", "2", "fit"], ["fit"]])
def test_an_unwritable_run_dir_is_refused_in_one_line_before_anything_runs(tmp_path, case, command):
    run_dir, why = _unwritable_run_dir(tmp_path, case)
    proc = disttrain_cli(*command, "--config", SMOKE, f"run_dir={run_dir}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no worker's traceback
    assert lines[0].startswith("disttrain: config error: "), lines
    assert "run_dir" in lines[0] and str(run_dir) in lines[0] and why in lines[0], lines
    assert "rank" not in proc.stdout + proc.stderr


def test_the_run_dir_probe_leaves_nothing_behind(tmp_path):
    run = runconfig.load(SMOKE, [f"run_dir={tmp_path / 'new' / 'run'}"])
    cli._check_run_dir(run, [])  # writable: the run creates the directory when it writes
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    cli._check_run_dir(runconfig.load(SMOKE, [f"run_dir={existing}"]), [])
    assert list(existing.iterdir()) == []


def test_a_mesh_that_does_not_fit_the_job_is_refused_by_the_launcher_before_any_worker():
    """``trainer.mesh`` against ``--nproc-per-node`` x ``--nnodes``: exit 2, one line naming
    ``mesh`` and the numbers, and no worker started (each would have refused it, exit 1)."""
    proc = disttrain_cli(
        *("launch", "--nproc-per-node", "2", "fit", "--config", SMOKE),
        *("trainer.strategy=hsdp", "trainer.mesh={tp: 3}"),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain: config error: "), lines
    assert "mesh" in lines[0] and "tp=3" in lines[0] and "WORLD_SIZE is 2" in lines[0], lines
    assert "rank" not in proc.stdout
