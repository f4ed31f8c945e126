"""The one place that runs a hook: on the ranks the table names, then the sync it names.

The plan for every hook (which callables, which sync) is worked out once when a run starts,
so ``call`` in the hot loop is a dict lookup and a loop over the callables that exist: a hook
nobody overrides costs nothing, and ``on_batch_start``'s agreement is only paid when the
module overrides it.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from disttrain.api.datamodule import DataModule
from disttrain.api.hooks import Callback, ModelHooks, overridden, warn_deprecated_overrides
from disttrain.api.lightning_names import warn_never_called
from disttrain.dist.collectives import Collectives
from disttrain.dist.env import DistEnv
from disttrain.dist.exits import NonFiniteLoss
from disttrain.dist.flight import ENTER, FINISH, GRADIENT_SYNC, LEAVE, START, FlightRecorder
from disttrain.dist.heartbeat import PeerSilent
from disttrain.ranks.table import ACTION_TABLE, Action, Hook, Ranks, Rule, Sync

if TYPE_CHECKING:
    from disttrain.observe.profiler import SimpleProfiler


class HookFailed(RuntimeError):
    """A hook raised on one or more ranks; every rank raises this, naming them."""

    def __init__(self, hook: Hook | Action, failed_ranks: list[int], messages: list[str]) -> None:
        self.hook, self.failed_ranks = hook, failed_ranks
        detail = "\n".join(f"  rank {r}: {messages[r]}" for r in failed_ranks)
        kind = "hook" if isinstance(hook, Hook) else "step"
        ranks = ", ".join(map(str, failed_ranks))
        super().__init__(f"{kind} '{hook.value}' failed on rank {ranks}:\n{detail}")


def error_text(error: BaseException) -> str:
    """An error as a verdict tells it to every rank: its type and message, no traceback."""
    return "".join(traceback.format_exception_only(error)).strip()


class HookRaised(RuntimeError):
    """A hook without a verdict raised on this rank; the launcher shows this message."""

    def __init__(self, hook: Hook, rank: int, error: BaseException) -> None:
        self.hook, self.rank = hook, rank
        super().__init__(f"rank {rank}: hook '{hook.value}' raised {type(error).__name__}: {error}")


class Dispatcher:
    """Runs every hook of a run where ``table`` says, then the sync it names: ``call(hook)``
    for hooks, ``run(action, fn)`` for the trainer's own work under ``ACTION_TABLE``. The
    plan per hook is made once here (``_plan``); ``caller(hook)`` hands the hot loop a hook's
    callable directly. ``collectives`` may be any ``Collectives``: the null one of a single
    process makes every sync free."""

    def __init__(
        self,
        table: Mapping[Hook, Rule],
        module: ModelHooks,
        callbacks: Sequence[Callback],
        trainer: object,
        env: DistEnv,
        collectives: Collectives,
        datamodule: DataModule | None = None,
        recorder: FlightRecorder | None = None,
        profiler: SimpleProfiler | None = None,
    ) -> None:
        self.collectives = collectives
        self.rank = env.rank
        self._stateful = [obj for obj in (datamodule, module) if obj is not None]
        self._actions = {action: runs_on(rule.ranks, env) for action, rule in ACTION_TABLE.items()}
        # hooks without a verdict get one callable each (they run on every batch); the rest
        # go through _call_with_verdict
        self._callers: dict[Hook, Callable[..., Any]] = {}
        self._verdicts: dict[Hook, tuple[Sync, bool, Callable[..., Any] | None]] = {}
        self._forbids_state = {hook for hook, rule in table.items() if rule.forbids_state}
        self._limited = {hook for hook, rule in table.items() if rule.ranks is not Ranks.ALL}
        self._waits_for = {hook: runner_of(rule.ranks, env) for hook, rule in table.items()}
        self.trainer = trainer  # what callbacks get as their first argument
        self.running_limited_hook: str | None = None  # Module.log refuses to run in it
        warn_deprecated_overrides(module, ModelHooks)
        warn_never_called(module, ModelHooks)
        if datamodule is not None:
            warn_never_called(datamodule, DataModule)
        for callback in callbacks:
            warn_deprecated_overrides(callback, Callback)
            warn_never_called(callback, Callback)
        self._implemented: set[Hook] = set()
        in_group = recorder is not None and collectives.backend != "none"
        for hook, rule in table.items():
            sync, runner = _plan(
                hook, rule, module, callbacks, trainer, datamodule, recorder, profiler, in_group
            )
            if runner is not None:
                self._implemented.add(hook)
            if sync is Sync.NONE or sync is Sync.AGREE_STOP:
                self._callers[hook] = _local_caller(hook, sync, runner, env.rank, collectives)
            else:
                self._verdicts[hook] = (sync, runs_on(rule.ranks, env), runner)

    def call(self, hook: Hook, *args: Any) -> Any:
        """Run ``hook`` where the table says, then its sync; return the module's result."""
        caller = self._callers.get(hook)
        if caller is not None:
            return caller(*args)
        return self._call_with_verdict(hook, *self._verdicts[hook], args)

    def caller(self, hook: Hook) -> Callable[..., Any]:
        """``call`` for a hook without a verdict, looked up once: what the hot loop holds."""
        if hook in self._verdicts:
            raise ValueError(f"hook '{hook.value}' ends in a verdict: run it with call()")
        return self._callers[hook]

    def implemented(self, hook: Hook) -> bool:
        """Whether anything runs for ``hook`` (a callback, the data module or the module):
        the loop prepares a hook's arguments only then."""
        return hook in self._implemented

    def runs_here(self, action: Action) -> bool:
        """Whether this rank does ``action``'s work (``ACTION_TABLE``)."""
        return self._actions[action]

    def run(self, action: Action, fn: Callable[..., Any], *args: Any) -> Any:
        """Run trainer work ``fn`` on the ranks ``ACTION_TABLE`` names, then its verdict
        (``Sync.LATER``: none; ``fn`` keeps its failure for where it is next waited for)."""
        sync = ACTION_TABLE[action].sync
        if sync is Sync.LATER:
            return fn(*args) if self._actions[action] else None
        return self._call_with_verdict(action, sync, self._actions[action], fn, args)

    def _call_with_verdict(self, hook, sync, runs_here, runner, args) -> Any:
        long = sync in (Sync.VERDICT_LONG, Sync.VERDICT_HEARTBEAT)
        watched = sync is Sync.VERDICT_HEARTBEAT
        result, error = None, None
        if runs_here:
            beat = self.collectives.beating(hook.value) if watched else contextlib.nullcontext()
            with beat:
                result, error = self._run_here(hook, runner, args)
        elif watched:
            self._wait_for(hook)
        failed = self.collectives.verdict(error is not None, long=long)
        if failed:
            text = "" if error is None else error_text(error)
            raise HookFailed(hook, failed, self.collectives.gather_text(text, long=long)) from error
        if sync is Sync.DECISION:
            return self.collectives.broadcast_object(result)
        return result

    def _run_here(self, hook, runner, args) -> tuple[Any, Exception | None]:
        """``runner(*args)`` on this rank: its result, or the error it raised."""
        if hook in self._limited:
            self.running_limited_hook = hook.value
        try:
            checked = self._stateful if hook in self._forbids_state else []
            before = [_state_of(obj) for obj in checked]
            result = runner(*args) if runner is not None else None
            for obj, state in zip(checked, before):
                _forbid_new_state(obj, state, _state_of(obj))
            return result, None
        except NonFiniteLoss:  # from a save, on every rank at once: no verdict to wait for
            raise
        except Exception as exc:
            return None, exc
        finally:
            self.running_limited_hook = None

    def _wait_for(self, hook: Hook) -> None:
        """Wait for the rank that runs ``hook`` for this one while its heartbeat goes on; if
        it stops, fail as its verdict would, naming that rank (which cannot take part)."""
        try:
            self.collectives.wait_for(hook.value, self._waits_for[hook])
        except PeerSilent as silent:
            messages = [""] * self.collectives.world_size
            messages[silent.rank] = str(silent)
            raise HookFailed(hook, [silent.rank], messages) from silent


def _plan(
    hook: Hook,
    rule: Rule,
    module: ModelHooks,
    callbacks: Sequence[Callback],
    trainer: object,
    datamodule: DataModule | None,
    recorder: FlightRecorder | None,
    profiler: SimpleProfiler | None,
    in_group: bool,
) -> tuple[Sync, Callable[..., Any] | None]:
    """How ``hook`` runs for this run, worked out once: the sync that follows it and one
    callable for the callbacks, the data module and the module (None if nobody implements
    it)."""
    name = hook.value
    implementers = [cb for cb in callbacks if rule.callbacks and overridden(cb, name, Callback)]
    observers: list[Callable[..., Any]] = [
        functools.partial(getattr(cb, name), trainer, module) for cb in implementers
    ]
    owners = [type(cb).__name__ for cb in implementers]
    if datamodule is not None and overridden(datamodule, name, DataModule):
        observers.append(getattr(datamodule, name))  # data before the model
        owners.append(type(datamodule).__name__)
    # Hooks that do work always run the module's method; notifications only if overridden.
    runs_module = not rule.callbacks or overridden(module, name, ModelHooks)
    target = getattr(module, name) if runs_module else None
    sync = rule.sync
    if sync is Sync.AGREE_STOP and target is None:
        sync = Sync.NONE  # nothing can return -1, so there is nothing to agree on
    if profiler is not None:  # timing exists only when asked for: zero cost otherwise
        observers = [profiler.timed(f"{owner}.{name}", o) for owner, o in zip(owners, observers)]
        if target is not None:
            target = profiler.timed(f"{type(module).__name__}.{name}", target)
    # the trace follows user code (where hangs come from) and, in a process group, the
    # gradient sync inside backward; the library's own default hooks are left out
    user_code = overridden(module, name, ModelHooks) or any(
        not type(cb).__module__.startswith("disttrain.") for cb in implementers
    )
    runner = _runner(name, observers, target, recorder if user_code else None)
    if hook is Hook.BACKWARD and runner is not None and recorder is not None and in_group:
        runner = _in_collective(GRADIENT_SYNC, runner, recorder)
    return sync, runner


def _runner(
    name: str,
    observers: list[Callable[..., Any]],
    target: Callable[..., Any] | None,
    recorder: FlightRecorder | None,
) -> Callable[..., Any] | None:
    """One callable per hook: the callbacks, then the module (whose result it returns),
    between the flight recorder's enter and leave. None when nobody implements the hook."""
    if not observers and target is None:
        return None
    if target is None:
        target = _nothing  # callbacks only: nothing of the module's runs
    if recorder is None:
        if not observers:
            return target

        def run_observers(*args: Any) -> Any:
            for observer in observers:
                observer(*args)
            return target(*args)

        return run_observers
    record = recorder.record

    if not observers:

        def run_target(*args: Any) -> Any:
            record(ENTER, name)
            result = target(*args)
            record(LEAVE, name)  # not reached if it raises or hangs: the trace shows where
            return result

        return run_target

    def run_all(*args: Any) -> Any:
        record(ENTER, name)
        for observer in observers:
            observer(*args)
        result = target(*args)
        record(LEAVE, name)
        return result

    return run_all


def _local_caller(
    hook: Hook,
    sync: Sync,
    runner: Callable[..., Any] | None,
    rank: int,
    collectives: Collectives,
) -> Callable[..., Any]:
    """``call`` for a hook without a verdict: its exception becomes ``HookRaised`` naming the
    rank; ``AGREE_STOP`` then agrees on a -1. Holds no reference to the dispatcher (a cycle
    would keep the process group alive until interpreter exit)."""
    if runner is None:  # nobody implements it: nothing to run, nothing to agree on
        return _nothing

    def run(*args: Any) -> Any:
        try:  # costs nothing unless a hook raises
            return runner(*args)
        except (HookFailed, HookRaised, NonFiniteLoss):  # the last: every rank, from a save
            raise
        except Exception as exc:
            raise HookRaised(hook, rank, exc) from exc

    if sync is Sync.NONE:
        return run
    any_true = collectives.any_true

    def run_and_agree(*args: Any) -> Any:
        return agree_on_minus_one(run(*args), any_true)

    return run_and_agree


def agree_on_minus_one(result: Any, any_true: Callable[[bool], bool]) -> Any:
    """``on_batch_start``'s agreement: -1 on any rank is -1 on every rank."""
    return -1 if any_true(result == -1) else result


def _in_collective(name: str, runner: Any, recorder: FlightRecorder) -> Callable[..., Any]:
    """``runner`` between a collective's start and finish in the trace: the gradient sync
    runs inside backward (DDP's all-reduce, FSDP's reduce-scatter), in C++, where nothing
    else could record it for the hang report."""
    record = recorder.record

    def run(*args: Any) -> Any:
        record(START, name)
        result = runner(*args)  # if it raises (a collective's timeout), the trace stays open
        record(FINISH, name)
        return result

    return run


def _nothing(*args: Any) -> None:
    return None


def runner_of(ranks: Ranks, env: DistEnv) -> int:
    """The global rank that runs a hook limited to ``ranks`` for this rank: global zero, or
    this node's local zero (torchrun numbers a node's ranks consecutively)."""
    return env.rank - env.local_rank if ranks is Ranks.LOCAL_ZERO else 0


def runs_on(ranks: Ranks, env: DistEnv) -> bool:
    if ranks is Ranks.GLOBAL_ZERO:
        return env.rank == 0
    if ranks is Ranks.LOCAL_ZERO:
        return env.local_rank == 0
    return True


_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _state_of(module: object) -> dict[str, int]:
    """Identity of every attribute, parameter, buffer and submodule of ``module``."""
    state = {k: id(v) for k, v in vars(module).items() if k not in _CONTAINERS}
    for container in _CONTAINERS:
        state.update({k: id(v) for k, v in vars(module).get(container, {}).items()})
    return state


def _forbid_new_state(obj: object, before: dict[str, int], after: dict[str, int]) -> None:
    changed = sorted(k for k, v in after.items() if before.get(k) != v)
    if changed:
        raise RuntimeError(
            f"assigned {type(obj).__name__} state ({', '.join('self.' + k for k in changed)}). "
            "This hook runs on some ranks only, so the other ranks would not have it: "
            "assign state in setup(stage) instead."
        )
