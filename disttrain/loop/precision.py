"""Mixed precision as two values: the context forward passes run in, and a GradScaler."""

from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
NULL_CONTEXT = contextlib.nullcontext()  # stateless, so one instance serves every step


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context in which forward passes run: one object, entered once per forward (an
    autocast context restores the previous state on exit, so it can be entered again, one
    use after another; it keeps that state on itself, so it must not be nested)."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return NULL_CONTEXT
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for float16; None for every other precision (the loop then calls the
    optimizers directly)."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(device.type)
