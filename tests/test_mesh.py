"""Layouts on a device mesh, CPU/gloo at 4 ranks: DDP, FSDP, HSDP (2 x 2) and FSDP + tensor
parallelism (dp 2 x tp 2) train to the same losses and gradient norms on the same data; the
tensor-parallel ranks of a data group read the same batches, the data groups disjoint ones;
metrics count each sample once; HSDP across two launcher agents shards within each "node".

Each test's torchrun ranks run the scenario function written above it (``conftest.run_beside``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from common import IndexedData, Regressor, read_results, run_scenario, write_result
from conftest import LAUNCHED_PATH, _descendants, _run_group, run_beside
from test_lifecycle import expected_fit, recorded_fit
from torch.utils.data import DataLoader

import disttrain
from disttrain import ModelCheckpoint, Trainer
from disttrain.config.layout import resolve_layout
from disttrain.config.options import ConfigError, TrainerConfig
from disttrain.data.streams import ShardedStream
from disttrain.dist.env import DistEnv

N_TRAIN, N_VAL = 64, 10


class Parallel(Regressor):
    """``net`` = Linear(4, 16) -> Tanh -> Linear(16, 1): column-wise then row-wise parallel
    under ``mesh["tp"]``; records its losses, the gradient norm before each clip, the
    samples it trained and the mesh's groups."""

    def __init__(self, batch_size):
        super().__init__(n_train=N_TRAIN, n_val=N_VAL, batch_size=batch_size, shuffle=True)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.losses, self.norms, self.groups = [], [], {}

    def configure_model(self, mesh):
        if mesh is None:
            return
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        from disttrain.dist.mesh import DIMS, group_ranks

        self.groups = {dim: group_ranks(mesh, dim) for dim in DIMS}
        if mesh["tp"].size() > 1:
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, mesh["tp"], plan)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), float("inf"))
        self.norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        self.val_seen.extend(idx.tolist())
        self.log("val_n", float(len(y)), reduce="sum")
        self.log("val_mse", ((self(x) - y) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


LAYOUTS = {  # name: (options, per-rank batch size): every step reads the same 16 samples
    "ddp": ({"strategy": "ddp"}, 4),
    "fsdp": ({"strategy": "fsdp"}, 4),
    "hsdp": ({"strategy": "hsdp", "mesh": {"dp_shard": 2}}, 4),
    "fsdp_tp": ({"strategy": "fsdp", "mesh": {"tp": 2}}, 8),
    # a 3-D mesh, 2 replicas x 1 shard x tp 2 (a shard group of one rank: 4 ranks allow no more)
    "hsdp_tp": ({"strategy": "hsdp", "mesh": {"dp_shard": 1, "tp": 2}}, 8),
}


class Streamed(Parallel):
    """``Parallel`` reading a ``ShardedStream`` of 8 shards of 8 samples each."""

    def train_dataloader(self):
        data = IndexedData(N_TRAIN)
        stream = ShardedStream(range(8), lambda s: (data[i] for i in range(8 * s, 8 * s + 8)))
        return DataLoader(stream, batch_size=self.batch_size)


def layouts(outdir):
    """Each layout in turn on the same 4 ranks: one epoch, 4 micro-batches of 16 samples in
    all, accumulating 2, clipping at 0.5, validation at the end."""
    result = {}
    for name, (options, batch_size) in LAYOUTS.items():
        disttrain.seed_everything(0)
        module = Parallel(batch_size)
        trainer = Trainer(
            max_epochs=1,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            logger=False,
            accumulate_grad_batches=2,
            gradient_clip_val=0.5,
            **options,
        )
        trainer.fit(module)
        local = sum(getattr(p, "_local_tensor", p).numel() for p in module.parameters())
        result[name] = {
            "losses": module.losses,
            "norms": module.norms,
            "seen": module.seen,
            "val_seen": module.val_seen,
            "groups": module.groups,
            "param_elements": local,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
    module = Streamed(batch_size=8)  # a stream under dp 2 x tp 2: read by data rank too
    Trainer(max_epochs=1, logger=False, enable_checkpointing=False, **LAYOUTS["fsdp_tp"][0]).fit(
        module
    )
    result["stream_seen"] = module.seen
    recorder, _ = recorded_fit(strategy="hsdp", mesh={"dp_shard": 2}, enable_checkpointing=False)
    result["hsdp_calls"] = recorder.calls
    write_result(outdir, int(os.environ["RANK"]), result)


def _global_losses(results, name, ranks):
    """Per micro-batch, the mean of the local losses over ``ranks`` (one per data group)."""
    per_rank = [results[r][name]["losses"] for r in ranks]
    return [sum(step) / len(step) for step in zip(*per_rank)]


def test_ddp_fsdp_hsdp_and_tensor_parallel_train_alike_on_a_mesh(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "layouts", outdir, nproc=4, timeout=300)
    results = read_results(outdir, 4)
    ddp = _global_losses(results, "ddp", range(4))
    assert len(ddp) == 4  # 64 samples, 16 a micro-batch
    for name in ("fsdp", "hsdp"):
        assert _global_losses(results, name, range(4)) == pytest.approx(ddp, rel=1e-5), name
    for name in ("fsdp_tp", "hsdp_tp"):
        assert _global_losses(results, name, [0, 2]) == pytest.approx(ddp, rel=1e-5), name
    for r in range(4):  # the norms before clipping (every step clips: > 0.5), as DDP's
        norms = results[r]["ddp"]["norms"]
        assert min(norms) > 0.5
        for name in ("fsdp", "hsdp", "fsdp_tp", "hsdp_tp"):
            assert results[r][name]["norms"] == pytest.approx(norms, rel=1e-5), (r, name)
    # hsdp: shard groups {0,1} {2,3}, replicated across them; each rank half of the elements
    assert [results[r]["hsdp"]["groups"]["dp_shard"] for r in range(4)] == [[0, 1]] * 2 + [
        [2, 3]
    ] * 2
    assert results[0]["hsdp"]["groups"]["dp_replicate"] == [0, 2]
    # dp 2 x tp 2: ranks (0, 1) and (2, 3) are tensor-parallel pairs reading the same batches
    tp = [results[r]["fsdp_tp"] for r in range(4)]
    assert [t["groups"]["tp"] for t in tp] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert tp[0]["seen"] == tp[1]["seen"] and tp[2]["seen"] == tp[3]["seen"]
    assert tp[0]["losses"] == tp[1]["losses"]
    assert sorted(tp[0]["seen"] + tp[2]["seen"]) == list(range(N_TRAIN))  # disjoint, all
    assert sorted(tp[0]["val_seen"] + tp[2]["val_seen"]) == list(range(N_VAL))
    streamed = [results[r]["stream_seen"] for r in range(4)]
    assert streamed[0] == streamed[1] and streamed[2] == streamed[3]
    assert sorted(streamed[0] + streamed[2]) == list(range(N_TRAIN))
    full = results[0]["ddp"]["param_elements"]  # 97 parameter elements
    assert results[0]["hsdp"]["param_elements"] < 0.6 * full
    assert results[0]["fsdp_tp"]["param_elements"] < 0.35 * full  # a quarter, rounded up
    assert results[0]["hsdp_tp"]["groups"]["dp_replicate"] == [0, 2]
    reference = results[0]["ddp"]["metrics"]["val_mse"]
    for r in range(4):  # each sample counted once: tp replicas do not count twice
        for name in LAYOUTS:
            metrics = results[r][name]["metrics"]
            assert metrics["val_n"] == N_VAL, (r, name)
            assert metrics["val_mse"] == pytest.approx(reference, rel=1e-5), (r, name)
        # the golden hook order (test_lifecycle) under HSDP 2 x 2: 7 validation samples, 1
        # batch of 2 a rank at 4 data ranks
        golden = [c for c in expected_fit(r, 2, 2, 1, 1) if "checkpoint" not in c]
        assert results[r]["hsdp_calls"] == golden, r  # (run without checkpoints)


def test_mesh_option_errors_name_the_key_and_the_numbers():
    with pytest.raises(ConfigError, match=r"mesh\.pp: unknown mesh dimension"):
        TrainerConfig(strategy="fsdp", mesh={"pp": 2})
    with pytest.raises(ConfigError, match=r"mesh: a device mesh needs strategy"):
        TrainerConfig(strategy="ddp", mesh={"tp": 2})
    with pytest.raises(ConfigError, match=r"mesh\.dp_replicate: is 2: .* strategy='hsdp'"):
        TrainerConfig(strategy="fsdp", mesh={"dp_replicate": 2})
    with pytest.raises(ConfigError, match=r"mesh\.tp: must be an int >= 1"):
        TrainerConfig(strategy="fsdp", mesh={"tp": 0})
    env = DistEnv(rank=0, world_size=6, local_world_size=3, launched=True)
    with pytest.raises(ConfigError, match=r"tp=4 is 8 ranks .* WORLD_SIZE is 6"):
        resolve_layout(TrainerConfig(strategy="fsdp", mesh={"dp_shard": 2, "tp": 4}), env)
    hsdp = resolve_layout(TrainerConfig(strategy="hsdp"), env)  # a node: one shard group
    assert (hsdp.dp_replicate, hsdp.dp_shard, hsdp.tp, hsdp.hybrid) == (2, 3, 1, True)
    assert resolve_layout(TrainerConfig(strategy="fsdp"), env) is None  # every rank
    assert resolve_layout(TrainerConfig(strategy="hsdp"), DistEnv()) is None  # debug mode
    with pytest.raises(ConfigError, match=r"trainer\.mesh\.tp"):
        TrainerConfig.from_mapping({"strategy": "hsdp", "mesh": {"tp": "2"}}, prefix="trainer.")


def test_the_debug_mode_calls_configure_model_without_a_mesh(tmp_path):
    """One process: no mesh, the module runs as it is; the hook still runs, with None."""
    seen = []

    class Once(Parallel):
        def configure_model(self, mesh):
            seen.append(mesh)

    Trainer(
        strategy="hsdp", mesh={"tp": 2}, max_steps=1, logger=False, enable_checkpointing=False
    ).fit(Once(batch_size=4))
    assert seen == [None]


# -- sharded checkpoints across meshes ------------------------------------------------------
class Exporting(Parallel):
    """``Parallel`` exporting its whole weights at the end of fit (collective)."""

    def __init__(self, batch_size, export):
        super().__init__(batch_size)
        self.export = export

    def on_fit_end(self):
        self.trainer.export_weights(self.export)


def _mesh_run(root, name, run, batch_size=8, **options):
    """``Exporting`` for 2 epochs of 4 steps (64 samples) into ``root/run``, exported to
    ``root/NAME.pt``; dp 2 x tp 2 unless ``options`` say otherwise. Returns its steps."""
    disttrain.seed_everything(0)
    module = Exporting(batch_size, str(Path(root) / f"{name}.pt"))
    options = {"strategy": "fsdp", "mesh": {"tp": 2}, **options}
    Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        seed=1,
        default_root_dir=str(Path(root) / run),
        logger=False,
        callbacks=[ModelCheckpoint(keep_last_k=5)],
        **options,
    ).fit(module)
    return len(module.losses)


def mesh_checkpoints(outdir):
    """dp 2 x tp 2: stopped after step 6 (mid-epoch), resumed, against a full run; then the
    step-6 checkpoint resumed by plain FSDP over 4 ranks (4 x 1), which trains the rest."""
    steps = {
        "full": _mesh_run(outdir, "full", "full"),
        "stopped": _mesh_run(outdir, "at_step_6", "stopped", max_steps=6),
        "resumed": _mesh_run(outdir, "resumed", "stopped", resume="auto"),
    }
    ckpt = Path(outdir) / "stopped" / "checkpoints" / "epoch=1-step=6.ckpt"
    steps["fsdp4"] = _mesh_run(
        outdir, "fsdp4", "fsdp4", strategy="fsdp", mesh=None, resume=str(ckpt)
    )
    write_result(outdir, int(os.environ["RANK"]), steps)


def _weights(path):
    return torch.load(path, weights_only=True)


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_mesh_checkpoints_resume_exactly_and_reshard_to_fsdp_and_one_process(tmp_path):
    outdir = tmp_path / "out"
    run_beside(__file__, "mesh_checkpoints", outdir, nproc=4, timeout=300)
    for steps in read_results(outdir, 4):
        # 2 x 2 -> 2 x 2 trains what was left; 4 x 1 the rest of epoch 1's samples: 32,
        # 8 a rank: one step (its checkpoint records the data split in 2 shares, not 4)
        assert steps == {"full": 8, "stopped": 6, "resumed": 2, "fsdp4": 1}
    _assert_equal(_weights(outdir / "resumed.pt"), _weights(outdir / "full.pt"))
    # 2 x 2 -> 1 process (the debug mode reads every rank's shards), and 4 x 1 -> 1 process
    for ckpt, expected in [
        ("stopped/checkpoints/epoch=1-step=6.ckpt", "at_step_6.pt"),
        ("fsdp4/checkpoints/epoch=1-step=7.ckpt", "fsdp4.pt"),
    ]:
        module = Parallel(batch_size=8)
        Trainer(resume=str(outdir / ckpt), enable_checkpointing=False, logger=False).validate(
            module
        )
        _assert_equal(dict(module.state_dict()), _weights(outdir / expected))


# -- two launcher agents as two nodes ------------------------------------------------------
def two_nodes(outdir):
    """strategy='hsdp' with its default mesh: shard within a node, replicate across nodes."""
    disttrain.seed_everything(0)
    module = Parallel(batch_size=4)
    trainer = Trainer(
        strategy="hsdp", max_epochs=1, num_sanity_val_steps=0, enable_checkpointing=False
    )
    trainer.fit(module)
    write_result(
        outdir,
        trainer.global_rank,
        {
            "groups": module.groups,
            "node": int(os.environ["GROUP_RANK"]),
            "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
            "losses": module.losses,
            "val_n": float(trainer.callback_metrics["val_n"]),
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hsdp_on_two_agents_shards_within_each_node(tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:12]

    def agent(node: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=2",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
            __file__,
            "two_nodes",
            str(outdir),
        ]

    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    full_env = {**os.environ, **env, "PYTHONPATH": LAUNCHED_PATH}
    second = subprocess.Popen(
        agent(1),
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first = _run_group(agent(0), env, 240, "agent 0")
        out1, _ = second.communicate(timeout=60)
    finally:
        _kill_group(second)
    assert first.returncode == 0, first.stdout[-6000:]
    assert second.returncode == 0, out1[-6000:]
    results = read_results(outdir, 4)
    assert [r["node"] for r in results] == [0, 0, 1, 1]
    assert {r["local_world_size"] for r in results} == {2}
    assert [r["groups"]["dp_shard"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["groups"]["dp_replicate"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(len(r["losses"]) == 4 and r["val_n"] == N_VAL for r in results)


def _kill_group(proc: subprocess.Popen) -> None:
    """The second agent and every rank below it, if still running."""
    if proc.poll() is None:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()


if __name__ == "__main__":
    run_scenario(globals())
