"""The device mesh: how a job's ranks are arranged for data and tensor parallelism.

A ``Layout`` is three sizes, ``dp_replicate x dp_shard x tp`` (their product is the world
size), laid out row-major with ``tp`` fastest: global rank ``r`` has tensor-parallel rank
``r % tp`` and data rank ``r // tp``. So the tensor-parallel ranks of one data-parallel group
are consecutive (on one node, where ``tp`` divides ``LOCAL_WORLD_SIZE``), and the ``dp_shard``
groups of HSDP are consecutive too: with ``dp_shard = LOCAL_WORLD_SIZE`` they are the nodes.

``device_mesh`` builds torch's ``DeviceMesh`` with dimensions named ``dp_replicate``,
``dp_shard`` and ``tp`` (every one, a size-1 one too); FSDP2 shards over ``data_dims`` of it
(``("dp_shard",)``, or ``("dp_replicate", "dp_shard")`` for HSDP), a parallel plan uses
``mesh["tp"]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """The sizes of the mesh's dimensions; ``hybrid``: FSDP2 replicates over ``dp_replicate``
    and shards over ``dp_shard`` (HSDP), else it shards over ``dp_shard`` alone."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    hybrid: bool = False

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def data_world_size(self) -> int:
        """How many distinct batches a step reads: the data-parallel ranks."""
        return self.dp_replicate * self.dp_shard

    def data_rank(self, rank: int) -> int:
        """Which of them global ``rank`` reads (the same for a data group's ``tp`` ranks)."""
        return rank // self.tp

    def counts(self, rank: int) -> bool:
        """Whether ``rank``'s metrics count: tensor-parallel rank 0 of its data group only,
        so the replicas of one batch are not counted ``tp`` times."""
        return rank % self.tp == 0

    @property
    def data_dims(self) -> tuple[str, ...]:
        return ("dp_replicate", "dp_shard") if self.hybrid else ("dp_shard",)

    def describe(self) -> str:
        return " x ".join(f"{d}={getattr(self, d)}" for d in DIMS)


def device_mesh(layout: Layout, device: torch.device) -> Any:
    """torch's ``DeviceMesh`` of ``layout`` over the job's process group (collective: every
    rank builds one group per row of each dimension)."""
    from torch.distributed.device_mesh import init_device_mesh

    sizes = tuple(getattr(layout, d) for d in DIMS)
    return init_device_mesh(device.type, sizes, mesh_dim_names=DIMS)


def group_ranks(mesh: Any, dim: str) -> list[int]:
    """The global ranks of this rank's group along mesh dimension ``dim``."""
    return dist.get_process_group_ranks(mesh.get_group(dim))


def data_mesh(mesh: Any, layout: Layout | None) -> Any:
    """The part of ``mesh`` FSDP2 shards over (None without a mesh: every rank)."""
    if mesh is None or layout is None:
        return None
    dims = layout.data_dims
    return mesh[dims[0]] if len(dims) == 1 else mesh[dims]
