"""A run as one YAML file: strict loading, dotted overrides, and building what it names.

::

    model:   {class_path: package.module.Class, init_args: {...}}   # a disttrain.Module
    data:    {class_path: ..., init_args: {...}}                    # optional disttrain.DataModule
    trainer: {...}                       # exactly disttrain.TrainerConfig's options
    launch:  {nproc_per_node, nnodes, node_rank, rdzv_endpoint, max_restarts}
    seed: 0
    run_dir: runs/NAME

Every error is a ``ConfigError`` naming the dotted key, the file and (where known) the line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import Callback
from disttrain.api.module import Module
from disttrain.config.options import ConfigError, TrainerConfig, check_type
from disttrain.loggers.core import Logger

TOP_KEYS = ("model", "data", "trainer", "launch", "seed", "run_dir")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous; None: single node
    max_restarts: int = 0


@dataclasses.dataclass(frozen=True)
class ClassSpec:
    class_path: str
    init_args: dict

    def build(self) -> Any:
        return import_class(self.class_path)(**self.init_args)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ClassSpec
    data: ClassSpec | None
    trainer: TrainerConfig  # callbacks hold ClassSpecs until build_callbacks
    launch: LaunchConfig
    seed: int | None
    run_dir: str
    resolved: dict  # the config after overrides, defaults filled in: what config.yaml holds
    source: str


def load(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate ``path``; raises ``ConfigError`` on the first problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("--config", f"cannot read the file ({err.strerror})", source) from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError("(yaml)", f"YAML syntax error: {err.problem}", where) from None
    except yaml.YAMLError as err:
        raise ConfigError("(yaml)", f"YAML error: {err}", source) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "the file must hold a mapping of sections", source)
    overridden: dict[str, str] = {}  # dotted key -> the override item that set it
    for item in overrides:
        overridden[apply_override(raw, item)] = item
    return validate(raw, source, lines, overridden)


def override_source(item: str) -> str:
    """How an error names an override: the item as typed, where it came from."""
    return f"override {item!r} (command line)"


def apply_override(raw: dict, item: str) -> str:
    """Set ``a.b.c=value`` in ``raw``; the value is read as YAML (``3``, ``true``, ``[1, 2]``).
    Returns the dotted key set; errors name the override as typed."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            "(override)",
            "an override is KEY=VALUE with a dotted key, e.g. trainer.max_epochs=3",
            override_source(item),
        )
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                ".".join(parts[: depth + 1]),
                "is not a section; cannot set a key in it",
                override_source(item),
            )
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            key, f"the value is not valid YAML: {problem}", override_source(item)
        ) from None
    return key


def validate(
    raw: dict,
    source: str,
    lines: dict[str, int] | None = None,
    overridden: dict[str, str] | None = None,
) -> RunConfig:
    """Check ``raw`` (a parsed config with its overrides applied) and build the ``RunConfig``.

    An error names the key and where its value came from: the override that set it (or set a
    section above it, or a key below it), else ``source`` with the key's line.
    """
    lines = lines or {}
    overridden = overridden or {}

    def fail(key: str, problem: str) -> typing.NoReturn:
        item = _override_for(key, overridden)
        if item is not None:
            raise ConfigError(key, problem, override_source(item))
        line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
        raise ConfigError(key, problem, f"{source}:{line}" if line else source)

    _no_unknown(raw, TOP_KEYS, "", fail)
    if raw.get("model") is None:
        fail("model", "missing: the run needs a model {class_path: ..., init_args: {...}}")
    model = _class_spec(raw["model"], "model", Module, fail)
    data = None if raw.get("data") is None else _class_spec(raw["data"], "data", DataModule, fail)

    trainer, callbacks, seed, run_dir = _trainer_section(raw, source, fail)
    launch = _launch(raw.get("launch") or {}, fail)

    resolved = {
        "model": _spec_dict(model),
        **({"data": _spec_dict(data)} if data else {}),
        "trainer": _trainer_dict(trainer, callbacks),
        "launch": dataclasses.asdict(launch),
        "seed": seed,
        "run_dir": run_dir,
    }
    return RunConfig(model, data, trainer, launch, seed, run_dir, resolved, source)


def _trainer_section(
    raw: dict, source: str, fail: Callable[[str, str], typing.NoReturn]
) -> tuple[TrainerConfig, list[ClassSpec], int | None, str]:
    """The ``trainer:`` section with the top-level keys it depends on (seed, run_dir)."""
    trainer_raw = raw.get("trainer") or {}
    if not isinstance(trainer_raw, dict):
        fail("trainer", f"must be a mapping of trainer options, got {type(trainer_raw).__name__}")
    trainer_raw = dict(trainer_raw)
    callbacks_raw = trainer_raw.pop("callbacks", None) or []
    if not isinstance(callbacks_raw, list):
        fail("trainer.callbacks", "must be a list of {class_path, init_args} entries")
    callbacks = [
        _class_spec(cb, f"trainer.callbacks.{i}", Callback, fail)
        for i, cb in enumerate(callbacks_raw)
    ]
    if "logger" in trainer_raw:
        trainer_raw["logger"] = _logger_specs(trainer_raw["logger"], fail)
    seed = raw.get("seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        fail("seed", f"expected int or null, got {type(seed).__name__} {seed!r}")
    if "seed" in trainer_raw and "seed" in raw and trainer_raw["seed"] != seed:
        fail("trainer.seed", f"disagrees with the top-level seed ({seed}); set one of them")
    trainer_raw.setdefault("seed", seed)
    # a config's run directory is its own (runs/<config name>), so running the same command
    # again goes on from its checkpoints: what a requeued or interrupted job needs
    trainer_raw.setdefault("resume", "auto")
    run_dir = raw.get("run_dir")
    root = trainer_raw.get("default_root_dir")  # older configs name the directory here
    if run_dir is not None and root is not None and run_dir != root:
        fail(
            "trainer.default_root_dir",
            f"disagrees with run_dir ({run_dir!r}); run_dir is the one to keep: delete "
            "trainer.default_root_dir (older disttrain wrote both into config.yaml)",
        )
    run_dir = run_dir or root or str(Path("runs") / Path(source).stem)
    if not isinstance(run_dir, str):
        fail("run_dir", f"expected a path string, got {type(run_dir).__name__}")
    trainer_raw["default_root_dir"] = run_dir
    try:
        trainer = TrainerConfig.from_mapping(trainer_raw, prefix="trainer.")
    except ConfigError as err:
        fail(err.key, err.problem)
    trainer = dataclasses.replace(trainer, callbacks=callbacks)
    return trainer, callbacks, seed, run_dir


def _logger_specs(raw: Any, fail: Callable[[str, str], typing.NoReturn]) -> Any:
    """``trainer.logger``'s ``{class_path, init_args}`` entries checked as callbacks are (the
    class a ``disttrain.loggers.Logger``, its arguments); names are TrainerConfig's to check.
    The specs stay plain data: the trainer builds them (``disttrain.loggers.make_loggers``)."""
    if isinstance(raw, dict):
        return _spec_dict(_class_spec(raw, "trainer.logger", Logger, fail))
    if isinstance(raw, list):
        return [
            _spec_dict(_class_spec(entry, f"trainer.logger.{i}", Logger, fail))
            if isinstance(entry, dict)
            else entry
            for i, entry in enumerate(raw)
        ]
    return raw


def build_callbacks(config: RunConfig) -> TrainerConfig:
    """The trainer options with each callback spec replaced by an instance."""
    return dataclasses.replace(
        config.trainer, callbacks=[c.build() for c in config.trainer.callbacks]
    )


def dump(resolved: dict) -> str:
    return yaml.safe_dump(resolved, sort_keys=False)


def import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ImportError(f"'{class_path}' is not a dotted path package.module.Class")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportError(f"module '{module_name}' has no attribute '{name}'") from None


# -- helpers -------------------------------------------------------------------------------
def _no_unknown(section: dict, known: tuple[str, ...], prefix: str, fail) -> None:
    for key in section:
        if key not in known:
            hint = _did_you_mean(key, known, prefix)
            fail(f"{prefix}{key}", f"unknown key; expected one of {', '.join(known)}{hint}")


def _did_you_mean(key: Any, known: typing.Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _class_spec(raw: Any, key: str, base: type, fail) -> ClassSpec:
    if not isinstance(raw, dict):
        fail(key, "must be a mapping {class_path: package.module.Class, init_args: {...}}")
    _no_unknown(raw, ("class_path", "init_args"), f"{key}.", fail)
    class_path = raw.get("class_path")
    if not isinstance(class_path, str):
        fail(f"{key}.class_path", "missing: give the class as package.module.Class")
    init_args = raw.get("init_args") or {}
    if not isinstance(init_args, dict):
        fail(f"{key}.init_args", f"must be a mapping, got {type(init_args).__name__}")
    try:
        cls = import_class(class_path)
    except Exception as err:  # importing user code can raise anything
        fail(f"{key}.class_path", f"cannot import '{class_path}': {type(err).__name__}: {err}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        fail(
            f"{key}.class_path",
            f"'{class_path}' is not a {base.__module__.split('.')[0]}.{base.__name__}",
        )
    _check_init_args(cls, init_args, f"{key}.init_args", fail)
    return ClassSpec(class_path, copy.deepcopy(init_args))


def _check_init_args(cls: type, init_args: dict, key: str, fail) -> None:
    signature = inspect.signature(cls)
    params = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in init_args:
        if name not in params and not takes_kwargs:
            fail(
                f"{key}.{name}",
                f"{cls.__name__} takes no argument '{name}' (it takes: {', '.join(named)})"
                + _did_you_mean(name, named, f"{key}."),
            )
    for name in named:
        param = params[name]
        required = param.default is param.empty and param.kind is not param.POSITIONAL_ONLY
        if required and name not in init_args:
            fail(f"{key}.{name}", f"missing: {cls.__name__} needs '{name}'")
    try:
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # annotations that do not resolve are not ours to judge
        hints = {}
    for name, value in init_args.items():
        if name in hints and _checkable(hints[name]):
            try:
                check_type(f"{key}.{name}", value, hints[name])
            except ConfigError as err:
                fail(err.key, err.problem)


def _checkable(annotation: Any) -> bool:
    """Only plain scalar annotations (and their unions with None) are checked."""
    simple = (int, float, str, bool, type(None))
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(a in simple for a in args)
    return annotation in simple


def _launch(raw: Any, fail) -> LaunchConfig:
    if not isinstance(raw, dict):
        fail("launch", "must be a mapping")
    known = tuple(f.name for f in dataclasses.fields(LaunchConfig))
    _no_unknown(raw, known, "launch.", fail)
    hints = typing.get_type_hints(LaunchConfig)
    for name, value in raw.items():
        try:
            check_type(f"launch.{name}", value, hints[name])
        except ConfigError as err:
            fail(err.key, err.problem)
    launch = LaunchConfig(**raw)
    for name in ("nproc_per_node", "nnodes"):
        if getattr(launch, name) < 1:
            fail(f"launch.{name}", f"must be at least 1, got {getattr(launch, name)}")
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        fail("launch.rdzv_endpoint", "needed with nnodes > 1: host:port of the rendezvous")
    return launch


def _trainer_dict(trainer: TrainerConfig, callbacks: list[ClassSpec]) -> dict:
    """The trainer section as resolved, without ``default_root_dir``: ``run_dir`` is the one
    key naming the directory, so a copy of config.yaml with only run_dir changed runs there."""
    options = dataclasses.asdict(trainer)
    del options["default_root_dir"]
    return {**options, "callbacks": [_spec_dict(c) for c in callbacks]}


def _override_for(key: str, overridden: dict[str, str]) -> str | None:
    """The override behind an error at ``key``: the one that set it, a section holding it
    (``model={...}``) or a key inside it (``model.init_argz.lr=1``: the error is at
    ``model.init_argz``); the last one typed wins, as it does for the value."""
    found = None
    for set_key, item in overridden.items():
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            found = item
    return found


def _spec_dict(spec: ClassSpec) -> dict:
    return {"class_path": spec.class_path, "init_args": spec.init_args}


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map every dotted key of a composed YAML document to its 1-based line."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}{i}"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{prefix}{i}."))
    return lines
