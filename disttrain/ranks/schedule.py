"""``disttrain hooks``: the hook schedule (fit, validate, test, predict), per rank, read from
the dispatcher's table."""

from __future__ import annotations

from typing import Any

from disttrain.dist.env import DistEnv
from disttrain.ranks.dispatch import runs_on
from disttrain.ranks.table import ACTION_TABLE, Sync, hook_schedule


def describe_schedule(run: Any, world_size: int | None = None) -> str:
    """One row per hook (and trainer action): which ranks run it, what sync follows.
    ``world_size`` defaults to the config's ``launch:`` section (nodes x ranks per node)."""
    per_node = run.launch.nproc_per_node
    world = per_node * run.launch.nnodes if world_size is None else world_size
    if world < 1:  # 0 used to mean "the default" by accident
        raise ValueError(f"world size must be at least 1, got {world}")
    per_node = min(per_node, world)
    envs = [
        DistEnv(
            rank=r,
            local_rank=r % per_node,
            world_size=world,
            local_world_size=per_node,
            node_rank=r // per_node,
        )
        for r in range(world)
    ]
    table = hook_schedule(run.trainer.prepare_data_per_node)
    shown = envs if world <= 8 else envs[:4] + envs[-4:]
    width = 2 + max(len("(trainer) " + action.value) for action in ACTION_TABLE)
    head = f"{'hook':<{width}}" + "".join(f"{'rank ' + str(e.rank):>9}" for e in shown) + "  then"
    lines = [
        f"hook schedule (fit, validate, test, predict) at world size {world} "
        f"({world // per_node} node(s) x {per_node}), "
        f"prepare_data_per_node={run.trainer.prepare_data_per_node}",
        head,
    ]
    for kind, rows in (("", table), ("(trainer) ", ACTION_TABLE)):
        for name, rule in rows.items():
            marks = "".join(f"{'runs' if runs_on(rule.ranks, e) else '-':>9}" for e in shown)
            note = "" if rule.sync is Sync.NONE else rule.sync.value
            if rule.sync is Sync.AGREE_STOP:
                note += "; free unless the module overrides it"
            lines.append(f"{kind + name.value:<{width}}{marks}  {note}")
    if len(shown) < world:
        lines.append(f"(ranks 4..{world - 5} as their node's rank of the same local rank)")
    return "\n".join(lines) + "\n"
