"""The collectives disttrain needs: a process group under torchrun, a null object in one process.

``connect`` turns the environment into a ``Collectives`` object; the rest of the code never
asks "am I distributed?". Control traffic (verdicts, agreements, gathered objects) always
goes over gloo on the CPU, whatever the backend of the gradients."""

from __future__ import annotations

import contextlib
import ctypes
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from disttrain.dist.env import DistEnv
from disttrain.dist.flight import FINISH, START
from disttrain.dist.heartbeat import HeartbeatTimes, beating, wait_for_beats
from disttrain.dist.mesh import Layout, device_mesh


class Collectives:
    """The collectives disttrain needs, for one process: every one is a no-op."""

    world_size = 1
    backend = "none"
    recorder = None  # a FlightRecorder: collectives record when they start and finish
    timeout: float | None = None  # seconds a collective may wait (None: nothing to wait for)

    def verdict(self, failed: bool, *, long: bool = False) -> list[int]:
        """Barrier that also tells every rank which ranks failed."""
        return [0] if failed else []

    def gather_text(self, text: str, *, long: bool = False) -> list[str]:
        return [text]

    def any_true(self, flag: bool) -> bool:
        """Agreement: true on every rank if it is true on any rank."""
        return flag

    def agree(self, values: list[int], op: str = "max") -> list[int]:
        """Agreement on several small integers at once: each one's max (or min) over ranks."""
        return list(values)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over all ranks (``sum``, ``max`` or ``min``)."""
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Global zero's ``obj`` on every rank."""
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def gather_object_started(self, obj: Any) -> Callable[[], list[Any]]:
        """``gather_object`` begun: it runs while this rank goes on, and the function returned
        waits for it. Every rank calls that function at the same point (where an object did
        not fit, it gathers again), before any other collective."""
        return lambda: [obj]

    def checkpoint_group(self) -> Any:
        """The group DCP's background writes coordinate over (None: no group, one process)."""
        return None

    def beating(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Around hook ``name`` on the ranks that run it while the others ``wait_for`` them."""
        return contextlib.nullcontext()

    def wait_for(self, name: str, rank: int) -> None:
        """Wait, without a fixed timeout, until ``rank`` has run hook ``name`` under
        ``beating``; ``PeerSilent`` naming it if its heartbeat stops."""

    def wrap(self, module: torch.nn.Module, device: torch.device, find_unused: bool):
        return module

    def device_mesh(self, layout: Layout | None) -> Any:
        """torch's ``DeviceMesh`` of ``layout`` (collective), or None: one process has none."""
        return None

    def close(self) -> None:
        pass


class ProcessGroupCollectives(Collectives):
    """The collectives of a real process group; control traffic always goes over gloo/CPU."""

    def __init__(
        self,
        env: DistEnv,
        backend: str,
        device: torch.device,
        control: Any,
        long_control: Any,
        owns_world: bool,
        timeout: float | None = None,
        store: Any = None,
        heartbeat: HeartbeatTimes | None = None,
    ) -> None:
        self.env = env
        self._store = store  # this session's keys in the job's store (the heartbeat's)
        self._heartbeat = heartbeat or HeartbeatTimes()
        self.timeout = timeout  # seconds a collective may wait (the stop vote's GPU wait too)
        self.device = device  # where the backend takes tensors: cuda:LOCAL_RANK (NCCL) or cpu
        self.world_size = env.world_size
        self.backend = backend
        self._control = control
        self._long_control = long_control
        self._owns_world = owns_world
        self._checkpoint_group: Any = None
        self._room: dict[str, int] = {}  # _gather_pickled's slot size, per use

    def _run(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        recorder = self.recorder
        if recorder is not None:
            recorder.record(START, name)
        fn(*args, **kwargs)
        if recorder is not None:
            recorder.record(FINISH, name)

    def verdict(self, failed: bool, *, long: bool = False) -> list[int]:
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.env.rank] = int(failed)
        group = self._long_control if long else self._control
        self._run("verdict", dist.all_reduce, flags, group=group)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def gather_text(self, text: str, *, long: bool = False) -> list[str]:
        group = self._long_control if long else self._control
        return self._gather_pickled("error messages", text, group)

    def any_true(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32)
        self._run("agreement", dist.all_reduce, value, op=dist.ReduceOp.MAX, group=self._control)
        return bool(value.item())

    def agree(self, values: list[int], op: str = "max") -> list[int]:
        value = torch.tensor(values, dtype=torch.int64)
        self._run("agreement", dist.all_reduce, value, op=_REDUCE_OPS[op], group=self._control)
        return [int(v) for v in value.tolist()]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        # NCCL takes only CUDA tensors, gloo here CPU ones: the tensor goes to the backend's
        # device and back, so no caller can build it on the wrong one. The group never
        # depends on the tensor's device (ranks could then pick different groups and hang).
        on_backend = tensor if tensor.device == self.device else tensor.to(self.device)
        self._run("all_reduce", dist.all_reduce, on_backend, op=_REDUCE_OPS[op])
        if on_backend is not tensor:
            tensor.copy_(on_backend)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        group = self._long_control
        payload = _pickled(obj) if self.env.rank == 0 else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        self._run("broadcast", dist.broadcast, size, src=0, group=group)
        if self.env.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._run("broadcast", dist.broadcast, payload, src=0, group=group)
        return _unpickled(payload, int(size.item()))

    def gather_object(self, obj: Any) -> list[Any]:
        return self._gather_pickled("gather", obj, self._long_control)

    def gather_object_started(self, obj: Any) -> Callable[[], list[Any]]:
        return self._gather_started("gather", obj, self._long_control)

    def _gather_pickled(self, name: str, obj: Any, group: Any) -> list[Any]:
        return self._gather_started(name, obj, group)()

    def _gather_started(self, name: str, obj: Any, group: Any) -> Callable[[], list[Any]]:
        """Every rank's ``obj`` on every rank: pickled into a byte tensor on the gloo control
        group, in one all-gather. Each rank sends its size and, if it fits, its bytes in a
        slot of ``_room[name]`` bytes; only when some rank's does not fit does a second
        all-gather follow, and the slot grows (alike on every rank: each saw every size) so
        that the next call fits again. A checkpoint's RNG gather, the same size every time,
        is then one collective instead of the two of torch's ``all_gather_object``. The
        all-gather is started here; the function returned waits for it and unpickles."""
        payload = _pickled(obj)
        size = payload.numel()
        room = self._room.get(name, _FIRST_ROOM)
        sent = torch.zeros(_SIZE_BYTES + room, dtype=torch.uint8)
        sent[:_SIZE_BYTES] = torch.tensor([size], dtype=torch.int64).view(torch.uint8)
        if size <= room:
            sent[_SIZE_BYTES : _SIZE_BYTES + size] = payload
        out = [torch.empty_like(sent) for _ in range(self.world_size)]
        recorder = self.recorder
        if recorder is not None:
            recorder.record(START, name)
        work = dist.all_gather(out, sent, group=group, async_op=True)

        def finish() -> list[Any]:
            work.wait()
            if recorder is not None:
                recorder.record(FINISH, name)
            sizes = [int(t[:_SIZE_BYTES].view(torch.int64).item()) for t in out]
            longest = max(sizes)
            if longest <= room:
                return [_unpickled(t[_SIZE_BYTES:], s) for t, s in zip(out, sizes)]
            self._room[name] = 1 << (longest - 1).bit_length()
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:size] = payload
            whole = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            self._run(name, dist.all_gather, whole, padded, group=group)
            return [_unpickled(t, s) for t, s in zip(whole, sizes)]

        return finish

    def checkpoint_group(self) -> Any:
        """A gloo group of every rank for background checkpoint writes, made at the first
        (collective) call: their collectives run on a writer thread, beside training's."""
        if self._checkpoint_group is None:
            timeout = None if self.timeout is None else timedelta(seconds=self.timeout)
            self._checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
        return self._checkpoint_group

    def beating(self, name: str) -> contextlib.AbstractContextManager[None]:
        return beating(self._store, name, self.env.rank, self._heartbeat)

    def wait_for(self, name: str, rank: int) -> None:  # a hang report shows who waits
        self._run("heartbeat wait", wait_for_beats, self._store, name, rank, self._heartbeat)

    def wrap(self, module: torch.nn.Module, device: torch.device, find_unused: bool):
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def device_mesh(self, layout: Layout | None) -> Any:
        return None if layout is None else device_mesh(layout, self.device)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        if self._owns_world:
            dist.destroy_process_group()
            return
        if self._checkpoint_group is not None:
            dist.destroy_process_group(self._checkpoint_group)
        for group in {self._control, self._long_control} - {dist.group.WORLD}:
            dist.destroy_process_group(group)


def _pickled(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(payload: torch.Tensor, size: int) -> Any:
    """The object pickled in the first ``size`` bytes of ``payload`` (contiguous uint8).

    Read in place through a ctypes array over the tensor's memory, whose length is a
    ``Py_ssize_t``: correct at any size (``ctypes.string_at`` takes a C int, so 2 GiB and
    more raised or came back truncated), no copy, and no numpy (``Tensor.numpy()``)."""
    view = (ctypes.c_ubyte * size).from_address(payload.data_ptr())
    return pickle.loads(memoryview(view))


_SIZE_BYTES = 8  # an int64: how many of a slot's bytes are the pickle
_FIRST_ROOM = 4096  # a first slot: error messages fit; a checkpoint's RNG states grow it

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


_raw_store = None


_sessions = 0


def connect(
    env: DistEnv,
    device: torch.device,
    timeout: float,
    long_timeout: float,
    recorder: Any = None,
    heartbeat: HeartbeatTimes | None = None,
) -> Collectives:
    """Join the job's process group (NCCL on CUDA, gloo on CPU), or return the null object.

    Each call is one session (fit, validate, test) and gets its own key prefix in the store,
    as does each elastic restart attempt, so nothing a dead attempt or an earlier session left
    in the store can be read by this one. A process group the user created already is used
    as it is (and left open at the end).
    """
    global _raw_store, _sessions
    if not env.launched:
        return Collectives()
    if dist.is_initialized():  # the user's group, left open at the end
        _sessions += 1
        store = dist.PrefixStore(
            f"disttrain/user-group/session{_sessions}/", dist.distributed_c10d._get_default_store()
        )
        collectives = _collectives_over_world(
            env, dist.get_backend(), device, timeout, long_timeout, store, heartbeat, False
        )
        collectives.recorder = recorder
        return collectives
    if _raw_store is None:  # torch's env:// rendezvous: the agent's store, or rank 0 hosts one
        _raw_store, _, _ = next(
            dist.rendezvous(
                "env://",  # reads MASTER_ADDR / MASTER_PORT itself
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(seconds=long_timeout),
            )
        )
    _sessions += 1
    store = dist.PrefixStore(
        f"disttrain/attempt{env.restart_count}/session{_sessions}/", _raw_store
    )
    backend_name = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend_name,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout),
        device_id=device if device.type == "cuda" else None,
    )
    collectives = _collectives_over_world(
        env, backend_name, device, timeout, long_timeout, store, heartbeat, True
    )
    collectives.recorder = recorder
    return collectives


def _collectives_over_world(
    env: DistEnv,
    backend: str,
    device: torch.device,
    timeout: float,
    long_timeout: float,
    store: Any,
    heartbeat: HeartbeatTimes | None,
    owns_world: bool,
) -> ProcessGroupCollectives:
    control = (
        dist.group.WORLD
        if backend == "gloo"
        else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    )
    long_control = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout))
    backend_device = device if backend == "nccl" else torch.device("cpu")
    return ProcessGroupCollectives(
        env, backend, backend_device, control, long_control, owns_world, timeout, store, heartbeat
    )
