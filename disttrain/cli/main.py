"""The ``disttrain`` command: run a config in this process, launch it on ranks, or inspect it.

    disttrain fit --config configs/default.yaml trainer.max_epochs=3
    torchrun --nproc-per-node 2 -m disttrain fit --config configs/default.yaml
    disttrain launch --nproc-per-node 2 fit --config configs/default.yaml
    disttrain print-config --config configs/default.yaml --set trainer.max_epochs=3
    disttrain predict --config configs/smoke.yaml trainer.resume=auto   # RUN_DIR/predictions

Configuration errors exit with code 2 before anything is written or spawned.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from disttrain.callbacks.prediction_writer import PredictionWriter
from disttrain.checkpoint.format import SUFFIX, CheckpointError, check_path
from disttrain.config import runfile as runconfig
from disttrain.config.layout import resolve_layout
from disttrain.config.options import ConfigError
from disttrain.dist.env import DistEnv
from disttrain.dist.exits import EXIT_INTERRUPTED
from disttrain.dist.flight import diagnose
from disttrain.dist.launcher import launch_workers, peer_loss, record_failure
from disttrain.loop.signals import Preempted
from disttrain.loop.trainer import Trainer
from disttrain.observe.console import configure_logging
from disttrain.observe.plot import PlotError, plot_runs
from disttrain.ranks.schedule import describe_schedule
from disttrain.rng import seed_for_run
from disttrain.version import __version__

STAGES = ("fit", "validate", "test", "predict")
EXIT_CONFIG_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow the options (``--config F a.b=1``), which plain argparse cannot mix
    # with a trailing positional list; what it leaves over must be KEY=VALUE items.
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if hasattr(args, "overrides"):
        args.overrides += extra
    try:
        if args.command in STAGES:
            return _run_stage(args.command, args.config, _overrides(args), raw_argv)
        if args.command == "launch":
            return _launch(args, raw_argv)
        if args.command == "hooks":
            if args.world_size is not None and args.world_size < 1:
                raise ConfigError("--world-size", f"must be at least 1, got {args.world_size}")
            run = runconfig.load(args.config, _overrides(args))
            print(describe_schedule(run, args.world_size), end="")
            return 0
        if args.command == "plot":
            try:
                print(plot_runs(args.run_dirs, args.output))
            except PlotError as err:
                print(f"disttrain plot: {err}", file=sys.stderr)
                return 1
            return 0
        if args.command == "print-config":
            print(runconfig.dump(runconfig.load(args.config, _overrides(args)).resolved), end="")
            return 0
    except ConfigError as err:
        print(f"disttrain: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    parser.print_help()
    return EXIT_CONFIG_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disttrain", description="Distributed-first training driven by YAML configs."
    )
    parser.add_argument(
        "--version", action=_Version, help="print the disttrain and torch versions and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage in STAGES:
        _add_config_args(sub.add_parser(stage, help=f"run {stage} in this process (or rank)"))
    printer = sub.add_parser("print-config", help="print the resolved config and exit")
    _add_config_args(printer)
    hooks = sub.add_parser("hooks", help="print the hook schedule of every stage, per rank")
    _add_config_args(hooks)
    hooks.add_argument("--world-size", type=int, help="ranks (default: from launch:)")
    plot = sub.add_parser("plot", help="draw loss and metric curves from runs' metrics.csv")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one or more run dirs")
    plot.add_argument("-o", "--output", default=None, help="PNG file (default RUN_DIR/curves.png)")
    launch = sub.add_parser(
        "launch",
        help="validate the config, then start the workers with torch.distributed.run",
        description="Options default to the config's launch: section.",
    )
    launch.add_argument("--nproc-per-node", type=int, help="workers on this node")
    launch.add_argument("--nnodes", type=int, help="number of nodes")
    launch.add_argument("--node-rank", type=int, help="this node's rank (static rendezvous)")
    launch.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous (multi-node)")
    launch.add_argument("--rdzv-id", help="job id shared by all nodes (default: from the config)")
    launch.add_argument("--max-restarts", type=int, help="elastic restarts of the worker group")
    launch.add_argument("stage", choices=STAGES, help="what every worker runs")
    _add_config_args(launch)
    return parser


class _Version(argparse.Action):
    """``--version``: ``disttrain X.Y.Z (torch A.B.C)``."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"disttrain {__version__} (torch {torch.__version__})")
        parser.exit()


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. trainer.max_epochs=3 (repeatable)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="more overrides, same as --set"
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.sets, *args.overrides]


def _run_stage(stage: str, config: str, overrides: list[str], argv: list[str]) -> int:
    run = runconfig.load(config, overrides)  # every rank validates before touching anything
    _check_resume(run, stage, overrides)
    if "RANK" in os.environ:  # a worker: the launcher set the command that resumes
        return _worker(stage, run)
    _check_run_dir(run, overrides)
    with _resume_command_set(_resume_command(["disttrain", *argv], run)):  # the debug mode
        return _worker(stage, run)


def _worker(stage: str, run: Any) -> int:
    """One rank's run. A failure under a launcher is reported in one line and its traceback
    kept in ``RUN_DIR/logs/``; in the debug mode the traceback is printed, for debugging."""
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(rank)
    log = logging.getLogger("disttrain.cli")
    try:
        seed_for_run(run.seed)  # before the model is built: the same initial weights
        trainer = Trainer(_options(run, stage), resolved_config=run.resolved)
        module = run.model.build()
        datamodule = run.data.build() if run.data else None
        if stage == "predict":  # nothing to return to: the writer has them
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
        else:
            getattr(trainer, stage)(module, datamodule=datamodule)
    except Preempted as stop:  # the trainer said where the checkpoint went
        return stop.exit_code
    except KeyboardInterrupt:  # before the trainer watched for it: nothing was trained
        log.warning("interrupted outside the training loop: stopped without a checkpoint")
        return EXIT_INTERRUPTED
    except Exception as error:
        if "RANK" not in os.environ:
            raise
        record_failure(error)  # the error file the launcher reads
        path = Path(run.run_dir) / "logs" / f"rank{rank}-error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
        first = (str(error).strip().splitlines() or [""])[0]
        lost = peer_loss(str(error))
        if lost is not None:  # the cause is elsewhere: the launcher names that rank
            where = getattr(error, "hook", None)
            log.error(
                "stopped%s: another rank went away while this one waited for it (%s; "
                "traceback: %s)",
                f" in '{where.value}'" if where is not None else "",
                lost,
                path,
            )
        else:
            log.error("failed: %s: %s (traceback: %s)", type(error).__name__, first, path)
        return 1
    return 0


def _options(run: Any, stage: str) -> Any:
    """The trainer's options with the callbacks built; ``predict`` writes its predictions with
    a ``PredictionWriter`` to ``RUN_DIR/predictions`` unless the config names one."""
    options = runconfig.build_callbacks(run)
    if stage != "predict" or any(isinstance(c, PredictionWriter) for c in options.callbacks):
        return options
    writer = PredictionWriter(Path(run.run_dir) / "predictions")
    logging.getLogger("disttrain.cli").info("predictions go to %s", writer.output_dir)
    return dataclasses.replace(options, callbacks=[*options.callbacks, writer])


def _check_resume(run: Any, stage: str, overrides: list[str]) -> None:
    """Resume problems that show without reading a checkpoint fail here, before any worker
    starts: a path that is no checkpoint, or a fresh fit among an earlier run's checkpoints
    (not after an elastic restart: the restarted group goes on from the checkpoints)."""
    resume = run.trainer.resume
    typed = [item for item in overrides if item.startswith("trainer.resume=")]
    where = runconfig.override_source(typed[-1]) if typed else run.source
    if resume not in (None, "auto"):
        try:
            check_path(resume)
        except CheckpointError as err:
            raise ConfigError("trainer.resume", str(err), where) from None
    directory = Path(run.run_dir) / "checkpoints"
    fresh_fit = resume is None and stage == "fit" and DistEnv.from_environ().restart_count == 0
    if fresh_fit and any(directory.glob(f"*{SUFFIX}")):
        raise ConfigError(
            "trainer.resume",
            f"null (start fresh), but {directory} holds an earlier run's checkpoints; resume "
            "it with trainer.resume=auto, give this run another run_dir, or delete "
            f"{directory} to start over there",
            where,
        )


def _check_run_dir(run: Any, overrides: list[str]) -> None:
    """Refuse a run directory that cannot be written, before any worker starts: by creating it
    and a file in it, as the run would (permissions alone would not tell, e.g. for root), and
    removing what the probe made."""
    if "://" in run.run_dir:  # a URL: its filesystem says when the run writes
        return
    typed = [item for item in overrides if item.startswith("run_dir=")]
    where = runconfig.override_source(typed[-1]) if typed else run.source
    path = Path(run.run_dir)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        why = "is a file" if blocker == path else f"cannot be created: {blocker} is a file"
        raise ConfigError("run_dir", f"{path} {why}, not a directory", where)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".disttrain-write-probe-"):
            pass
        for created in missing:  # the run makes them when it writes (a fast_dev_run never)
            created.rmdir()
    except OSError as err:
        raise ConfigError(
            "run_dir", f"{path} cannot be written: {err.strerror or err}", where
        ) from None


def _resume_command(command: list[str], run: Any) -> str:
    """The command line that resumes this run: the same one, with resume=auto if needed."""
    if run.trainer.resume != "auto":  # a trailing override wins over any earlier one
        command = [*command, "trainer.resume=auto"]
    return shlex.join(command)


@contextlib.contextmanager
def _resume_command_set(command: str) -> Iterator[None]:
    """Tell the stop message (and the workers, which inherit it) how this run resumes, for
    this call only: a second ``main()`` in the same process must not print the first's."""
    previous = os.environ.get("DISTTRAIN_RESUME_COMMAND")
    os.environ["DISTTRAIN_RESUME_COMMAND"] = command
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DISTTRAIN_RESUME_COMMAND"]
        else:
            os.environ["DISTTRAIN_RESUME_COMMAND"] = previous


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = _overrides(args)
    run = runconfig.load(args.config, overrides)
    _check_resume(run, args.stage, overrides)
    _check_run_dir(run, overrides)
    launch = run.launch

    def pick(flag, value):
        return value if flag is None else flag

    nproc = pick(args.nproc_per_node, launch.nproc_per_node)
    nnodes = pick(args.nnodes, launch.nnodes)
    endpoint = pick(args.rdzv_endpoint, launch.rdzv_endpoint)
    for name, value in (("--nproc-per-node", nproc), ("--nnodes", nnodes)):
        if value < 1:
            raise ConfigError(name, f"must be at least 1, got {value}")
    if nnodes > 1 and not endpoint:
        raise ConfigError("--rdzv-endpoint", "needed with more than one node", run.source)
    # trainer.mesh against the job's size, before any worker starts (each would refuse it)
    job = DistEnv(world_size=nproc * nnodes, local_world_size=nproc, launched=True)
    resolve_layout(run.trainer, job)
    torchrun_argv = [
        f"--nproc-per-node={nproc}",
        f"--max-restarts={pick(args.max_restarts, launch.max_restarts)}",
    ]
    if endpoint:
        rdzv_id = args.rdzv_id or f"disttrain-{Path(args.config).stem}"
        torchrun_argv += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
        if args.node_rank is not None or launch.node_rank:
            torchrun_argv.append(f"--node-rank={pick(args.node_rank, launch.node_rank)}")
    else:
        torchrun_argv.append("--standalone")
    torchrun_argv += ["-m", "disttrain", args.stage, "--config", args.config]
    torchrun_argv += [f"--set={item}" for item in overrides]
    flight_dir = Path(run.run_dir) / "flight"
    for stale in flight_dir.glob("rank*.json"):  # traces of an earlier run would mislead
        stale.unlink()

    def explain() -> None:
        report = diagnose(run.run_dir)
        if report and (" in hook " in report or " in collective " in report):  # a hang's trace
            print(report, file=sys.stderr, flush=True)

    with _resume_command_set(_resume_command(["disttrain", *argv], run)):
        return launch_workers(torchrun_argv, after_failure=explain)
