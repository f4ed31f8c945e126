"""Every random generator disttrain touches, in one place.

- **Seeding a run.** A ``Trainer`` seeds Python's, torch's and NumPy's generators when it is
  built, so a model built after ``Trainer(...)`` starts from the same weights in every run,
  except where the user seeded first (``disttrain.seed_everything(s)``, or
  ``torch.manual_seed(s)`` directly) and the trainer's ``seed`` is its default: then the
  generators are left as they are and ``s`` is the run's seed (samplers, per-sample seeds). A
  ``seed`` given to the trainer explicitly is applied. torch seeds its default generator from
  the operating system at start-up, so a model built before any seeding gets different
  weights in every run: ``Trainer.fit`` warns about that.
- **Each rank's own draws** (``seed_rank``): once the module is built and wrapped (built
  alike on every rank: every rank was seeded with ``seed``), each rank's generators are
  reseeded from ``(seed, rank)``, so what a dataset or a step draws (nanoGPT's
  ``torch.randint`` offsets, dropout) differs between ranks and is the same in every run.
- **A checkpoint's RNG state** (``rng_state``/``set_rng_state``): Python, torch, this rank's own
  CUDA device, NumPy, as plain data a ``weights_only`` load accepts.
- **Derived seeds** (``sample_seed``/``seed_draws``): a sample's draws in a loader worker seeded
  from ``(run seed, epoch, index)`` (or a stream's ``epoch, shard, position``), so they do not
  depend on which worker reads it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger("disttrain.seeding")
T = TypeVar("T")

_STARTUP_SEED = torch.initial_seed()  # drawn by torch from the OS: nobody has seeded yet
_last: tuple[int, str] | None = None  # (seed, "user" | "trainer" | "derived") last seen


def seed_everything(seed: int, workers: bool = True) -> int:
    """Seed Python's, torch's (every device) and, if it is loaded, NumPy's generators.

    Call it first in a script, before building the model: the model's initial weights and
    every later draw are then the same in each run, and a ``Trainer`` built afterwards keeps
    this seed (it never reseeds what you seeded). Returns ``seed``. ``workers`` is accepted
    for Lightning's ``seed_everything(42, workers=True)``: loader workers are always seeded
    (torch seeds each worker's torch, ``random`` and NumPy from its loader's seed, which this
    seed decides), so ``workers=False`` is refused rather than ignored.
    """
    if not workers:
        raise ValueError(
            "seed_everything(workers=False): disttrain's loader workers are always seeded from "
            "the run's seed (torch seeds each worker); drop the argument"
        )
    _seed_generators(seed)
    _record(seed, "user")
    return seed


def seed_for_run(seed: int | None, explicit: bool = True) -> int | None:
    """What a trainer (or a config run, before it builds the model) does with its ``seed``
    option: a seed given explicitly is applied; the default one only if the user has not
    seeded first. Returns the seed the run uses (the user's where it stands), or None when
    nothing is seeded."""
    in_effect = current_seed()
    users = in_effect is not None and _last is not None and _last[1] == "user"
    if seed is None or (users and not explicit):
        return in_effect
    _seed_generators(seed)
    _record(seed, "trainer")
    return seed


_RANK_STREAM = 0x72616E6B  # "rank": a rank's seed apart from every (epoch, index) sample seed


def seed_rank(seed: int | None, rank: int) -> int | None:
    """Reseed Python's, torch's (every device) and NumPy's generators from ``(seed, rank)``:
    the draws of this rank from now on (a dataset read in this process, dropout, a step's own
    draws) differ from every other rank's and are the same in every run. Called by the
    trainer on every rank once the module is built, wrapped and alike on every rank. Returns
    the derived seed (None, and nothing seeded, when the run has no seed)."""
    if seed is None:
        return None
    derived = sample_seed(seed, _RANK_STREAM, rank) >> 1  # 63 bits: any generator takes it
    _seed_generators(derived)
    _record(derived, "derived")
    return derived


def current_seed() -> int | None:
    """The seed the generators were last seeded with, or None if nobody seeded them. A
    ``torch.manual_seed`` called directly counts as the user's seeding."""
    global _last
    torch_seed = torch.initial_seed()
    if _last is not None and torch_seed == _last[0]:
        return _last[0]
    if torch_seed != _STARTUP_SEED:  # torch.manual_seed called since, by the user
        _last = (torch_seed, "user")
        return torch_seed
    return None


def warn_if_built_unseeded(module: object, seed: int | None) -> None:
    """Warn when ``module`` was built before anything was seeded: its initial weights come
    from the operating system's entropy, so no two runs of the script start alike."""
    built_with = getattr(module, "_seed_at_build", None)
    if seed is None or built_with != _STARTUP_SEED:
        return
    name = type(module).__name__
    log.warning(
        "%s was built before any seed was set, so its initial weights differ in every run "
        "(seed=%d seeds only what comes after). For a reproducible run, build it after "
        "Trainer(...) or call disttrain.seed_everything(%d) before building it.",
        name,
        seed,
        seed,
    )


def _record(seed: int, by: str) -> None:
    global _last
    _last = (seed, by)


def _seed_generators(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """Where this process's generators stand, as plain data (a checkpoint's ``rng`` entry)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's own device only: on resume the rank's device may have another index
        # (2 nodes x 4 GPUs -> 1 x 8), or fewer devices may be visible
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what ``rng_state`` returned (this rank's own CUDA device only)."""
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


_MASK = (1 << 64) - 1


def sample_seed(seed: int, *where: int) -> int:
    """A 64-bit seed for the sample at ``where`` (``epoch, index``; a stream's ``epoch,
    shard, position``): splitmix64 over the parts, well mixed."""
    z = seed & _MASK
    for part in where:
        z = (z ^ (part & _MASK)) * 0x9E3779B97F4A7C15 & _MASK
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
        z ^= z >> 31
    return z


def seed_draws(seed: int) -> None:
    """Seed the global generators a dataset draws from: torch (CPU), Python, NumPy. (Not
    the user's seeding: a trainer built later still applies its own seed.)"""
    _record(seed, "derived")
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed & 0xFFFFFFFF)


def draw_positions() -> tuple[Any, ...]:
    """Where the global generators a dataset draws from stand: with ``drew_since``, for
    telling once whether a dataset draws at all. (No NumPy needed: torch runs without it.)"""
    numpy = sys.modules.get("numpy")
    state = numpy.random.get_state() if numpy is not None else None
    return (
        torch.default_generator.get_state(),
        random.getstate(),
        None if state is None else (state[1].tobytes(), state[2], state[3]),
    )


def drew_since(before: tuple[Any, ...]) -> bool:
    """Whether any of those generators drew since ``before = draw_positions()``."""
    now = draw_positions()
    return not torch.equal(now[0], before[0]) or now[1:] != before[1:]


def apart(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with its draws apart from everyone else's: the global generators a dataset
    draws from (torch's CPU one, Python's, NumPy's) stand, on return, where they stood before
    the call, whatever ``fn`` seeded or drew. (About 50 us, most of it NumPy's state.)"""
    global _last
    python, torch_state, last = random.getstate(), torch.default_generator.get_state(), _last
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        return fn(*args)
    finally:
        random.setstate(python)
        torch.default_generator.set_state(torch_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
        _last = last


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def use_deterministic(mode: bool | str) -> None:
    """``Trainer(deterministic=...)``: torch's deterministic algorithms (``"warn"``: warn where
    an op has none instead of raising), cuDNN's benchmark off, and the cuBLAS workspace that
    CUDA's deterministic matrix products need (set before CUDA starts in this process)."""
    if mode is False:
        return
    torch.use_deterministic_algorithms(True, warn_only=mode == "warn")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
