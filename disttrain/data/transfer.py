"""Moving a batch of any nesting to a device, keeping its types, and handing it through a
wrapper's forward (DDP, the FSDP root) untouched."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor (and anything with ``.to``) moved to ``device``.

    Lists, tuples, namedtuples, dicts (of any Mapping type that can be rebuilt from items) and
    dataclass instances are rebuilt with the same type; other objects are returned as they are.
    Pinned CPU tensors are copied with ``non_blocking=True`` so the copy overlaps compute.
    """

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == device:
            return tensor
        return tensor.to(device, non_blocking=tensor.is_pinned())

    def other(obj: Any) -> Any:
        to = getattr(obj, "to", None)
        return to(device) if callable(to) else obj

    return map_tensors(batch, move, other)


def map_tensors(
    batch: Any, fn: Callable[[torch.Tensor], Any], other: Callable[[Any], Any] = lambda x: x
) -> Any:
    """``batch`` with ``fn`` applied to every tensor inside any nesting of lists, tuples,
    namedtuples, Mappings and dataclasses (rebuilt with the same types), and ``other`` to
    every other object."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (str, bytes, int, float, bool)) or batch is None:
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(x, fn, other) for x in batch))
    if isinstance(batch, (list, tuple)):
        items = [map_tensors(x, fn, other) for x in batch]
        return items if type(batch) is list else type(batch)(items)
    if isinstance(batch, dict):  # copy keeps dict subclasses (OrderedDict, defaultdict) intact
        mapped: dict = copy.copy(batch)
        for key, value in batch.items():
            mapped[key] = map_tensors(value, fn, other)
        return mapped
    if isinstance(batch, Mapping):
        rebuild: Any = type(batch)
        return rebuild({k: map_tensors(v, fn, other) for k, v in batch.items()})
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: map_tensors(getattr(batch, f.name), fn, other)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return other(batch)


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
