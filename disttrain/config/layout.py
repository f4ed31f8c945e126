"""The device mesh a run uses: the ``strategy`` and ``mesh`` options against the job's size."""

from __future__ import annotations

from disttrain.config.options import ConfigError, TrainerConfig
from disttrain.dist.env import DistEnv
from disttrain.dist.mesh import Layout


def resolve_layout(cfg: TrainerConfig, env: DistEnv) -> Layout | None:
    """The mesh's sizes for this job, or None where the run builds no mesh: DDP, FSDP without
    a ``mesh`` option (FSDP2 shards over every rank), and the debug mode (one process, no
    process group: the module runs as it is, as under FSDP).

    An omitted size follows from the others: ``tp`` is 1; under ``hsdp`` ``dp_shard`` is the
    node's ranks over ``tp`` (``LOCAL_WORLD_SIZE / tp``) and ``dp_replicate`` the rest; under
    ``fsdp`` ``dp_shard`` is ``WORLD_SIZE / tp``. A product that is not the world size is a
    ``ConfigError`` naming ``mesh`` and the numbers."""
    if cfg.strategy not in ("fsdp", "hsdp") or not env.launched:
        return None
    if cfg.strategy == "fsdp" and cfg.mesh is None:
        return None
    mesh = dict(cfg.mesh or {})
    tp = mesh.get("tp", 1)
    hybrid = cfg.strategy == "hsdp"
    if hybrid:
        shard = mesh.get("dp_shard", max(1, env.local_world_size // tp))
        replicate = mesh.get("dp_replicate", max(1, env.world_size // (shard * tp)))
    else:
        replicate, shard = 1, mesh.get("dp_shard", max(1, env.world_size // tp))
    layout = Layout(replicate, shard, tp, hybrid)
    if layout.world_size != env.world_size:
        given = ", ".join(f"{k}={v}" for k, v in mesh.items()) or "nothing given"
        raise ConfigError(
            "mesh",
            f"{layout.describe()} is {layout.world_size} ranks ({given}; "
            f"LOCAL_WORLD_SIZE={env.local_world_size}), but WORLD_SIZE is {env.world_size}: "
            "make the product of the sizes the job's number of ranks",
        )
    return layout
