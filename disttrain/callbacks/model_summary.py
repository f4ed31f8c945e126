"""``ModelSummary``: parameters per top-level module at the start of fit, full and per rank."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from disttrain.api.hooks import Callback

if TYPE_CHECKING:  # the trainer imports this module
    from disttrain.api.state import TrainerState

log = logging.getLogger("disttrain.callbacks")


@dataclass
class Row:
    """One module's parameters: whole (as if unsharded) and this rank's share."""

    name: str
    kind: str
    trainable: int = 0
    frozen: int = 0
    bytes: int = 0
    local: int = 0  # elements held by this rank (all of them unless sharded)
    per_rank: list[int] = field(default_factory=list)  # ``local`` of every rank, when sharded

    @property
    def params(self) -> int:
        return self.trainable + self.frozen


def summarize(module: torch.nn.Module, max_depth: int = 1) -> list[Row]:
    """A row per submodule down to ``max_depth`` (1: the top-level ones), the module's own
    parameters as ``(own)``, and a ``total`` row last. A parameter shared by two modules
    counts once, in the first; a sharded one (an FSDP2 ``DTensor``) counts in full, with its
    local shard in ``local``."""
    rows: dict[str, Row] = {}
    counted: set[int] = set()
    total = Row("total", _kind(module))
    for name, param in module.named_parameters():
        if id(param) in counted:
            continue
        counted.add(id(param))
        parts = name.split(".")[:-1]
        owners = [".".join(parts[:depth]) for depth in range(1, min(len(parts), max_depth) + 1)]
        for owner in owners or ["(own)"]:
            kind = _kind(module.get_submodule(owner)) if owner != "(own)" else ""
            _add(rows.setdefault(owner, Row(owner, kind)), param)
        _add(total, param)
    return [*rows.values(), total]


def _kind(module: torch.nn.Module) -> str:
    """The module's class name (FSDP2's ``FSDPLinear`` is the user's ``Linear``)."""
    name = type(module).__name__
    bases = {base.__name__ for base in type(module).__mro__[1:]}
    return name[4:] if name.startswith("FSDP") and name[4:] in bases else name


def _add(row: Row, param: torch.Tensor) -> None:
    n = param.numel()
    if param.requires_grad:
        row.trainable += n
    else:
        row.frozen += n
    row.bytes += n * param.element_size()
    local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor's shard
    row.local += local.numel()


def render(rows: list[Row], sharded: bool) -> str:
    """The summary as a text table (per-rank columns when the parameters are sharded)."""
    head = ["", "Name", "Type", "Params", "Trainable", "Frozen", "Size"]
    if sharded:
        head.append("Params per rank")
    lines = []
    for i, row in enumerate(rows):
        index = "" if row.name == "total" else str(i)
        cells = [index, row.name, row.kind, _count(row.params), _count(row.trainable)]
        cells += [_count(row.frozen), _size(row.bytes)]
        if sharded:
            cells.append(" / ".join(_count(n) for n in row.per_rank))
        lines.append(cells)
    widths = [max(len(c) for c in column) for column in zip(head, *lines)]
    text = [" | ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head, *lines]]
    text.insert(1, "-+-".join("-" * w for w in widths))
    text.insert(len(text) - 1, text[1])
    return "\n".join(line.rstrip() for line in text)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class ModelSummary(Callback):
    """Print the module's parameters when training starts: per top-level module (or down to
    ``max_depth``), trainable and frozen, and their size in bytes.

    It runs at ``on_train_start``, once the strategy has wrapped or sharded the module, so
    that under FSDP it can say both the full counts and each rank's share ("Params per
    rank", gathered once: one collective at the start of fit, none later). ``rows`` holds
    the table's data (``Row``), ``text`` the table; both are the same on every rank, and
    the logging setup prints it from global rank 0.
    """

    def __init__(self, max_depth: int = 1) -> None:
        if max_depth < 1:
            raise ValueError(f"ModelSummary: max_depth must be at least 1, got {max_depth}")
        self.max_depth = max_depth
        self.rows: list[Row] = []
        self.text = ""

    def on_train_start(self, trainer: TrainerState, module: Any) -> None:
        self.rows = summarize(module, self.max_depth)
        sharded = trainer.sharded
        if sharded:  # every rank's share of every row: one gather, once
            shares = trainer.collectives.gather_object([row.local for row in self.rows])
            for i, row in enumerate(self.rows):
                row.per_rank = [rank_shares[i] for rank_shares in shares]
        self.text = render(self.rows, sharded)
        log.info("%s\n%s", type(module).__name__, self.text)
