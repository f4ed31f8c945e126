"""A module back from a checkpoint, without a trainer: ``Module.load_from_checkpoint``.

The module is built from the hyperparameters the checkpoint holds (``save_hyperparameters``),
with the caller's overrides, then given the weights: of a checkpoint file, of a sharded (DCP)
checkpoint directory (every rank's shards read in this one process), or of a file
``trainer.export_weights`` wrote (a state dict, which holds no hyperparameters; ``.pt`` or
``.safetensors``)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from disttrain.api import module as api_module
from disttrain.checkpoint.format import (
    CheckpointError,
    check_fits,
    is_checkpoint,
    load,
    read,
    shapes_of,
)
from disttrain.dist.fsdp import dcp_load_weights, dcp_weight_shapes
from disttrain.storage.location import Location


def load_module(
    cls: type, path: str | os.PathLike, map_location: Any, overrides: dict[str, Any]
) -> Any:
    """``cls`` built from the checkpoint's hyperparameters and ``overrides``, with the
    checkpoint's weights, in eval mode (moved to ``map_location`` when it names a device)."""
    path = Location.at(path)
    sharded = path.is_dir()
    if path.name.endswith(".safetensors"):
        content: Any = _safetensors(path)
    else:
        content = load(path) if sharded else read(path, map_location=map_location)
    if is_checkpoint(content):
        hparams, weights = dict(content.get("hyper_parameters") or {}), content["module"]
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        hparams, weights = {}, content  # exported weights: a state dict
    else:
        raise CheckpointError(
            f"{path}: neither a disttrain checkpoint nor a weights file (a state dict)"
        )
    hparams.update(overrides)
    module = cls(**hparams)
    hint = (
        f"{cls.__name__}.load_from_checkpoint built it as {cls.__name__}(**{hparams!r}) (its "
        f"__init__{inspect.signature(cls)}); pass the arguments it was trained with, as "
        "load_from_checkpoint(path, name=value)"
    )
    own, saved = (
        dcp_weight_shapes(module, path)
        if sharded
        else (shapes_of(module.state_dict()), shapes_of(weights))
    )
    try:
        check_fits(cls.__name__, own, saved, path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. {hint}") from None
    try:
        if sharded:
            dcp_load_weights(module, path)
        else:
            module.load_state_dict(weights)
    except RuntimeError as err:
        raise RuntimeError(
            f"{cls.__name__}.load_from_checkpoint({str(path)!r}): the weights do not fit the "
            f"module built as {cls.__name__}(**{hparams!r}) (its __init__"
            f"{inspect.signature(cls)}); pass the arguments it was trained with, as "
            f"load_from_checkpoint(path, name=value). {err}"
        ) from None
    if isinstance(map_location, (str, torch.device)):
        module.to(map_location)
    return module.eval()


def _safetensors(path: Location) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError:
        raise ImportError(
            f"{path}: reading a .safetensors file needs safetensors: "
            "pip install 'disttrain[safetensors]'"
        ) from None
    with path.open_read() as f:  # a local path or a URL
        return load(f.read())  # on the CPU: map_location moves the module afterwards


api_module.use_checkpoint_loader(load_module)
