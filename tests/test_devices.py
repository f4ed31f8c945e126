"""``Trainer(devices=N, num_nodes=M)``: a plain ``python script.py`` with ``devices=2`` trains on
2 ranks started by the elastic agent (and exits with their status, a rank's failure named);
under torchrun both options are checked against what the launcher started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from common import Regressor
from conftest import run_beside

from disttrain import ConfigError, Trainer

HERE = Path(__file__).resolve().parent


def _plain_python(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """This file as a user's script: ``python test_devices.py ARGS`` (no torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "workers"), str(HERE), str(HERE.parent)])
    return subprocess.run(
        [sys.executable, __file__, *args, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        start_new_session=True,
    )


class FailsOnRankOne(Regressor):
    def on_train_start(self):
        if self.global_rank == 1:
            raise RuntimeError("no data on rank 1")


def script(kind: str, outdir: str) -> None:
    """What the user's script does: build a trainer with devices=2 and fit."""
    trainer = Trainer(devices=2, max_epochs=1, logger=None, default_root_dir=f"{outdir}/run")
    module = FailsOnRankOne() if kind == "fails" else Regressor()
    trainer.fit(module)
    report = {"world_size": trainer.world_size, "seen": module.seen}
    Path(outdir, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def test_devices_in_a_plain_script_trains_on_that_many_ranks(tmp_path):
    proc = _plain_python(tmp_path, "fits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert sorted(reports[0]["seen"] + reports[1]["seen"]) == list(range(16))  # each sample once


def test_a_failing_rank_of_a_spawned_job_is_named_and_fails_the_script(tmp_path):
    proc = _plain_python(tmp_path, "fails")
    assert proc.returncode != 0
    summary = proc.stderr[proc.stderr.index("disttrain: rank 1 failed") :]
    assert "no data on rank 1" in summary  # the launcher's summary names the error


def checked_against_torchrun(outdir: str) -> None:
    results = {}
    for options in ({"devices": 3}, {"num_nodes": 2}, {"devices": 2, "num_nodes": 1}):
        try:
            Trainer(logger=None, **options)
            results[str(options)] = "ok"
        except ConfigError as err:
            results[str(options)] = str(err)
    if os.environ["RANK"] == "0":
        Path(outdir, "checked.json").write_text(json.dumps(results))


def test_devices_and_num_nodes_are_checked_against_torchrun(tmp_path):
    run_beside(__file__, "checked_against_torchrun", tmp_path, timeout=120)
    results = json.loads((tmp_path / "checked.json").read_text())
    assert results["{'devices': 3}"].startswith("devices: is 3, but the launcher started 2")
    assert results["{'num_nodes': 2}"].startswith("num_nodes: is 2, but the launcher's job has 1")
    assert results["{'devices': 2, 'num_nodes': 1}"] == "ok"


def test_num_nodes_without_a_launcher_and_devices_from_python_c_are_refused():
    with pytest.raises(ConfigError, match="num_nodes: is 2: a job on several nodes"):
        Trainer(num_nodes=2)
    code = "import disttrain; disttrain.Trainer(devices=2)"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode != 0 and "needs a script file" in proc.stderr
    with pytest.raises(ConfigError, match="devices: must be 'auto' or at least 1"):
        Trainer(devices=0)


if __name__ == "__main__":
    if "RANK" in os.environ and sys.argv[1] == "checked_against_torchrun":
        checked_against_torchrun(sys.argv[2])
    else:
        script(sys.argv[1], sys.argv[2])
