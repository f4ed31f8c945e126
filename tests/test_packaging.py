"""What can be checked of docker/ and launch/ without a Docker engine or a cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from disttrain.cli import main as cli


def _stage_args(command: list[str]):
    # the disttrain command's own parser is the unit: the image's CMD must parse as a stage
    # of `disttrain launch`, and running it instead would launch the job
    args, extra = cli._parser().parse_known_args(command)
    return args, extra


def test_dockerfile_entrypoint_is_the_installed_command():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    (entry,) = re.findall(r"^ENTRYPOINT (.*)$", text, re.M)
    assert json.loads(entry) == ["disttrain"]
    assert shutil.which("disttrain") is not None  # the console script exists once installed
    (cmd,) = re.findall(r"^CMD (.*)$", text, re.M)
    args, extra = _stage_args(json.loads(cmd))
    assert args.command == "launch" and args.stage == "fit" and not extra
    assert (ROOT / args.config.replace("/opt/disttrain/", "")).exists()


def test_compose_runs_two_nodes_with_one_rendezvous():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node0", "node1"}
    endpoints = set()
    for service in services.values():
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        args, _ = _stage_args(service["command"])
        assert args.command == "launch" and args.nnodes == 2 and args.stage == "fit"
        assert (ROOT / args.config.replace("/opt/disttrain/", "")).exists()
        endpoints.add((args.rdzv_endpoint, args.rdzv_id))
    assert endpoints == {("node0:29400", "compose-demo")}


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_launch_scripts_parse(script):
    path = ROOT / "launch" / script
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_slurm_script_uses_srun_torchrun_with_c10d():
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "srun torchrun" in text and "--rdzv-backend c10d" in text
    assert "-m disttrain fit --config" in text


def test_single_node_script_runs_the_smoke_config(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
    }
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "single_node.sh"),
            "configs/smoke.yaml",
            "2",
            f"run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "config.yaml").exists()
