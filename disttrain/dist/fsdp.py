"""FSDP2 sharding and sharded (DCP) checkpoints: torch's pieces as disttrain uses them.

torch's FSDP and DCP modules are imported inside the functions that use them: together they
add about 0.5 s to ``import disttrain``, which runs without them (DDP) do not pay."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

import torch

from disttrain.dist.dcp_io import storage_reader, storage_writer
from disttrain.storage.location import Where

if TYPE_CHECKING:
    from disttrain.dist.collectives import Collectives


def shard_fsdp(
    module: torch.nn.Module,
    blocks: list[torch.nn.Module],
    precision: str,
    activation_checkpointing: bool,
    mesh: Any = None,
) -> None:
    """FSDP2: shard each block, then the module as root (parameters stay DTensors in place),
    over ``mesh`` (None: every rank; a 2-D mesh: replicate x shard, HSDP).

    ``bf16-mixed`` keeps parameters in bf16 for compute and reduces gradients in bf16 while the
    optimizer updates fp32 shards; activation checkpointing recomputes each block's
    activations in backward instead of storing them.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        chosen = set(map(id, blocks))
        apply_activation_checkpointing(module, check_fn=lambda m: id(m) in chosen)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def dcp_save(module: torch.nn.Module, optimizers: list, directory: Where) -> None:
    """Every rank writes its shards of the module and optimizers (DCP) into ``directory`` (a
    path or URL); the coordinator writes ``.metadata`` last, once every shard is written.
    Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.save(state, storage_writer=storage_writer(directory))


def dcp_async_save(
    module: torch.nn.Module, optimizers: list, directory: Where, collectives: Collectives
) -> Future:
    """``dcp_save`` that returns once this rank's shards are copied to host memory; DCP
    writes them, and its coordinator ``.metadata``, on a thread of its own, coordinating over
    a gloo group kept for checkpoints (training's collectives go on meanwhile). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizers)
    state = {"model": model_state, "optim": optim_state}
    written = dcp.async_save(
        state,
        storage_writer=storage_writer(directory),
        process_group=collectives.checkpoint_group(),
    )
    return cast(Future, getattr(written, "upload_completion", written))


def dcp_load(module: torch.nn.Module, optimizers: list, directory: Where) -> None:
    """Load a DCP checkpoint into ``module`` and ``optimizers`` as they are sharded now, at
    any world size (DCP reshards). Collective under a process group. Non-tensor entries are
    read with ``weights_only=True`` (DCP's default planner would unpickle them freely); the
    caller has checked ``.metadata`` (``disttrain.checkpoint``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizers)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=storage_reader(directory), planner=_weights_only_planner())
    set_state_dict(
        module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def dcp_weight_shapes(
    module: torch.nn.Module, directory: Where
) -> tuple[dict[str, tuple | None], dict[str, tuple | None]]:
    """The shape of each of ``module``'s weights as DCP names them, and of each weight in the
    DCP checkpoint at ``directory`` (its ``.metadata`` only; None: not a tensor)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    own = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else None
        for k, v in get_model_state_dict(module).items()
    }
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        if isinstance(meta, TensorStorageMetadata)
        else None
        for key, meta in storage_reader(directory).read_metadata().state_dict_metadata.items()
        if key.startswith("model.")
    }
    return own, saved


def dcp_load_weights(module: torch.nn.Module, directory: Where) -> None:
    """Only the module's weights of a DCP checkpoint, into an unsharded ``module`` in a process
    without a process group (DCP then reads every rank's shards itself). The caller has
    checked ``.metadata``."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {"model": module.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        reader = storage_reader(directory)
        dcp.load(state, storage_reader=reader, planner=_weights_only_planner())
    module.load_state_dict(state["model"])


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are FSDP shards (DTensors)."""
    if "torch.distributed.tensor" not in sys.modules:  # nobody sharded anything
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _weights_only_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(
                    self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
                )
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyPlanner()


def full_state_dict(module: torch.nn.Module) -> dict:
    """The whole, unsharded module state on CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


@contextlib.contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[None]:
    """Every FSDP module of ``module`` gathered for a whole loop (evaluation): no collective
    per forward, so ranks with different numbers of batches cannot hang."""
    from torch.distributed.fsdp import FSDPModule  # see the module docstring: import time

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the same order
    # on every rank; the root first. Reshard-after-forward off for the loop, so a forward's
    # post-hook keeps the parameters; put back as shard_fsdp set it: blocks reshard, the
    # root (whose parameters backward needs at once) does not.
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.set_reshard_after_forward(m is not module, recurse=False)
            m.reshard()


@contextlib.contextmanager
def no_gradient_sync(module: Any) -> Iterator[None]:
    """A micro-step inside an accumulation window: no reduce-scatter."""
    module.set_requires_gradient_sync(False)  # no reduce-scatter on this micro-step
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
