"""The dispatcher on its own: one process playing one rank of a larger job, with a fake
``Collectives`` that scripts what the other ranks did and records every collective called.

These are unit tests of ``disttrain.ranks.dispatch`` against ``HOOK_TABLE``: which ranks run a
hook, which collective follows it (and which hooks cost none), how a failure on this rank or on
another becomes the same ``HookFailed`` everywhere. The real process groups are in
test_distributed.py and test_stopping.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from disttrain.api.hooks import Callback, ModelHooks
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv
from disttrain.dist.heartbeat import PeerSilent
from disttrain.ranks.dispatch import Dispatcher, HookFailed, HookRaised
from disttrain.ranks.table import Action, Hook, hook_schedule


class FakeWorld(Collectives):
    """This process as one rank of ``world_size``; the other ranks' side is scripted.

    ``failures``: rank -> message of the ranks that fail the next verdict besides this one;
    ``zero_says``: what global zero broadcasts; ``others_true``: whether another rank votes
    true in ``any_true``. ``calls`` lists every collective called, in order.
    """

    backend = "fake"

    def __init__(
        self,
        rank: int,
        world_size: int,
        failures: dict[int, str] | None = None,
        zero_says: Any = None,
        others_true: bool = False,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.failures = failures or {}
        self.zero_says, self.others_true = zero_says, others_true
        self.calls: list[tuple[str, bool]] = []
        self.silent = False  # True: the rank this one waits for stops beating
        self._mine = ""

    def verdict(self, failed: bool, *, long: bool = False) -> list[int]:
        self.calls.append(("verdict", long))
        ranks = set(self.failures) | ({self.rank} if failed else set())
        return sorted(ranks)

    def gather_text(self, text: str, *, long: bool = False) -> list[str]:
        self.calls.append(("gather_text", long))
        return [
            text if r == self.rank else self.failures.get(r, "") for r in range(self.world_size)
        ]

    def any_true(self, flag: bool) -> bool:
        self.calls.append(("any_true", False))
        return flag or self.others_true

    def broadcast_object(self, obj: Any) -> Any:
        self.calls.append(("broadcast_object", False))
        return obj if self.rank == 0 else self.zero_says

    def beating(self, name: str) -> Any:
        self.calls.append((f"beating through {name}", False))
        return super().beating(name)

    def wait_for(self, name: str, rank: int) -> None:
        self.calls.append((f"waiting for rank {rank}'s {name}", False))
        if self.silent:
            raise PeerSilent(rank, f"rank {rank} stopped sending its {name} heartbeat")


class Recording(ModelHooks):
    """A module that writes down each hook it runs."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def prepare_data(self) -> None:
        self.ran.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.ran.append(f"setup:{stage}")

    def on_epoch_start(self) -> None:
        self.ran.append("on_epoch_start")


class Notes(Callback):
    def __init__(self, ran: list[str]) -> None:
        self.ran = ran

    def on_epoch_start(self, trainer: Any, module: Any) -> None:
        self.ran.append(f"callback sees {trainer}")


def dispatcher(module: ModelHooks, world: FakeWorld, local_rank: int | None = None, **kw: Any):
    env = DistEnv(
        rank=world.rank,
        local_rank=world.rank if local_rank is None else local_rank,
        world_size=world.world_size,
        local_world_size=world.world_size,
        launched=True,
    )
    table = hook_schedule(kw.pop("prepare_data_per_node", False))
    return Dispatcher(table, module, kw.pop("callbacks", []), "the trainer", env, world, **kw)


# -- on which ranks a hook runs -----------------------------------------------------------
@pytest.mark.parametrize("rank, runs", [(0, True), (1, False), (2, False)])
def test_prepare_data_runs_on_global_zero_the_others_wait_on_its_heartbeat_then_a_verdict(
    rank, runs
):
    module, world = Recording(), FakeWorld(rank, 3)
    dispatcher(module, world).call(Hook.PREPARE_DATA)
    assert module.ran == (["prepare_data"] if runs else [])
    wait = "beating through prepare_data" if runs else "waiting for rank 0's prepare_data"
    assert world.calls == [(wait, False), ("verdict", True)]  # then the barrier, on every rank


@pytest.mark.parametrize("rank, local_rank, runs", [(2, 0, True), (3, 1, False)])
def test_prepare_data_per_node_runs_on_each_local_zero_and_its_node_waits_for_it(
    rank, local_rank, runs
):
    module, world = Recording(), FakeWorld(rank, 4)  # ranks 2, 3: the second node
    dispatcher(module, world, local_rank=local_rank, prepare_data_per_node=True).call(
        Hook.PREPARE_DATA
    )
    assert module.ran == (["prepare_data"] if runs else [])
    wait = "beating through prepare_data" if runs else "waiting for rank 2's prepare_data"
    assert world.calls[0] == (wait, False)


def test_a_silent_heartbeat_fails_the_waiting_rank_naming_the_silent_one_without_a_verdict():
    world = FakeWorld(1, 2)
    world.silent = True
    with pytest.raises(HookFailed, match="hook 'prepare_data' failed on rank 0") as failed:
        dispatcher(Recording(), world).call(Hook.PREPARE_DATA)
    assert failed.value.failed_ranks == [0]
    assert "rank 0 stopped sending its prepare_data heartbeat" in str(failed.value)
    assert world.calls == [("waiting for rank 0's prepare_data", False)]  # nobody to agree with


def test_the_trainers_own_work_runs_where_its_action_says():
    written: list[str] = []
    for rank in (0, 1):
        world = FakeWorld(rank, 2)
        dispatcher(Recording(), world).run(Action.WRITE_CHECKPOINT, written.append, f"by {rank}")
        assert world.calls == [("verdict", False)]
    assert written == ["by 0"]


def test_a_decision_is_global_zeros_result_on_every_rank():
    chosen = []
    for rank in (0, 1):
        world = FakeWorld(rank, 2, zero_says="epoch=3.ckpt")
        choice = dispatcher(Recording(), world).run(Action.MANAGE_FILES, lambda: "epoch=3.ckpt")
        chosen.append(choice)
        assert world.calls == [("verdict", False), ("broadcast_object", False)]
    assert chosen == ["epoch=3.ckpt", "epoch=3.ckpt"]


# -- what a hook costs ----------------------------------------------------------------------
def test_a_notification_hook_runs_callbacks_first_and_calls_no_collective():
    module, world = Recording(), FakeWorld(1, 2)
    dispatch = dispatcher(module, world, callbacks=[Notes(module.ran)])
    dispatch.caller(Hook.ON_EPOCH_START)()
    assert module.ran == ["callback sees the trainer", "on_epoch_start"]
    assert world.calls == []


def test_a_hook_nobody_overrides_runs_nothing_and_agrees_on_nothing():
    world = FakeWorld(0, 2, others_true=True)
    assert dispatcher(Recording(), world).call(Hook.ON_BATCH_START, "batch") is None
    assert world.calls == []  # on_batch_start's agreement is paid only by those who override it
    assert dispatcher(Recording(), world).call(Hook.ON_TRAIN_BATCH_START, "batch", 0) is None
    assert world.calls == []  # nor is on_train_batch_start's


def test_implemented_says_whether_anything_runs_for_a_hook():
    module, world = Recording(), FakeWorld(0, 2)
    plain = dispatcher(module, world)
    with_callback = dispatcher(module, world, callbacks=[Notes(module.ran)])
    assert plain.implemented(Hook.ON_EPOCH_START)  # the module overrides it
    assert not plain.implemented(Hook.ON_BEFORE_OPTIMIZER_STEP)
    assert with_callback.implemented(Hook.ON_EPOCH_START)
    assert not with_callback.implemented(Hook.ON_TRAIN_BATCH_END)


def test_a_hook_with_a_verdict_cannot_be_held_as_a_plain_caller():
    with pytest.raises(ValueError, match="'setup' ends in a verdict"):
        dispatcher(Recording(), FakeWorld(0, 2)).caller(Hook.SETUP)


# -- agreement ------------------------------------------------------------------------------
class StopsOn(ModelHooks):
    def __init__(self, answer: int | None) -> None:
        self.answer = answer

    def on_batch_start(self, batch: Any) -> int | None:
        return self.answer

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return self.answer


@pytest.mark.parametrize(
    "mine, others_true, agreed", [(None, False, None), (None, True, -1), (-1, False, -1)]
)
def test_minus_one_from_on_batch_start_on_any_rank_is_minus_one_on_every_rank(
    mine, others_true, agreed
):
    world = FakeWorld(1, 2, others_true=others_true)
    assert dispatcher(StopsOn(mine), world).call(Hook.ON_BATCH_START, "batch") == agreed
    assert world.calls == [("any_true", False)]
    world = FakeWorld(1, 2, others_true=others_true)
    assert dispatcher(StopsOn(mine), world).call(Hook.ON_TRAIN_BATCH_START, "batch", 0) == agreed
    assert world.calls == [("any_true", False)]


# -- failures -------------------------------------------------------------------------------
class FailsIn(Recording):
    def setup(self, stage: str) -> None:
        raise ValueError(f"no data for {stage}")


def test_a_hook_failing_here_fails_every_rank_naming_this_rank_and_its_error():
    world = FakeWorld(1, 3)
    with pytest.raises(HookFailed) as failed:
        dispatcher(FailsIn(), world).call(Hook.SETUP, "fit")
    assert failed.value.failed_ranks == [1]
    assert "hook 'setup' failed on rank 1" in str(failed.value)
    assert "rank 1: ValueError: no data for fit" in str(failed.value)
    assert world.calls == [("verdict", True), ("gather_text", True)]


def test_a_hook_failing_on_another_rank_fails_this_rank_too_with_that_ranks_message():
    module, world = Recording(), FakeWorld(0, 3, failures={2: "OSError: disk full"})
    with pytest.raises(HookFailed) as failed:
        dispatcher(module, world).call(Hook.SETUP, "fit")
    assert module.ran == ["setup:fit"]  # it ran here, and still every rank stops
    assert failed.value.failed_ranks == [2]
    assert "rank 2: OSError: disk full" in str(failed.value)


def test_a_hook_without_a_verdict_names_its_rank_and_hook_when_it_raises():
    class Broken(Recording):
        def on_epoch_start(self) -> None:
            raise KeyError("lr")

    world = FakeWorld(1, 2)
    with pytest.raises(HookRaised, match="rank 1: hook 'on_epoch_start' raised KeyError"):
        dispatcher(Broken(), world).call(Hook.ON_EPOCH_START)
    assert world.calls == []  # the launcher's failure handling, not a collective, stops the job


def test_state_assigned_in_prepare_data_is_refused_on_the_rank_that_ran_it():
    class Assigns(Recording):
        def prepare_data(self) -> None:
            self.vocabulary = ["a", "b"]

    with pytest.raises(HookFailed, match=r"self\.vocabulary.*assign state in setup"):
        dispatcher(Assigns(), FakeWorld(0, 2)).call(Hook.PREPARE_DATA)
