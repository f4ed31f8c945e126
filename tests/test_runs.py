"""Every shipped config end to end under a real 2-rank launch; the smoke config also alone;
two torchrun agents as two nodes on this machine. (A failing worker of the smoke config:
``test_first_hour.py``.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from common import read_results, write_result
from conftest import ROOT, disttrain_cli, worker_env

from disttrain.examples.regression import Regression

SHORT = {
    "smoke.yaml": [],
    "default.yaml": [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "model.init_args.sample_chars=20",
    ],
    "digits.yaml": ["trainer.max_epochs=3"],
    "stream.yaml": [  # more in test_stream_example.py
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "model.init_args.sample_chars=20",
    ],
}


def test_every_config_has_a_test():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_config_runs_end_to_end_on_two_ranks(tmp_path, name):
    run_dir = tmp_path / "run"
    proc = disttrain_cli(
        "launch",
        "fit",
        "--config",
        str(ROOT / "configs" / name),
        f"run_dir={run_dir}",
        *SHORT[name],
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run_dir"] == str(run_dir)
    assert "default_root_dir" not in resolved["trainer"]  # run_dir is the one key
    assert "[rank 1]" not in proc.stderr  # only rank 0 prints
    if name == "default.yaml":
        assert (run_dir / "data" / "charlm-pydoc-topics.pt").exists()
        assert "val_loss" in proc.stderr and "sample:" in proc.stderr
    if name == "digits.yaml":
        assert "val_acc" in proc.stderr


def test_smoke_config_in_the_debug_mode_and_repeated_from_its_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    proc = disttrain_cli(
        "fit", "--config", str(ROOT / "configs" / "smoke.yaml"), f"run_dir={run_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = run_dir / "config.yaml"
    again = disttrain_cli("print-config", "--config", str(saved))
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == yaml.safe_load(
        saved.read_text()
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankReport(Regression):
    """Writes where each rank stands and who ran prepare_data, into ``report_dir``."""

    def __init__(self, report_dir: str, **kw) -> None:
        super().__init__(**kw)
        self.report_dir = report_dir

    def prepare_data(self) -> None:
        env = self.trainer.env
        Path(self.report_dir, f"prepared-rank{env.rank}-node{env.node_rank}").touch()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        env = self.trainer.env
        report = {
            "rank": env.rank,
            "local_rank": env.local_rank,
            "node_rank": env.node_rank,
            "world_size": env.world_size,
            "local_world_size": env.local_world_size,
        }
        write_result(self.report_dir, env.rank, report)


@pytest.mark.parametrize("per_node", [False, True])
def test_two_nodes_on_one_machine(tmp_path, per_node):
    report = tmp_path / "report"
    report.mkdir()
    config = tmp_path / "nodes.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "test_runs.RankReport",
                    "init_args": {"report_dir": str(report), "n_samples": 64},
                },
                "trainer": {"max_epochs": 1, "prepare_data_per_node": per_node},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    endpoint = f"127.0.0.1:{_free_port()}"
    args = [
        "launch",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        f"nodes-{per_node}",
        "fit",
        "--config",
        str(config),
    ]
    env = worker_env()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "disttrain", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)[-6000:]
    ranks = read_results(report, 2)
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["local_rank"] == 0 and r["world_size"] == 2 for r in ranks)
    assert all(r["local_world_size"] == 1 for r in ranks)
    prepared = sorted(p.name for p in report.glob("prepared-*"))
    if per_node:
        assert prepared == sorted(f"prepared-rank{r['rank']}-node{r['node_rank']}" for r in ranks)
    else:
        assert prepared == [f"prepared-rank0-node{ranks[0]['node_rank']}"]
