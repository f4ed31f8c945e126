"""What a CUDA run would meet, caught on a CPU: half-precision epoch sums, device syncs in
``log()`` (a ``meta`` tensor fails on any sync), the batch types DDP and the FSDP root re-pack
on CUDA (torch's own re-packing function, run here), the stop vote's deadline, the
profiler's CUDA clock (fake events) and the torch floor. Nothing here pretends to be a GPU
run: the CUDA-only calls are replaced by fakes only where the logic around them is tested."""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import torch
from torch.distributed.utils import _to_kwargs  # what DDP(device_ids=...) and FSDP run

from disttrain.loop import strategy
from disttrain.loop import vote as steps
from disttrain.observe import profiler
from disttrain.observe.metrics import MetricStore, reduce_epoch

ROOT = Path(__file__).resolve().parent.parent


# -- half-precision epoch metrics ----------------------------------------------------------
def _epoch_value(values: list[torch.Tensor], reduce: str) -> float:
    store = MetricStore()
    for value in values:
        store.log("m", value, False, True, reduce, 1, False)
    return reduce_epoch([store.take_epoch()])["m"]


def test_an_fp16_epoch_sum_does_not_overflow():
    values = [torch.tensor(60000.0, dtype=torch.float16)] * 4  # fp16 ends at 65504
    assert _epoch_value(values, "sum") == 240000.0
    assert _epoch_value(values, "mean") == 60000.0


def test_a_bf16_epoch_sum_keeps_every_increment():
    values = [torch.tensor(1.0, dtype=torch.bfloat16)] * 300  # bf16: 256 + 1 == 256
    assert _epoch_value(values, "sum") == 300.0


# -- no device sync per log() --------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["max", "min", "mean", "sum"])
def test_log_never_reads_a_tensor_back(reduce):
    """A meta tensor has no data: anything that would sync a CUDA device raises on it."""
    store = MetricStore()
    for _ in range(3):
        store.log("m", torch.ones((), device="meta"), False, True, reduce, 2, False)
    total = store.epoch["m"].total
    assert isinstance(total, torch.Tensor) and total.device.type == "meta"


def test_max_and_min_are_exact():
    values = [torch.tensor(v) for v in (3.0, -1.0, 7.5, 2.0)]
    assert _epoch_value(values, "max") == 7.5
    assert _epoch_value(values, "min") == -1.0


# -- the batch types transfer promises, through DDP's and FSDP's re-packing ----------------
class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass
class Record:
    x: torch.Tensor
    tag: str = "r"


def _batches() -> list[Any]:
    t = torch.arange(4.0)
    default = collections.defaultdict(list, {"x": t, "y": [t, t]})
    return [
        [t, t],
        (t, t),
        Pair(t, t),
        {"x": t},
        collections.OrderedDict(x=t, y=(t,)),
        default,
        Record(t),
        {"outer": collections.defaultdict(int, x=t)},
    ]


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        if isinstance(a, collections.defaultdict):
            assert a.default_factory is b.default_factory
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif dataclasses.is_dataclass(a):
        assert a == b or torch.equal(a.x, b.x)


class RepackingDDP(torch.nn.Module):
    """DDP's forward as far as inputs go: with ``device_ids`` set it runs ``_to_kwargs``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Any) -> Any:
        moved, kwargs = _to_kwargs(inputs, {}, torch.device("cpu"), False)
        return self.module(*moved[0], **kwargs[0])


class Seen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batches.append(batch)
        return self.w * 1.0


def _ddp_step(module: Seen) -> strategy.Step:
    collectives = SimpleNamespace(
        backend="gloo", wrap=lambda router, device, find_unused: RepackingDDP(router)
    )
    config = SimpleNamespace(strategy="ddp", find_unused_parameters=None)
    stopping = SimpleNamespace(attach_vote=lambda router, device: None)
    configure = lambda: ([object()], [])  # noqa: E731
    cpu = torch.device("cpu")
    step, _ = strategy.build(config, collectives, cpu, module, configure, stopping)
    return step


@pytest.mark.parametrize("batch", _batches(), ids=lambda b: type(b).__name__)
def test_ddp_hands_training_step_the_batch_exactly(batch):
    module = Seen()
    _ddp_step(module).forward(batch, 0)
    (got,) = module.batches
    _same(batch, got)


@pytest.mark.parametrize("batch", _batches(), ids=lambda b: type(b).__name__)
def test_the_fsdp_root_hands_a_step_the_batch_exactly(batch):
    """The FSDP root's pre-forward re-packs its inputs with ``_to_kwargs`` on CUDA."""
    module = Seen()

    def root_pre_forward(_: Any, args: tuple, kwargs: dict) -> tuple:
        moved, moved_kwargs = _to_kwargs(args, kwargs, torch.device("cpu"), False)
        return moved[0], moved_kwargs[0]

    module.register_forward_pre_hook(root_pre_forward, with_kwargs=True)
    strategy.Step(None, None, module, sharded=True).call("training_step")(batch, 0)
    (got,) = module.batches
    _same(batch, got)


# -- the stop vote's wait on the GPU has a deadline ----------------------------------------
class NeverDone:
    queries = 0

    def query(self) -> bool:
        self.queries += 1
        return False


class Recorder:
    rank = 3

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.dumped: list[str] = []

    def record(self, event: str, name: str) -> None:
        self.events.append((event, name))

    def dump(self, reason: str, failure: bool = True) -> None:
        self.dumped.append(reason)


def test_wait_for_polls_with_a_growing_pause_until_done():
    class DoneAfterFour:
        n = 0

        def query(self) -> bool:
            self.n += 1
            return self.n > 4

    pauses: list[float] = []
    assert steps.wait_for(DoneAfterFour(), deadline=10.0, clock=lambda: 0.0, sleep=pauses.append)
    assert len(pauses) == 4 and pauses == sorted(pauses) and pauses[0] < pauses[-1] <= 0.05


def test_wait_for_gives_up_at_the_deadline():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    assert not steps.wait_for(NeverDone(), deadline=2.0, clock=lambda: now[0], sleep=sleep)
    assert now[0] == pytest.approx(2.0)


# ``StopVote._wait`` is the unit of the next two tests: its one caller is ``agreed`` on a CUDA
# device (it reads the votes a step late, from a copy it waits for), a path with no CPU run.
def test_a_stuck_vote_wait_dumps_the_trace_and_names_the_rank_before_the_timeout():
    recorder = Recorder()
    vote = steps.StopVote(torch.device("cpu"), recorder, timeout=5.0)
    assert steps.deadline_margin(5.0) == 0.5 and steps.deadline_margin(1800.0) == 60.0
    event = NeverDone()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 3: the gradient all-reduce .* never joined"):
        vote._wait(event, recorded_at=time.monotonic() - 4.4)  # 0.1 s left before 4.5 s
    assert time.monotonic() - started < 2.0 and event.queries > 1
    assert recorder.dumped and "rank 3" in recorder.dumped[0]
    assert recorder.events == [("start", steps.GRADIENT_SYNC)]  # the trace shows it open


class DoneAfter:
    """An event the GPU passes ``seconds`` after it was made."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def query(self) -> bool:
        return time.monotonic() >= self.at


def test_the_vote_gives_up_a_margin_before_its_trainers_collective_timeout():
    """Built for a trainer whose collective timeout is 42 s, the vote gives up at 37.8 s
    (4.2 s before), not a margin before the default 1800 s: a wait recorded 37.7 s ago gives
    up within about 0.1 s, before the event (done after 2 s) would have let it through."""
    trainer = SimpleNamespace(config=SimpleNamespace(timeout=42.0), global_step=0)
    recorder = Recorder()
    recorder.progress = trainer  # the trainer the vote reports on
    vote = steps.StopVote(torch.device("cpu"), recorder)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="has not finished after 38s"):
        vote._wait(DoneAfter(2.0), recorded_at=started - 37.7)
    assert time.monotonic() - started < 2.0


# -- the profiler times GPU work with CUDA events ------------------------------------------
class FakeEvent:
    """``torch.cuda.Event`` as the profiler uses it: each pair is 250 ms apart on the GPU."""

    made: list[FakeEvent] = []

    def __init__(self, enable_timing: bool = False, blocking: bool = False) -> None:
        assert enable_timing
        self.recorded = self.synced = False
        FakeEvent.made.append(self)

    def record(self, stream: Any = None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.recorded and end.recorded
        return 250.0


def test_the_profiler_times_cuda_work_with_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.made = []
    prof = profiler.SimpleProfiler()
    forward = prof.timed("forward", lambda x: time.sleep(0.01) or x, device=torch.device("cuda"))
    assert forward(1) == 1 and forward(2) == 2
    assert len(FakeEvent.made) == 4 and not any(e.synced for e in FakeEvent.made)
    assert prof.summary() == {"forward": (2, 0.5)}  # the events' time, not the CPU's 10 ms
    assert FakeEvent.made[-1].synced  # one wait, at the summary


def test_the_profiler_keeps_the_cpu_clock_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", None)  # never touched on the CPU path
    prof = profiler.SimpleProfiler()
    prof.timed("forward", lambda: time.sleep(0.02), device=torch.device("cpu"))()
    module = torch.nn.Linear(2, 1)
    prof.watch_module(module)
    module(torch.ones(1, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    prof.watch_optimizer(optimizer)
    optimizer.step()
    calls, seconds = prof.summary()["forward"]
    assert calls == 2 and seconds >= 0.02
    assert prof.summary()["optimizer step"][0] == 1


# -- the torch floor -----------------------------------------------------------------------
def test_pyproject_states_the_torch_floor_the_runtime_checks():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; we support 3.10)
    (floor,) = re.findall(r'^\s*"torch>=(\d+)\.(\d+)"', text, re.MULTILINE)
    assert (int(floor[0]), int(floor[1])) == strategy.MIN_TORCH == (2, 6)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401


def test_fsdp_on_an_older_torch_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"strategy='fsdp' needs torch>=2\.6.*torch 2\.5\.1"):
        strategy.check_torch_version("fsdp", "2.5.1+cu121")
    strategy.check_torch_version("ddp", "2.5.1")  # DDP does not need fully_shard
    strategy.check_torch_version("fsdp", "2.6.0")
    strategy.check_torch_version("fsdp", "2.13.0a0+git1234")


# -- a tensor goes to the backend's device, whatever device its caller built it on ---------
class _BackendDeviceSeen(Exception):
    pass


def test_all_reduce_hands_the_backend_a_tensor_on_the_backends_device(monkeypatch):
    """``meta`` stands in for ``cuda:LOCAL_RANK``: a CPU tensor (ModelCheckpoint's monitor
    pair, an example's empty fallback) must reach NCCL on the backend's device."""
    from disttrain.dist import collectives as dist_module

    seen: list[torch.device] = []

    def fake_all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None) -> None:
        seen.append(tensor.device)
        raise _BackendDeviceSeen  # a meta tensor cannot be copied back: stop here

    monkeypatch.setattr(dist_module.dist, "all_reduce", fake_all_reduce)
    collectives = dist_module.ProcessGroupCollectives(
        dist_module.DistEnv(launched=True), "nccl", torch.device("meta"), None, None, False
    )
    with pytest.raises(_BackendDeviceSeen):
        collectives.all_reduce(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert seen == [torch.device("meta")]


def test_all_reduce_gives_the_result_back_on_the_callers_device(monkeypatch):
    from disttrain.dist import collectives as dist_module

    def doubling(tensor: torch.Tensor, op: Any = None, group: Any = None) -> None:
        tensor.mul_(2)

    monkeypatch.setattr(dist_module.dist, "all_reduce", doubling)
    collectives = dist_module.ProcessGroupCollectives(
        dist_module.DistEnv(launched=True), "gloo", torch.device("cpu"), None, None, False
    )
    caller = torch.ones(2, dtype=torch.float64)
    assert collectives.all_reduce(caller) is caller and caller.tolist() == [2.0, 2.0]


# -- the CUDA RNG of this rank's own device ------------------------------------------------
def test_cuda_rng_is_saved_and_restored_for_the_ranks_own_device(monkeypatch):
    """Saved on local device 3 of a 4-GPU node, restored where only one device is visible
    (the rank's device is then index 0): the state goes to the current device, never to an
    index that the new layout does not have."""
    from disttrain import rng

    calls: list[tuple[str, Any]] = []
    state = torch.arange(8, dtype=torch.uint8)
    fake = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        current_device=lambda: 3,
        get_rng_state=lambda device: calls.append(("get", device)) or state,
        set_rng_state=lambda value, device: calls.append(("set", device)),
    )
    monkeypatch.setattr(torch, "cuda", fake)
    saved = rng.rng_state()
    assert calls == [("get", 3)] and torch.equal(saved["cuda"], state)
    fake.current_device = lambda: 0  # resumed on another layout
    rng.set_rng_state(saved)
    assert calls[-1] == ("set", 0)


# -- the object collectives read back payloads of any size ---------------------------------
@pytest.mark.parametrize("size", [2**31 + 7, 2**32 + 7], ids=["over-2GiB", "over-4GiB"])
def test_an_object_payload_of_2_gib_and_more_is_read_back_whole(monkeypatch, size):
    """``broadcast_object`` on rank 1 receiving a payload of ``size`` bytes from global zero
    (torch's broadcast faked: it hands over the size, then writes the pickle at the start of
    the received buffer). The buffer is allocated but only the pickle's pages are ever
    written, so it costs no memory beyond them. Pickle ignores what follows its end, so a
    reader that takes fewer bytes than the pickle (a C int size that wraps) fails, and one
    that copies the whole payload would touch gigabytes."""
    import pickle

    from disttrain.dist import collectives as dist_module

    obj = {"train_loss": ("mean", 1.5, 64.0), "blob": b"x" * 4096}
    pickled = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    received: list[int] = []

    def from_global_zero(tensor: torch.Tensor, src: int, group: Any = None) -> None:
        if not received:  # first the size, then the payload
            tensor.fill_(size)
        else:
            tensor[: len(pickled)] = pickled
        received.append(tensor.numel())

    monkeypatch.setattr(dist_module.dist, "broadcast", from_global_zero)
    collectives = dist_module.ProcessGroupCollectives(
        dist_module.DistEnv(rank=1, world_size=2, launched=True),
        "gloo",
        torch.device("cpu"),
        None,
        None,
        False,
    )
    assert collectives.broadcast_object(None) == obj
    assert received == [1, size]
