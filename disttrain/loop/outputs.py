"""What steps return: the loss, detached outputs for ``*_epoch_end``, scalar metrics."""

from __future__ import annotations

from typing import Any

import torch


def loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "training_step must return a loss tensor or a dict with 'loss'; "
        f"got {type(output).__name__}"
    )


def detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()}
    return output


def per_batch(outputs: list[Any], n_optimizers: int) -> list[Any]:
    if n_optimizers == 1:
        return outputs
    return [outputs[i : i + n_optimizers] for i in range(0, len(outputs), n_optimizers)]


def scalar_metrics(result: Any) -> dict[str, float]:
    """The scalar entries of what an ``*_epoch_end`` returned, as floats."""
    if not isinstance(result, dict):
        return {}
    metrics = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[str(key)] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[str(key)] = float(value)
    return metrics
