"""Mixed precision as two values: an autocast context factory and a GradScaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
NULL_CONTEXT = contextlib.nullcontext()  # stateless, so one instance serves every step


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable giving the context in which forward passes run."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return lambda: NULL_CONTEXT
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for float16; a disabled scaler (a pass-through) for every other precision."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
