"""Moving a batch of any nesting to a device, keeping its types."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor (and anything with ``.to``) moved to ``device``.

    Lists, tuples, namedtuples, dicts (of any Mapping type that can be rebuilt from items) and
    dataclass instances are rebuilt with the same type; other objects are returned as they are.
    Pinned CPU tensors are copied with ``non_blocking=True`` so the copy overlaps compute.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (str, bytes, int, float, bool)) or batch is None:
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(x, device) for x in batch))
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(x, device) for x in batch]
        return moved if type(batch) is list else type(batch)(moved)
    if isinstance(batch, dict):  # copy keeps dict subclasses (OrderedDict, defaultdict) intact
        moved = copy.copy(batch)
        for key, value in batch.items():
            moved[key] = move_to_device(value, device)
        return moved
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: move_to_device(getattr(batch, f.name), device)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    to = getattr(batch, "to", None)
    if callable(to):
        return to(device)
    return batch
