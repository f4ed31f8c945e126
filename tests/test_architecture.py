"""The checks a reviewer makes of the package's shape, as tests: one package imports
``torch.distributed``; folders depend on one another in one direction only (``LAYERS``); no
import circles, function-level and type-only imports included; nobody but the trainer reads
its private attributes; small modules and functions a reader holds on one screen; no two
modules named alike; function-level imports only where they keep an optional dependency
optional or a heavy one off start-up."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "disttrain"
MODULES = sorted(PACKAGE.rglob("*.py"))
# imported inside functions on purpose: optional extras, example data, and torch's FSDP/DCP
# modules (about 0.5 s of import time that runs without FSDP do not pay)
LAZY_OK = (
    "torch.distributed.",
    "torch.utils.tensorboard",
    "matplotlib",
    "sklearn",
    "pydoc_data",
    "mlflow",
    "wandb",
    "safetensors",
)


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, type_only: bool = False) -> list[tuple[int, str, bool, bool]]:
    """(line, imported module, inside a function, the statement's own module) for every
    import (``type_only``: TYPE_CHECKING ones too); ``from a import b`` also yields ``a.b``
    (b may be one)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not type_only:
            skipped |= {id(n) for n in ast.walk(node)}
    found: list[tuple[int, str, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if id(child) in skipped:
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function, True) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.lineno, child.module, in_function, True))
                found.extend(
                    (child.lineno, f"{child.module}.{a.name}", in_function, False)
                    for a in child.names
                )
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or inner)

    visit(tree, False)
    return found


def test_only_disttrain_dist_imports_torch_distributed():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in MODULES
        if PACKAGE / "dist" not in path.parents
        for line, name, _, _ in _imports(path)
        if name == "torch.distributed" or name.startswith("torch.distributed.")
    ]
    assert offenders == []


def test_no_import_circles_function_level_and_type_only_imports_included():
    """Among disttrain's modules; the façade ``disttrain/__init__`` (which imports the public
    pieces) and the examples (user code) stand outside."""
    names = {_name(p): p for p in MODULES}
    inner = {n: p for n, p in names.items() if n != "disttrain" and ".examples" not in n}
    graph: dict[str, set[str]] = {}
    for name, path in inner.items():
        imported = {target for _, target, _, own in _imports(path, type_only=True) if own}
        targets = {t for _, t, _, _ in _imports(path, type_only=True) if t in inner}
        assert "disttrain" not in imported, (
            f"{name} imports the façade `disttrain`: import the module that defines it"
        )
        graph[name] = targets - {name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_function_level_imports_only_where_they_keep_something_off_start_up():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name} inside a function"
        for path in MODULES
        for line, name, in_function, own in _imports(path)
        if in_function and own and not name.startswith(LAZY_OK)
    ]
    assert offenders == []


def test_no_module_over_400_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES}
    assert {path: n for path, n in lengths.items() if n > 400} == {}


def test_no_function_over_60_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def _one_edit_apart(a: str, b: str) -> bool:
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def test_no_two_modules_named_alike():
    """``callback``/``callbacks``, ``log``/``logs``: a reader opens the wrong one."""
    stems = {}
    for path in MODULES:
        stem = path.parent.name if path.name == "__init__.py" else path.stem
        if stem not in ("__init__", "__main__"):
            stems.setdefault(stem, set()).add(str(path.relative_to(ROOT)))
    clashes = [(a, b) for a, b in itertools.combinations(sorted(stems), 2) if _one_edit_apart(a, b)]
    clashes += [(s, s) for s, paths in stems.items() if len(paths) > 1 and s != "__init__"]
    assert clashes == []


# Each folder of disttrain/ (or top-level module) may import only those on the layers below
# it: the order a reader learns the package in, from the bytes on disk up to the command.
LAYERS: list[set[str]] = [
    {"version", "rng", "storage"},  # no disttrain imports at all
    {"dist"},  # torch.distributed: the environment, collectives, launcher, FSDP, flight recorder
    {"data"},  # loaders, samplers, streams: what a rank reads
    {"api"},  # what a user implements: Module, ModelHooks, Callback, DataModule, TrainerState
    {"observe"},  # metrics, profiler, plots, which ranks print
    {"loggers"},  # where metrics go: CSV, TensorBoard, MLflow, W&B, your own
    {"config"},  # the trainer's options, YAML run files
    {"ranks"},  # the hook table and the dispatcher
    {"checkpoint"},  # the format, taking and restoring one, where to resume from
    {"callbacks"},  # ModelCheckpoint, EarlyStopping, the progress bar
    {"loop"},  # the trainer and the loop
    {"cli", "examples"},  # the disttrain command; example modules
]


def _folder(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "disttrain" else None


def test_folders_import_only_the_layers_below_them():
    layer_of = {folder: i for i, folders in enumerate(LAYERS) for folder in folders}
    offenders = []
    for path in MODULES:
        source = _folder(_name(path))
        if source is None or source not in layer_of:
            assert _name(path) in ("disttrain", "disttrain.__main__"), f"{path}: not in LAYERS"
            continue
        for line, target, _, own in _imports(path, type_only=True):
            folder = _folder(target) if own else None
            if folder is None or folder == source:
                continue
            if layer_of.get(folder, 99) >= layer_of[source]:
                offenders.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target}")
    assert offenders == []


def test_nobody_but_the_trainer_reads_its_private_attributes():
    """The trainer is a façade over the run: its state is read through public properties."""
    offenders = []
    for path in MODULES:
        if path == PACKAGE / "loop" / "trainer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id == "trainer"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} trainer.{node.attr}")
    assert offenders == []
