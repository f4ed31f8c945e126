"""The trainer's options as one typed dataclass, validated the same way from Python and YAML."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from disttrain.loggers.build import LOGGERS
from disttrain.loggers.core import Logger


class ConfigError(ValueError):
    """A bad option: the message names the key (and the file, when there is one)."""

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key, self.problem, self.source = key, problem, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


Precision = Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"]
# Lightning's short forms (YAML reads a bare 32 as an int): each becomes its full name
PRECISION_ALIASES: dict[Any, str] = {
    32: "32-true",
    "32": "32-true",
    16: "16-mixed",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    64: "64-true",
    "64": "64-true",
}
Accelerator = Literal["auto", "cpu", "cuda"]


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Every option of :class:`disttrain.Trainer`; a YAML ``trainer:`` section maps onto it."""

    # None: 1000, or no limit when max_steps is set (training by steps); -1: no limit
    max_epochs: int | None = None
    max_steps: int | None = None  # optimizer steps; None or -1: no limit
    # "DD:HH:MM:SS" (quote it in YAML), {days, hours, minutes, seconds} or seconds: an agreed
    # stop after the step where any rank's training time runs out, then a checkpoint
    max_time: str | dict | float | None = None
    # True or N: N batches (True: 1) each of training, validation and test, one epoch, no
    # sanity check, no checkpoints, no logger, no run files: does the code run at all?
    fast_dev_run: bool | int = False
    # True: torch's deterministic algorithms only (an op without one raises, naming it);
    # "warn": warn instead; False: torch's defaults
    deterministic: bool | Literal["warn"] = False
    # processes on this node and nodes: under torchrun checked against its environment;
    # devices=N in a plain `python script.py` starts N ranks through the elastic agent
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = 1
    limit_train_batches: int | float = 1.0  # an int counts batches, a float is a fraction
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    num_sanity_val_steps: int = 2
    # None: validation only every val_check_interval batches, counted across epochs
    check_val_every_n_epoch: int | None = 1
    # inside an epoch too: an int every N training batches, a float every such fraction of the
    # epoch (1.0 or None: at the epoch's end only)
    val_check_interval: int | float | None = None
    accumulate_grad_batches: int = 1
    # a NaN or inf loss on any rank stops every rank after that step with an error naming the
    # rank and the step (exit code 1), and nothing of that state is saved; no collective of
    # its own (disttrain.loop.stopping). False: train on, as Lightning does by default
    stop_on_nonfinite_loss: bool = True
    gradient_clip_val: float | None = None  # max global L2 norm; None or 0: no clipping
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"  # "value": each element
    precision: Precision = "32-true"  # or 16-mixed, bf16-mixed, bf16-true, 16-true, 64-true
    accelerator: Accelerator = "auto"
    seed: int | None = 0  # seeds Python, torch and the samplers; None leaves RNGs alone
    callbacks: list = dataclasses.field(default_factory=list)
    default_root_dir: str = "runs"
    prepare_data_per_node: bool = False
    timeout: float = 1800.0  # seconds a collective may wait before the job fails
    # While prepare_data runs, the ranks running it beat in the job's store every
    # prepare_data_heartbeat seconds; the others wait as long as the beat goes on and fail,
    # naming the rank, once it has been silent for prepare_data_heartbeat_timeout seconds (the
    # rank died or froze). A beat says the process is alive, not that the download advances:
    # prepare_data_timeout (None: no bound) bounds the whole wait, e.g. for a hung connection.
    # It is also the timeout of start-up's other long waits (setup's verdict, loading a
    # checkpoint): 7200 s when None.
    prepare_data_heartbeat: float = 5.0
    prepare_data_heartbeat_timeout: float = 60.0
    prepare_data_timeout: float | None = None
    find_unused_parameters: bool | None = None  # None: only with several optimizers
    enable_checkpointing: bool = True  # adds a ModelCheckpoint (every epoch) if none is given
    # copy the state to host memory and write checkpoints in the background: training goes on
    # (disttrain.checkpoint.background says what it promises)
    async_checkpointing: bool = False
    # "auto": the most advanced checkpoint in the run directory, if any (the default of runs
    # from a YAML config); a path; None: start fresh (refused among an earlier run's checkpoints)
    resume: str | None = None
    # "csv", "tensorboard", "mlflow", "wandb", a Logger, {class_path, init_args}, a list of
    # these, or None/False (True: "csv"); written by global rank 0 only (disttrain.loggers)
    logger: str | bool | Logger | dict | list | None = "csv"
    log_every_n_steps: int = 50  # step metrics to the logger, progress lines
    sync_step_metrics: bool = False  # reduce step metrics over ranks (one collective/interval)
    enable_progress_bar: bool = True  # tqdm on a terminal, log lines otherwise; rank 0 only
    profiler: Literal["simple"] | None = None  # per hook and loop phase, with the slowest rank
    compile: bool = False  # torch.compile the training step (after the DDP wrap)
    # auto: ddp; fsdp: FSDP2 over the data ranks; hsdp: FSDP2 sharding within dp_shard ranks
    # (by default one node's) and replicating across them (docs/strategies.md)
    strategy: Literal["auto", "ddp", "fsdp", "hsdp"] = "auto"
    # fsdp/hsdp: the device mesh, {dp_replicate: R, dp_shard: S, tp: T}, R x S x T ranks; an
    # omitted size follows from the others (dp_shard: LOCAL_WORLD_SIZE / tp under hsdp). With
    # tp > 1 the module's configure_model(mesh) applies its tensor-parallel plan
    mesh: dict | None = None
    activation_checkpointing: bool = False  # fsdp: recompute each block's activations

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _checked_precision(self.precision))
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            check_type(field.name, getattr(self, field.name), hints[field.name])
        for name in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.devices != "auto" and self.devices < 1:
            raise ConfigError("devices", f"must be 'auto' or at least 1, got {self.devices}")
        if self.max_steps == -1:  # Lightning's spelling of "no limit"
            object.__setattr__(self, "max_steps", None)
        if self.max_epochs is not None and self.max_epochs != -1 and self.max_epochs < 1:
            raise ConfigError(
                "max_epochs", f"must be -1 (no limit) or at least 1, got {self.max_epochs}"
            )
        self._check_validation_interval()
        for name in ("num_sanity_val_steps", "max_steps", "fast_dev_run"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(name, f"must be 0 or more, got {value}")
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            value = getattr(self, name)
            if value < 0 or (isinstance(value, float) and value > 1.0):
                raise ConfigError(
                    name, f"must be a batch count (int >= 0) or a fraction in [0, 1], got {value}"
                )
        self._check_timeouts()
        object.__setattr__(self, "logger", _checked_logger(self.logger))
        max_time_seconds(self.max_time)
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            raise ConfigError("gradient_clip_val", f"must be >= 0, got {self.gradient_clip_val}")
        _check_mesh(self.mesh, self.strategy)

    @property
    def epoch_limit(self) -> float:
        """How many epochs the run may train: ``max_epochs``, unless unset (1000, or no limit
        when ``max_steps`` says when to stop) or -1 (no limit)."""
        if self.max_epochs is None:
            return 1000 if self.max_steps is None else math.inf
        return math.inf if self.max_epochs == -1 else self.max_epochs

    def _check_timeouts(self) -> None:
        for name in (
            "timeout",
            "prepare_data_timeout",
            "prepare_data_heartbeat",
            "prepare_data_heartbeat_timeout",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {value}")
        if self.prepare_data_heartbeat_timeout <= self.prepare_data_heartbeat:
            raise ConfigError(
                "prepare_data_heartbeat_timeout",
                f"must be longer than prepare_data_heartbeat ({self.prepare_data_heartbeat:g} "
                f"s), got {self.prepare_data_heartbeat_timeout:g}: a few beats, so that one "
                "late beat does not end the job",
            )

    def _check_validation_interval(self) -> None:
        every_n, interval = self.check_val_every_n_epoch, self.val_check_interval
        if every_n is not None and every_n < 1:
            raise ConfigError(
                "check_val_every_n_epoch", f"must be at least 1 or None, got {every_n}"
            )
        counts = isinstance(interval, int)  # check_type refused bools
        if interval is not None and (interval < 1 if counts else not 0.0 < interval <= 1.0):
            raise ConfigError(
                "val_check_interval",
                f"must be a batch count (int >= 1) or a fraction of the epoch in (0, 1], "
                f"got {interval}",
            )
        if isinstance(interval, int) and interval % self.accumulate_grad_batches:
            raise ConfigError(
                "val_check_interval",
                f"{interval} batches end inside an accumulation window of "
                f"accumulate_grad_batches={self.accumulate_grad_batches}: validation runs "
                "after an optimizer step, so give a multiple of it",
            )
        if every_n is None and not counts:
            raise ConfigError(
                "check_val_every_n_epoch",
                "None (validation counted across epochs) needs an int val_check_interval, "
                f"got val_check_interval={interval}",
            )

    @classmethod
    def from_mapping(
        cls, options: Mapping[str, Any], *, prefix: str = "", source: str | None = None
    ) -> TrainerConfig:
        """Build from keyword arguments or a YAML section; errors name ``prefix + key``."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
                raise ConfigError(f"{prefix}{key}", f"unknown trainer option{hint}", source)
        try:
            return cls(**options)
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err.key}", err.problem, source) from None


_TIME_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}


def max_time_seconds(value: Any) -> float | None:
    """``max_time`` in seconds (None: no limit); a ``ConfigError`` naming it otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 4 or not all(part.isdigit() for part in parts):
            raise ConfigError("max_time", f"expected 'DD:HH:MM:SS', got {value!r}")
        days, hours, minutes, secs = map(int, parts)
        seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
    elif isinstance(value, Mapping):
        bad = [k for k, v in value.items() if k not in _TIME_UNITS or not _is_number(v)]
        if bad:
            units = ", ".join(_TIME_UNITS)
            raise ConfigError("max_time", f"expected a mapping of {units} to numbers: {value!r}")
        seconds = float(sum(_TIME_UNITS[k] * v for k, v in value.items()))
    else:
        seconds = float(value)
    if seconds <= 0:
        raise ConfigError("max_time", f"must be a positive duration, got {value!r}")
    return seconds


MESH_SIZES = ("dp_replicate", "dp_shard", "tp")


def _check_mesh(mesh: dict | None, strategy: str) -> None:
    """The ``mesh`` option's own rules; its product against the world size is checked when
    the run knows the world (``disttrain.config.layout``)."""
    if mesh is None:
        return
    for key, value in mesh.items():
        if key not in MESH_SIZES:
            close = difflib.get_close_matches(str(key), MESH_SIZES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"mesh.{key}", f"unknown mesh dimension{hint}; expected {MESH_SIZES}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"mesh.{key}", f"must be an int >= 1, got {value!r}")
    if strategy not in ("fsdp", "hsdp"):
        raise ConfigError(
            "mesh", f"a device mesh needs strategy 'fsdp' or 'hsdp', got strategy={strategy!r}"
        )
    if strategy == "fsdp" and mesh.get("dp_replicate", 1) > 1:
        raise ConfigError(
            "mesh.dp_replicate",
            f"is {mesh['dp_replicate']}: replicating across shard groups is strategy='hsdp'",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_precision(value: Any) -> str:
    """``precision`` by its full name (aliases such as ``16`` or ``"bf16"`` resolved)."""
    names = typing.get_args(Precision)
    if isinstance(value, str) and value in names:
        return value
    if isinstance(value, (int, str)) and not isinstance(value, bool) and value in PRECISION_ALIASES:
        return PRECISION_ALIASES[value]
    aliases = ", ".join(repr(a) for a in PRECISION_ALIASES)
    raise ConfigError(
        "precision",
        f"expected one of {', '.join(map(repr, names))} (or an alias: {aliases}), "
        f"got {type(value).__name__} {value!r}",
    )


def _checked_logger(value: Any) -> Any:
    """``logger`` as the trainer builds it: True is "csv", False is None; each entry of a list
    a name, a ``Logger`` or a ``{class_path, init_args}`` mapping (errors name ``logger.I``)."""
    if isinstance(value, bool):
        return "csv" if value else None
    for i, entry in enumerate(value if isinstance(value, list) else [value]):
        key = f"logger.{i}" if isinstance(value, list) else "logger"
        if (entry is None and not isinstance(value, list)) or isinstance(entry, Logger):
            continue
        if isinstance(entry, str) and entry not in LOGGERS:
            close = difflib.get_close_matches(entry, list(LOGGERS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(key, f"unknown logger {entry!r}{hint}; expected one of {_NAMES}")
        if isinstance(entry, Mapping):
            unknown = sorted(set(map(str, entry)) - {"class_path", "init_args"})
            if unknown or not isinstance(entry.get("class_path"), str):
                raise ConfigError(key, "a logger spec is {class_path: pkg.Class, init_args: {...}}")
            if not isinstance(entry.get("init_args") or {}, Mapping):
                raise ConfigError(f"{key}.init_args", "must be a mapping")
        elif not isinstance(entry, str):
            raise ConfigError(
                key,
                f"expected a logger name ({_NAMES}), a disttrain Logger or {{class_path, "
                f"init_args}}, got {type(entry).__name__} {entry!r}",
            )
    return value


_NAMES = ", ".join(LOGGERS)


def check_type(key: str, value: Any, annotation: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` fits ``annotation`` (bools are not ints here)."""
    if not _fits(value, annotation):
        raise ConfigError(
            key, f"expected {_describe(annotation)}, got {type(value).__name__} {value!r}"
        )


def _fits(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation) and isinstance(value, str)
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
