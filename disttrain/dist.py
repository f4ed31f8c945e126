"""Everything disttrain does with ``torch.distributed``: this is the only module that imports it.

``DistEnv`` is torchrun's environment read once into a frozen value. ``connect`` turns it into
a ``Collectives`` object: the real process group under torchrun, or a null object in a single
process whose collectives cost nothing. The rest of the code never asks "am I distributed?".
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from disttrain.flight import FINISH, START
from disttrain.steps import StopVote, TrainingStep

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


class Collectives:
    """The collectives disttrain needs, for one process: every one is a no-op."""

    world_size = 1
    backend = "none"
    recorder = None  # a FlightRecorder: collectives record when they start and finish

    def verdict(self, failed: bool, *, long: bool = False) -> list[int]:
        """Barrier that also tells every rank which ranks failed."""
        return [0] if failed else []

    def gather_text(self, text: str, *, long: bool = False) -> list[str]:
        return [text]

    def any_true(self, flag: bool) -> bool:
        """Agreement: true on every rank if it is true on any rank."""
        return flag

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over all ranks (``sum``, ``max`` or ``min``)."""
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Global zero's ``obj`` on every rank."""
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def attach_stop_vote(self, router: TrainingStep, device: torch.device) -> None:
        """Carry stop votes in the gradient all-reduce of ``router`` once DDP wraps it (no
        collective of their own); one process has nothing to agree with."""

    def stop_agreed(self, local_vote: bool) -> bool:
        """Whether any rank voted to stop in the last synchronised step (one process: its vote)."""
        return local_vote

    def wrap(self, module: torch.nn.Module, device: torch.device, find_unused: bool):
        return module

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
    ) -> None:
        self.env = env
        self.timeout = timeout  # seconds a collective may wait (the stop vote's GPU wait too)
        self.device = device  # where the backend takes tensors: cuda:LOCAL_RANK (NCCL) or cpu
        self.world_size = env.world_size
        self.backend = backend
        self._control = control
        self._long_control = long_control
        self._owns_world = owns_world
        self._vote: StopVote | None = None

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

    def _gather_pickled(self, name: str, obj: Any, group: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank: pickled into a byte tensor on the gloo control
        group. Not torch's ``all_gather_object``: that one needs numpy, which torch does not
        declare, and on NCCL it would add a device round trip."""
        payload = _pickled(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        self._run(name, dist.all_gather, sizes, size, group=group)
        longest = max(int(s.item()) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._run(name, dist.all_gather, out, padded, group=group)
        return [_unpickled(t, int(s.item())) for t, s in zip(out, sizes)]

    def attach_stop_vote(self, router: TrainingStep, device: torch.device) -> None:
        self._vote = StopVote(device, self.recorder, timeout=self.timeout)
        router.attach(self._vote)

    def stop_agreed(self, local_vote: bool) -> bool:
        vote = self._vote
        if vote is None:  # no DDP model to carry it: nothing else has synchronised this step
            return self.any_true(local_vote)
        return vote.agreed(local_vote)  # local_vote rides the next step's gradient all-reduce

    def wrap(self, module: torch.nn.Module, device: torch.device, find_unused: bool):
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def close(self) -> None:
        if not dist.is_initialized():
            return
        if self._owns_world:
            dist.destroy_process_group()
            return
        for group in {self._control, self._long_control} - {dist.group.WORLD}:
            dist.destroy_process_group(group)


def _pickled(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(payload: torch.Tensor, size: int) -> Any:
    # ctypes reads the bytes where Tensor.numpy() would need numpy
    return pickle.loads(ctypes.string_at(payload.data_ptr(), size))


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_raw_store = None
_sessions = 0


def connect(
    env: DistEnv, device: torch.device, timeout: float, long_timeout: float, recorder: Any = None
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
    if dist.is_initialized():
        backend = dist.get_backend()
        collectives = _collectives_over_world(env, backend, device, timeout, long_timeout, False)
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
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout),
        device_id=device if device.type == "cuda" else None,
    )
    collectives = _collectives_over_world(env, backend, device, timeout, long_timeout, True)
    collectives.recorder = recorder
    return collectives


def _collectives_over_world(
    env: DistEnv,
    backend: str,
    device: torch.device,
    timeout: float,
    long_timeout: float,
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
        env, backend, backend_device, control, long_control, owns_world, timeout
    )


def record(fn):
    """torchelastic's ``record``: a worker's exception goes to its error file for the launcher."""
    from torch.distributed.elastic.multiprocessing.errors import record as _record

    return _record(fn)


def launch_workers(torchrun_argv: list[str], after_failure: Any = None) -> int:
    """Start workers with ``torch.distributed.run`` (the elastic agent); their exit status.

    When a worker fails, the agent stops every worker, and the failing rank's error (from its
    error file) is summarised. A first Ctrl-C is passed on to the workers as one SIGINT (they
    stop after an agreed step and checkpoint); a second one kills them at once.
    """
    import signal
    import sys

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_args, run

    from disttrain.preemption import exit_code_for

    flags = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    if "--signals-to-handle" in flags:  # torch >= 2.7: SIGINT is ours, the rest the agent's
        torchrun_argv = ["--signals-to-handle=SIGTERM,SIGHUP,SIGQUIT", *torchrun_argv]
        previous = signal.signal(signal.SIGINT, _first_interrupt)
    else:
        previous = None
    # time for the workers' agreed stop and checkpoint before the agent kills them
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    # the agent's own lines repeat what disttrain reports in its words (which signal, which
    # rank failed); its errors about itself (rendezvous, start-up) still show
    for name, level in _QUIET_AGENT_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        run(parse_args(torchrun_argv))
    except SignalException as err:  # the agent passed the signal on and waited for the workers
        # rank 0 said what the workers did (where the checkpoint went, or that none was
        # written); the launcher claims nothing of its own
        return exit_code_for(err.sigval.name)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(_failure_summary(rank, failure), file=sys.stderr, flush=True)
        if after_failure is not None:
            after_failure()
        return failure.exitcode if failure.exitcode > 0 else 1  # killed by a signal: 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


_QUIET_AGENT_LOGGERS = {
    "torch.distributed.run": logging.ERROR,
    "torch.distributed.elastic.agent.server.api": logging.ERROR,
    "torch.distributed.elastic.multiprocessing.api": logging.CRITICAL,
}


def _first_interrupt(signum: int, frame: Any) -> None:
    """The launcher's first Ctrl-C: the agent sends the workers one SIGINT and waits for their
    agreed stop; from now on a second Ctrl-C kills them."""
    import signal

    from torch.distributed.elastic.multiprocessing import SignalException

    signal.signal(signal.SIGINT, _second_interrupt)
    raise SignalException("Ctrl-C", sigval=signal.Signals.SIGINT)


def _second_interrupt(signum: int, frame: Any) -> None:
    import signal

    from disttrain.preemption import abort_now

    for pid in _child_pids():  # each worker leads its own session (torchrun starts them so)
        with contextlib.suppress(OSError):  # already gone
            os.killpg(pid, signal.SIGKILL)
    abort_now("second interrupt: workers killed at once, without a checkpoint")


def _child_pids() -> list[int]:
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def _failure_summary(rank: int, failure: Any) -> str:
    """The first failing rank's error in a few lines: the message, not the traceback (which
    the worker wrote to its log file)."""
    message = failure.message
    if isinstance(message, dict):  # the error file's content
        message = message.get("message", message)
        if isinstance(message, dict):
            message = message.get("message", "")
    text = str(message).strip() or f"exit code {failure.exitcode}"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # only the exception line
        lines = lines[-1:]
    summary = "\n  ".join(lines[:12])
    return f"disttrain: rank {rank} failed first (exit code {failure.exitcode}):\n  {summary}"


def shard_fsdp(
    module: torch.nn.Module,
    blocks: list[torch.nn.Module],
    precision: str,
    activation_checkpointing: bool,
) -> None:
    """FSDP2: shard each block, then the module as root (parameters stay DTensors in place).

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
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def dcp_save(module: torch.nn.Module, optimizers: list, directory: str | os.PathLike) -> None:
    """Every rank writes its shards of the module and optimizers (DCP); the coordinator
    writes ``.metadata`` last, once every shard is written. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizers)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def dcp_load(module: torch.nn.Module, optimizers: list, directory: str | os.PathLike) -> None:
    """Load a DCP checkpoint into ``module`` and ``optimizers`` as they are sharded now, at
    any world size (DCP reshards). Collective under a process group. Non-tensor entries are
    read with ``weights_only=True`` (DCP's default planner would unpickle them freely); the
    caller has checked ``.metadata`` (``disttrain.checkpoint``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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

    model_state, optim_state = get_state_dict(module, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory), planner=WeightsOnlyPlanner())
    set_state_dict(
        module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def full_state_dict(module: torch.nn.Module) -> dict:
    """The whole, unsharded module state on CPU (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)
