"""Where this process stands in the job: torchrun's environment read once, and its device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job, as torchrun described it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0
    launched: bool = False  # True under torchrun, even at world size 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        present = [k for k in _TORCHRUN_KEYS if k in env]
        if not present:
            return cls()
        missing = [k for k in _TORCHRUN_KEYS if k not in env]
        if missing:
            raise RuntimeError(
                f"torchrun's environment is incomplete: {', '.join(present)} set but "
                f"{', '.join(missing)} missing. Start the script with torchrun, or unset "
                "these variables to run a single debug process."
            )
        world_size = int(env["WORLD_SIZE"])
        return cls(
            rank=int(env["RANK"]),
            local_rank=int(env["LOCAL_RANK"]),
            world_size=world_size,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
            node_rank=int(env.get("GROUP_RANK", 0)),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            launched=True,
        )


# Where the trainer says this process's share of the data is, when it is not its rank's:
# "DATA_RANK/DATA_WORLD_SIZE" under tensor parallelism (the tp ranks of a data group read one
# share). An environment variable, so that loader workers (forked or spawned) see it too.
DATA_PLACE = "DISTTRAIN_DATA_PLACE"


def data_place(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(data rank, data world size)``: which of how many shares of the data this process
    reads; torchrun's ``RANK`` and ``WORLD_SIZE`` unless the trainer set ``DATA_PLACE``."""
    env = os.environ if environ is None else environ
    place = env.get(DATA_PLACE)
    if place:
        rank, world_size = place.split("/")
        return int(rank), int(world_size)
    dist_env = DistEnv.from_environ(env)
    return dist_env.rank, dist_env.world_size


def set_data_place(rank: int, world_size: int, env: DistEnv) -> None:
    """Publish this process's data share (cleared where it is its rank's own)."""
    if (rank, world_size) == (env.rank, env.world_size):
        os.environ.pop(DATA_PLACE, None)
    else:
        os.environ[DATA_PLACE] = f"{rank}/{world_size}"


def select_device(accelerator: str, env: DistEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` or ``cpu``, from the ``accelerator`` option."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("accelerator='cuda' but CUDA is not available on this machine")
    if env.local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"rank {env.rank}: LOCAL_RANK={env.local_rank} but only "
            f"{torch.cuda.device_count()} CUDA devices are visible"
        )
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    return device
