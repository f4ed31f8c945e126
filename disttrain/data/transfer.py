"""Moving a batch of any nesting to a device, keeping its types, and handing it through a
wrapper's forward (DDP, the FSDP root) untouched."""

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
        items = [move_to_device(x, device) for x in batch]
        return items if type(batch) is list else type(batch)(items)
    if isinstance(batch, dict):  # copy keeps dict subclasses (OrderedDict, defaultdict) intact
        moved: dict = copy.copy(batch)
        for key, value in batch.items():
            moved[key] = move_to_device(value, device)
        return moved
    if isinstance(batch, Mapping):
        rebuild: Any = type(batch)
        return rebuild({k: move_to_device(v, device) for k, v in batch.items()})
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


class Carried:
    """A forward's positional arguments, handed through DDP or the FSDP root as one opaque
    object.

    With ``device_ids`` set (every CUDA run), DDP's forward re-packs its inputs with
    ``torch.distributed.utils._to_kwargs`` and so does the FSDP root's on an accelerator:
    each dict is rebuilt as ``type(obj)(pairs)`` (a ``defaultdict`` raises: its first
    argument is the default factory) and each tuple subclass becomes a plain tuple. The batch
    is already on the device (``transfer_batch_to_device``), so there is nothing left for
    them to move: an object that is neither a tensor nor a container passes through as it is.
    """

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args


def carried(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` as a wrapper's forward should get them: one ``Carried``."""
    return (Carried(args),)


def uncarried(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments a wrapper's forward got, as the step should get them."""
    if len(args) == 1 and type(args[0]) is Carried:
        return args[0].args
    return args
