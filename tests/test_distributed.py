"""Rank behaviour on real torchrun launches (gloo): agreements, verdicts, sharding, correctness.

Each test's torchrun ranks run the scenario function written above it (``conftest.run_beside``);
the sharding and correctness tests read one launch of both (``on_two_ranks``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from common import (
    IndexedData,
    Regressor,
    StatefulPrepare,
    TwoHeads,
    read_results,
    run_scenario,
    run_scenarios,
    write_result,
)
from conftest import run_beside, shared_launch

import disttrain
from disttrain import HookFailed, Trainer


# -- prepare_data fails on global zero -----------------------------------------------------
class FailingPrepare(Regressor):
    def prepare_data(self):
        raise OSError("disk full while writing the cache")


def _expect_hook_failure(outdir, module):
    """Fit ``module``; write the HookFailed this rank raised (or that none came), re-raise."""
    trainer = Trainer(max_epochs=1, prepare_data_timeout=60)
    try:
        trainer.fit(module)
    except HookFailed as err:
        write_result(outdir, trainer.global_rank, {"error": str(err), "ranks": err.failed_ranks})
        raise
    write_result(outdir, trainer.global_rank, {"error": None})


def prepare_fails(outdir):
    _expect_hook_failure(outdir, FailingPrepare())


def prepare_assigns_state(outdir):
    _expect_hook_failure(outdir, StatefulPrepare())  # assigns self.vocab


@pytest.mark.parametrize(
    "name, needle",
    [
        ("prepare_fails", "OSError: disk full while writing the cache"),
        ("prepare_assigns_state", "self.vocab"),
    ],
)
def test_prepare_data_failure_reaches_every_rank_naming_rank_zero(tmp_path, name, needle):
    outdir = tmp_path / "out"
    start = time.monotonic()
    proc = run_beside(__file__, name, outdir, expect_ok=False, timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    for rank, result in enumerate(read_results(outdir, 2)):
        assert result["ranks"] == [0], rank
        assert "hook 'prepare_data' failed on rank 0" in result["error"], rank
        assert needle in result["error"], rank


# -- the split of the data -----------------------------------------------------------------
def data_sharding(outdir):
    """Shuffled training shards per epoch, and an exact evaluation of an odd-sized set."""
    module = Regressor(n_train=16, n_val=7, batch_size=2, shuffle=True)
    per_epoch = {}

    class Track(disttrain.Callback):
        def on_epoch_end(self, trainer, m):
            per_epoch[trainer.current_epoch] = list(m.seen)
            m.seen.clear()

    trainer = Trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Track()], seed=7)
    trainer.fit(module)
    module.val_seen.clear()
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, {"train": per_epoch, "val": module.val_seen})


def test_training_shards_are_disjoint_cover_the_data_and_reshuffle_each_epoch(two_ranks):
    results = read_results(two_ranks / "data_sharding", 2)
    orders = []
    for epoch in ("0", "1"):
        shards = [r["train"][epoch] for r in results]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(16))
        orders.append(shards[0])
    assert orders[0] != orders[1]
    # validation over 7 samples at world size 2: each sample exactly once
    assert sorted(results[0]["val"] + results[1]["val"]) == list(range(7))


# -- the same weights as a hand-written loop -----------------------------------------------
# each case: the module's class and the trainer's options; 2 epochs of 16 samples, batches
# of 2 per rank, shuffled with seed 3
CASES = {
    "plain": (Regressor, {}),
    "accumulate_clip": (Regressor, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}),
    "two_optimizers": (TwoHeads, {"accumulate_grad_batches": 2}),
}


def correctness(outdir):
    """Each case of CASES trained on the ranks; writes its final weights."""
    results = {}
    for name, (cls, options) in CASES.items():
        disttrain.seed_everything(0)
        module = cls(n_train=16, batch_size=2, shuffle=True)
        root = f"runs/{name}"  # each run its own directory: a fresh fit never mixes them
        trainer = Trainer(
            max_epochs=2, num_sanity_val_steps=0, seed=3, default_root_dir=root, **options
        )
        trainer.fit(module)
        results[name] = {k: v.tolist() for k, v in module.state_dict().items()}
    write_result(outdir, trainer.global_rank, results)


def _hand_written(cls, options, world_size=2, batch_size=2, n=16, epochs=2, seed=3):
    """The same training as disttrain's at ``world_size``, as one process over global batches."""
    disttrain.seed_everything(0)
    model = cls(n_train=n, batch_size=batch_size, shuffle=True)
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    accumulate = options.get("accumulate_grad_batches", 1)
    clip = options.get("gradient_clip_val")
    data = IndexedData(n)
    per_rank = n // world_size // batch_size
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        shards = [order[r::world_size] for r in range(world_size)]
        for step in range(per_rank):
            idx = [i for s in shards for i in s[step * batch_size : (step + 1) * batch_size]]
            x, y = data.x[idx], data.y[idx]
            for k in range(len(optimizers)):
                args = (k,) if len(optimizers) > 1 else ()
                loss = model.training_step((x, y, torch.tensor(idx)), step, *args)
                (loss / accumulate).backward()
            if (step + 1) % accumulate == 0 or step + 1 == per_rank:
                for opt in optimizers:
                    if clip:
                        params = [p for g in opt.param_groups for p in g["params"]]
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    opt.zero_grad()
    return model.state_dict()


def test_two_rank_ddp_matches_a_hand_written_single_process_loop(two_ranks):
    rank0, rank1 = read_results(two_ranks / "correctness", 2)
    for name, (cls, options) in CASES.items():
        expected = _hand_written(cls, options)
        for key, value in expected.items():
            got0, got1 = torch.tensor(rank0[name][key]), torch.tensor(rank1[name][key])
            assert torch.equal(got0, got1), f"{name}: ranks disagree on {key}"
            torch.testing.assert_close(got0, value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        initial = cls(n_train=16)
        assert not torch.allclose(
            torch.tensor(rank0[name]["net.0.weight"]), initial.state_dict()["net.0.weight"]
        )


# -- gathering objects: one all-gather once the slot fits ----------------------------------
def object_gather(outdir):
    from disttrain.dist import collectives as module
    from disttrain.dist.env import DistEnv

    env = DistEnv.from_environ()
    collectives = module.connect(env, torch.device("cpu"), 60.0, 60.0)
    calls = []
    real = module.dist.all_gather
    module.dist.all_gather = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    sizes = {"small": 10, "grown": 20_000, "again": 20_000, "one rank longer": 0}
    seen = {}
    for case, size in sizes.items():
        size = size or (50_000 if env.rank == 1 else 5)  # only rank 1's outgrows the slot
        before = len(calls)
        got = collectives.gather_object((env.rank, "x" * size))
        seen[case] = {"got": [[r, len(text)] for r, text in got], "calls": len(calls) - before}
    module.dist.all_gather = real
    collectives.close()
    write_result(outdir, env.rank, seen)


def test_gathered_objects_take_one_all_gather_once_the_slot_has_grown_to_fit(tmp_path):
    """Every rank's object on every rank, at world size 3: a first object larger than the
    slot costs a second all-gather and grows the slot (alike on every rank), so the next
    one of that size costs one; one rank's object outgrowing it alone is gathered too."""
    run_beside(__file__, "object_gather", tmp_path, nproc=3, timeout=90)
    results = read_results(tmp_path, 3)
    assert results[0] == results[1] == results[2]
    expected_calls = {"small": 1, "grown": 2, "again": 1, "one rank longer": 2}
    for case, calls in expected_calls.items():
        got = results[0][case]
        assert got["calls"] == calls, (case, got)
    assert results[0]["grown"]["got"] == [[0, 20_000], [1, 20_000], [2, 20_000]]
    assert results[0]["one rank longer"]["got"] == [[0, 5], [1, 50_000], [2, 5]]


def on_two_ranks(outdir):
    """Both 2-rank runs that end normally in one launch, each in its own directory
    (``OUTDIR/NAME``)."""
    run_scenarios(outdir, data_sharding, correctness)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory) -> Path:
    """``on_two_ranks``, launched once in the test session (``conftest.shared_launch``) for the
    tests that read it."""

    return shared_launch(
        tmp_path_factory, "distributed-two_ranks", __file__, "on_two_ranks", timeout=180
    )


if __name__ == "__main__":
    run_scenario(globals())
