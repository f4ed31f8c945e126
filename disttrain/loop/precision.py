"""Precision as a few values chosen once: the dtype parameters are held in, the context forward
passes run in, how a batch's floating-point tensors reach the step, and a GradScaler.

- ``32-true`` (default), ``64-true``: parameters and batches as they are (float32 or float64).
- ``16-mixed``, ``bf16-mixed``: float32 parameters, forward passes under ``torch.autocast``;
  ``16-mixed`` scales the loss with a GradScaler.
- ``bf16-true``, ``16-true``: the module is converted to the dtype before the optimizers are
  built (the optimizer state is then in that dtype too), a batch's floating-point tensors are
  converted after ``transfer_batch_to_device``, and tensors a forward creates without a dtype
  take it (the default dtype, for that forward only). No autocast, and no GradScaler, for
  ``16-true`` as well (as in Lightning: a scaler needs float32 master weights to unscale into).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from disttrain.data.transfer import map_tensors

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_PARAM_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
NULL_CONTEXT = contextlib.nullcontext()  # stateless, so one instance serves every step


class DefaultDtype:
    """``torch.get_default_dtype()`` is ``dtype`` inside; re-enterable one use after another,
    not nested (it keeps the previous dtype on itself, like an autocast context)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self._before = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        self._before = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self._before)


def param_dtype(precision: str) -> torch.dtype | None:
    """The dtype a ``*-true`` precision holds parameters in (None: leave the module's own)."""
    return _PARAM_DTYPES.get(precision)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context in which forward passes run: one object, entered once per forward (an
    autocast context restores the previous state on exit, so it can be entered again, one
    use after another; it keeps that state on itself, so it must not be nested)."""
    held = _PARAM_DTYPES.get(precision)
    if held is not None:
        return DefaultDtype(held)
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return NULL_CONTEXT
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_converter(precision: str) -> Callable[[Any], Any] | None:
    """For ``*-true``: a batch with its floating-point tensors in the parameters' dtype (the
    others as they are); None for every other precision (batches go to the step untouched)."""
    dtype = _PARAM_DTYPES.get(precision)
    if dtype is None:
        return None

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if torch.is_floating_point(tensor) else tensor

    return lambda batch: map_tensors(batch, convert)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for ``16-mixed``; None for every other precision (the loop then calls the
    optimizers directly)."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(device.type)
