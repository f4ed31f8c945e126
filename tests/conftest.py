"""Test helpers: real torchrun launches with their own rendezvous and a hard timeout."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"
sys.path.insert(0, str(WORKERS))
# what a launched process imports: the shared models (``common``), a job class written beside
# its test (a config's ``class_path: test_faults.TornWrite``), and disttrain itself
LAUNCHED_PATH = os.pathsep.join([str(WORKERS), str(TESTS), str(ROOT)])


def torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    launcher_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run ``script`` under ``python -m torch.distributed.run --standalone``.

    ``--standalone`` rendezvouses on a free port of localhost, so launches in parallel test
    workers never clash. The whole process group is killed if it outlives ``timeout``.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *launcher_args,
        str(script),
        *args,
    ]
    return _run_group(cmd, env or {}, timeout, "torchrun")


def _run_group(
    cmd: list[str],
    env: dict[str, str],
    timeout: float,
    what: str,
    meanwhile: Callable[[subprocess.Popen], object] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own (stdout and stderr together), calling
    ``meanwhile(proc)`` once it started; every process below it, loader workers included,
    is killed if it outlives ``timeout``."""
    full_env = {
        **os.environ,
        "PYTHONPATH": LAUNCHED_PATH,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        if meanwhile is not None:
            meanwhile(proc)
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as failed:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # ranks: sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        if not isinstance(failed, subprocess.TimeoutExpired):
            raise
        pytest.fail(f"{what} did not finish within {timeout}s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts each rank in a session of
    its own, out of reach of a kill of the launcher's process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def worker_env(**extra: str) -> dict[str, str]:
    """The environment a launched job needs to import the test modules."""
    return {
        **os.environ,
        "PYTHONPATH": LAUNCHED_PATH,
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def disttrain_cli(*args: str, timeout: float = 180, env: dict | None = None, cwd=None):
    """Run the ``disttrain`` command (``python -m disttrain ...``) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "disttrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or worker_env(),
        cwd=cwd,
    )


def launch_two(config, *overrides: str, timeout: float = 180, env: dict | None = None):
    """``disttrain launch --nproc-per-node 2 fit --config CONFIG [overrides]``."""
    return disttrain_cli(
        "launch",
        "--nproc-per-node",
        "2",
        "fit",
        "--config",
        str(config),
        *overrides,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own directory, so default run directories never collide."""
    monkeypatch.chdir(tmp_path)


# -- a resumable job run through `disttrain launch` (faults, stopping) --------------------
SMOKE = str(ROOT / "configs" / "smoke.yaml")

LONG = ["trainer.max_epochs=100000", "trainer.log_every_n_steps=1000"]


ENV = worker_env()


def job_config(tmp_path: Path, cls: str = "common.FaultyJob", **init_args) -> Path:
    report = tmp_path / "report"
    report.mkdir(exist_ok=True)
    config = {
        "model": {"class_path": cls, "init_args": {"report_dir": str(report), **init_args}},
        "trainer": {
            "max_epochs": 3,
            "num_sanity_val_steps": 1,
            "callbacks": [
                {
                    "class_path": "disttrain.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_steps": 2, "keep_last_k": 2},
                }
            ],
        },
        "launch": {"nproc_per_node": 2},
        "seed": 5,
        "run_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(
    config: Path, *extra: str, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    return disttrain_cli("launch", *extra, "fit", "--config", str(config), timeout=timeout, env=env)


def final_weights(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "report" / "final.pt", weights_only=True)


@pytest.fixture(scope="session")  # once per session, for every test worker (shared_run)
def uninterrupted(tmp_path_factory) -> dict:
    def run(tmp_path: Path) -> None:
        proc = launch(job_config(tmp_path))
        assert proc.returncode == 0, proc.stderr[-4000:]

    return final_weights(shared_run(tmp_path_factory, "uninterrupted", run))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# -- one run that several tests read -----------------------------------------------------
def shared_run(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """``make(DIR)`` once per test session, however many test workers (``pytest -n``) ask for
    ``name``: the first runs it while the others wait on a lock, then every one reads DIR.
    (A module fixture would run it again on each worker that runs one of its tests, as
    ``--dist load`` spreads them; ``--dist loadgroup`` does not group under pytest 9.2 with
    xdist 3.8, which still writes the group into ``item._nodeid``.) A ``make`` that failed is
    run again by the next worker that asks."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # popen-gwN: the session's directory is above
        base = base.parent
    outdir = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on failure
        done = outdir / ".done"
        if not done.exists():
            shutil.rmtree(outdir, ignore_errors=True)
            outdir.mkdir()
            make(outdir)
            done.touch()
    return outdir


def shared_launch(tmp_path_factory, key: str, test_file: str | Path, scenario: str, **options):
    """``run_beside(test_file, scenario, DIR, **options)`` once per test session
    (``shared_run`` under ``key``): the launch several tests of a file read. Returns DIR."""

    def launch(outdir: Path) -> None:
        run_beside(test_file, scenario, outdir, **options)

    return shared_run(tmp_path_factory, key, launch)


# -- a scenario written beside its test ---------------------------------------------------
def run_beside(
    test_file: str | Path,
    name: str,
    outdir: Path,
    nproc: int = 2,
    timeout: float = 120,
    expect_ok: bool = True,
    launcher_args: tuple[str, ...] = (),
    **env: object,
) -> subprocess.CompletedProcess:
    """Run the scenario function ``name`` of ``test_file`` on ``nproc`` torchrun ranks.

    The test file ends with ``if __name__ == "__main__": run_scenario(globals())``, so a
    test's ranks run code written next to its assertions. ``outdir`` is created and passed to
    the scenario; ``env`` entries are set in the workers' environment.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    proc = torchrun(
        test_file,
        name,
        str(outdir),
        nproc=nproc,
        timeout=timeout,
        env={k: str(v) for k, v in env.items()},
        launcher_args=launcher_args,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-8000:]
    return proc


def run_alone(
    test_file: str | Path,
    name: str,
    outdir: Path,
    timeout: float = 120,
    expect_ok: bool = True,
    meanwhile: Callable[[subprocess.Popen], object] | None = None,
    **env: object,
) -> subprocess.CompletedProcess:
    """Run the scenario function ``name`` of ``test_file`` as a plain ``python FILE NAME
    OUTDIR`` (disttrain's debug mode: one process, no launcher), with ``run_beside``'s hard
    timeout on the whole process group; ``meanwhile(proc)`` is called once it started (its
    process group's id is ``proc.pid``)."""
    outdir.mkdir(parents=True, exist_ok=True)
    launch_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    if any(var in os.environ for var in launch_vars):
        pytest.fail(f"the debug mode needs an environment without {launch_vars}")
    cmd = [sys.executable, str(test_file), name, str(outdir)]
    env_vars = {k: str(v) for k, v in env.items()}
    proc = _run_group(cmd, env_vars, timeout, "the debug run", meanwhile)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-8000:]
    return proc


@pytest.fixture
def disttrain_log(caplog):
    """``caplog`` that also hears the ``disttrain`` logger (which does not propagate)."""
    import logging

    logger = logging.getLogger("disttrain")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


# -- an S3 server on this machine: moto's standalone server, a real socket -----------------
BUCKET = "disttrain-tests"


@dataclasses.dataclass(frozen=True)
class S3:
    """A prefix of its own for one test in the session's bucket (``url``: ``s3://...``), and
    the variables every process needs to reach the server (``env``: set in this process
    for the test; subprocesses started from it inherit them)."""

    url: str
    env: dict[str, str]


def _s3_env(endpoint: str) -> dict[str, str]:
    """boto3, and s3fs through aiobotocore, read the endpoint from ``AWS_ENDPOINT_URL``
    (botocore >= 1.31); credentials and region from the usual variables; nothing from the
    developer's ~/.aws or an instance metadata service."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _wait_for_moto(proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    """The endpoint, once the server answers; its port is the free one it bound (``-p 0``),
    read from its log, so no other process can take it in between."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto's S3 server exited ({proc.returncode}):\n{log.read_text()}")
        found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{found[1]}/moto-api/", timeout=2).close()
                return found[1]
        time.sleep(0.05)
    pytest.fail(f"moto's S3 server did not answer within {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="session")  # one server per test worker (about 1 s to start)
def s3_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server as a subprocess on a free port of 127.0.0.1, with one bucket;
    yields the environment that reaches it. Stopped after the session."""
    import boto3

    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        env = _s3_env(_wait_for_moto(proc, log))
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> S3:
    """The session's S3 server, reachable from this test and the processes it starts."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)
    return S3(f"s3://{BUCKET}/{prefix}-{secrets.token_hex(3)}", dict(s3_server))
