"""``Trainer(devices=N, num_nodes=M)``: checked against torchrun's environment, or, in a plain
``python script.py``, the script started again on N ranks by the elastic agent."""

from __future__ import annotations

import os
import sys
from typing import Any

from disttrain.config.options import ConfigError
from disttrain.dist.env import DistEnv
from disttrain.dist.launcher import launch_workers, record_failure


def check_or_spawn(devices: int | str, num_nodes: int, env: DistEnv) -> None:
    """Under a launcher, ``devices`` and ``num_nodes`` must say what it started. In a plain
    process, ``devices=N > 1`` runs this script on N ranks (as ``torchrun --standalone
    --nproc-per-node N`` would, with disttrain's failure handling) and this process exits
    with their status: it trains nothing itself."""
    if env.launched:
        if os.environ.get(_SPAWNED) == "1" and sys.excepthook is sys.__excepthook__:
            sys.excepthook = _recording_excepthook  # the script's error, for the summary
        nodes = env.world_size // env.local_world_size
        if devices != "auto" and devices != env.local_world_size:
            raise ConfigError(
                "devices",
                f"is {devices}, but the launcher started {env.local_world_size} process(es) "
                "on this node (--nproc-per-node); make them agree, or leave devices='auto'",
            )
        if num_nodes != 1 and num_nodes != nodes:
            raise ConfigError(
                "num_nodes",
                f"is {num_nodes}, but the launcher's job has {nodes} node(s) "
                f"(WORLD_SIZE {env.world_size} / LOCAL_WORLD_SIZE {env.local_world_size})",
            )
        return
    if num_nodes > 1:
        raise ConfigError(
            "num_nodes",
            f"is {num_nodes}: a job on several nodes is started on each of them by a launcher "
            f"(torchrun --nnodes {num_nodes} --nproc-per-node N ... on every node)",
        )
    if devices == "auto" or devices == 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_SPAWNED] = "1"
    code = launch_workers(["--standalone", f"--nproc-per-node={devices}", *_this_program()])
    raise SystemExit(code)


_SPAWNED = "DISTTRAIN_SPAWNED_BY_DEVICES"


def _recording_excepthook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """A spawned rank's uncaught exception: into the error file the launcher's summary reads
    (as ``disttrain launch`` does), then printed as usual."""
    record_failure(error)
    sys.__excepthook__(kind, error, tb)


def _this_program() -> list[str]:
    """The command line that started this process, as torchrun takes it."""
    argv: list[Any] = list(getattr(sys, "orig_argv", []))
    if "-m" in argv[1:]:  # python -m package.module args...
        at = argv.index("-m", 1)
        return ["--module", argv[at + 1], *argv[at + 2 :]]
    script = sys.argv[0] if sys.argv else ""
    if not script or script == "-c" or not os.path.isfile(script):
        raise ConfigError(
            "devices",
            "starting several ranks runs your script again on each one, so it needs a script "
            "file (python script.py); from here, launch with torchrun --nproc-per-node N",
        )
    return [script, *sys.argv[1:]]
