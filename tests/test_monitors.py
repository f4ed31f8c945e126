"""Monitors as callbacks: learning rate, throughput and FLOPs, memory, the model summary.

One two-rank launch runs three fits: the monitors under DDP (their values read back from
``metrics.csv``), the same fit without them (the collectives each rank calls must be the
same: the monitors ride the existing log points), and a model summary and FLOP count under
FSDP (full and per-rank parameter counts).
"""

from __future__ import annotations

import collections
import csv
import os
from pathlib import Path

import pytest
import torch
from common import Regressor, read_results, run_scenario, write_result
from conftest import run_beside

import disttrain
from disttrain.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelSummary,
    ThroughputMonitor,
)
from disttrain.callbacks.lr_monitor import lr_names
from disttrain.callbacks.throughput import PEAK_BF16_DENSE, first_numel, peak_flops
from disttrain.dist.collectives import ProcessGroupCollectives

EVERY = 2  # log_every_n_steps; 16 samples, batches of 2, 2 ranks: 4 steps an epoch
# FlopCounterMode's count for Linear(4, 8) -> Tanh -> Linear(8, 1) on a batch of 2: forward
# 2*2*(4*8 + 8*1); backward: the first layer's weight gradient only (its input needs none),
# the second layer's weight and input gradients
FLOPS_PER_STEP = 2 * 2 * (4 * 8 + 8 * 1) + 2 * 2 * 4 * 8 + 2 * (2 * 2 * 8 * 1)


class TwoGroups(Regressor):
    """AdamW with two param groups (lr 0.1 and 0.01), halved after every step."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            [
                {"params": self.net[0].parameters(), "lr": 0.1},
                {"params": self.net[2].parameters(), "lr": 0.01},
            ]
        )
        halve = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return [optimizer], [{"scheduler": halve, "interval": "step"}]


class Wide(Regressor):
    """Two wide layers: FSDP gives rank 0 1793 elements, rank 1 1280 (the 1-row output
    layer cannot be split)."""

    def __init__(self):
        super().__init__(n_train=16, batch_size=2)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 512), torch.nn.Tanh(), torch.nn.Linear(512, 1)
        )


def _counting_collectives() -> collections.Counter:
    """Every call to a collective of this process, by method, from now on."""
    calls: collections.Counter = collections.Counter()
    names = ("verdict", "gather_text", "any_true", "agree", "all_reduce")
    for name in ("broadcast_object", "gather_object", *names):
        method = getattr(ProcessGroupCollectives, name)

        def counted(self, *args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        setattr(ProcessGroupCollectives, name, counted)
    return calls


def _fit(module, run_dir, callbacks, **options):
    trainer = disttrain.Trainer(
        max_epochs=2,
        log_every_n_steps=EVERY,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
        seed=2,
        callbacks=callbacks,
        **options,
    )
    trainer.fit(module)
    return trainer


def monitors_at_two_ranks(outdir):
    rank = int(os.environ["RANK"])
    calls = _counting_collectives()
    throughput = ThroughputMonitor(tokens_per_batch="numel")
    monitors = [LearningRateMonitor(log_momentum=True), throughput, DeviceStatsMonitor()]
    _fit(TwoGroups(n_train=16, batch_size=2), Path(outdir) / "on", monitors)
    with_monitors = +calls  # the methods called, with their counts
    calls.clear()
    _fit(TwoGroups(n_train=16, batch_size=2), Path(outdir) / "off", [], logger=None)
    without = +calls
    summary, fsdp_throughput = ModelSummary(max_depth=2), ThroughputMonitor()
    _fit(Wide(), Path(outdir) / "fsdp", [summary, fsdp_throughput], strategy="fsdp")
    write_result(
        outdir,
        rank,
        {
            "collectives": [with_monitors, without],
            "flops": [throughput.flops_per_step, fsdp_throughput.flops_per_step],
            "summary": [[r.name, r.params, r.trainable, r.bytes, r.per_rank] for r in summary.rows],
            "summary_text": summary.text,
        },
    )


def _metrics(path: Path) -> dict[str, dict[int, float]]:
    """``metrics.csv`` by column: {name: {step: value}}."""
    by_name: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if value and name != "step":
                    by_name.setdefault(name, {})[int(row["step"])] = float(value)
    return by_name


def test_monitors_log_at_the_log_points_without_a_collective_of_their_own(tmp_path):
    run_beside(__file__, "monitors_at_two_ranks", tmp_path, nproc=2, timeout=240)
    results = read_results(tmp_path, 2)
    for result in results:  # the same collectives, as many, with and without the monitors
        with_monitors, without = result["collectives"]
        assert with_monitors == without
    m = _metrics(tmp_path / "on" / "metrics.csv")
    log_steps = [2, 4, 6, 8]

    # the learning rate each logged step used: halved after every step, per param group
    assert m["lr-AdamW/pg1"] == pytest.approx({k: 0.1 * 0.5 ** (k - 1) for k in log_steps})
    assert m["lr-AdamW/pg2"] == pytest.approx({k: 0.01 * 0.5 ** (k - 1) for k in log_steps})
    assert m["momentum-AdamW/pg1"] == {k: 0.9 for k in log_steps}

    # throughput every log point after the first (measured) step; tokens: 8 per batch of 2
    samples = m["throughput/samples_per_sec"]
    assert list(samples) == log_steps and all(v > 0 for v in samples.values())
    for k in log_steps:
        assert m["throughput/batches_per_sec"][k] == pytest.approx(samples[k] / 2)
        assert m["throughput/tokens_per_sec"][k] == pytest.approx(samples[k] * 4)
        assert m["throughput/flops_per_sec"][k] == pytest.approx(samples[k] * FLOPS_PER_STEP / 2)
    assert "throughput/mfu" not in m  # CPU: no peak to divide by
    assert [r["flops"][0] for r in results] == [FLOPS_PER_STEP] * 2
    # the epoch's total over ranks is the sum of each rank's, reduced at the epoch's end
    total = m["throughput/epoch/samples_per_sec"]
    assert list(total) == [4, 8]
    for k in total:
        per_rank = [m[f"throughput/rank{r}/samples_per_sec"][k] for r in (0, 1)]
        assert total[k] == pytest.approx(sum(per_rank))

    # memory: rank 0's peak RSS at the log points, the largest over ranks at the epoch's end
    assert list(m["memory/peak_rss_mb"]) == log_steps
    assert all(v > 50 for v in m["memory/peak_rss_mb"].values())
    for k in (4, 8):
        per_rank = [m[f"memory/rank{r}/peak_rss_mb"][k] for r in (0, 1)]
        assert m["memory/max/peak_rss_mb"][k] == max(per_rank)

    # FSDP: the whole model's counts and each rank's share, alike on both ranks
    for result in results:
        assert result["summary"] == [
            ["net", 3073, 3073, 3073 * 4, [1793, 1280]],
            ["net.0", 2560, 2560, 2560 * 4, [1280, 1280]],
            ["net.2", 513, 513, 513 * 4, [513, 0]],
            ["total", 3073, 3073, 3073 * 4, [1793, 1280]],
        ]
        assert "Params per rank" in result["summary_text"]
        assert "1.8 K / 1.3 K" in result["summary_text"]
        # FLOPs of the first step under FSDP: forward 2*2*(4*512 + 512), backward (the first
        # layer's weight gradient, the second's weight and input gradients)
        assert result["flops"][1] == 2 * 2 * (2048 + 512) + 2 * 2 * 2048 + 2 * 2 * 2 * 512


# -- in one process: the parts, and a user's shapes of input ---------------------------------
class Frozen(disttrain.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 2)
        self.scale = torch.nn.Parameter(torch.ones(1))


def test_model_summary_counts_trainable_frozen_and_bytes(disttrain_log):
    from disttrain.callbacks.model_summary import summarize

    rows = {r.name: r for r in summarize(Frozen())}
    assert (rows["embed"].trainable, rows["embed"].frozen, rows["embed"].kind) == (
        0,
        40,
        "Embedding",
    )
    assert (rows["head"].trainable, rows["head"].bytes) == (10, 40)
    assert rows["(own)"].params == 1
    assert (rows["total"].trainable, rows["total"].frozen, rows["total"].bytes) == (11, 40, 204)
    half = Frozen().to(torch.bfloat16)
    assert summarize(half)[-1].bytes == 102


def test_lr_names_follow_lightning():
    def sgd(*groups):
        return torch.optim.SGD([{"params": [torch.zeros(1)], **g} for g in groups], lr=0.1)

    optimizers = [sgd({}), sgd({}, {"name": "head"}), torch.optim.Adam([torch.zeros(1)])]
    assert lr_names(optimizers) == [["lr-SGD"], ["lr-SGD-1/pg1", "lr-SGD-1/head"], ["lr-Adam"]]


def test_tokens_per_batch_and_peaks():
    batch = (torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long))
    assert first_numel(batch) == 15 and first_numel({"ids": torch.zeros(2, 7)}) == 14
    by_path = ThroughputMonitor(tokens_per_batch="test_monitors.first_numel")
    assert by_path.count_tokens is first_numel
    with pytest.raises(ValueError, match="tokens_per_batch must be 'numel'"):
        ThroughputMonitor(tokens_per_batch="numels")
    names = {parts: peak for parts, peak in PEAK_BF16_DENSE}
    assert names[("a100",)] == 312e12 and names[("h100",)] == names[("h200",)] == 989e12


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [  # torch.cuda.get_device_name() as these GPUs report themselves
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peak_by_device_name(monkeypatch, device_name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_monitors_in_one_process_with_accumulation_and_two_optimizers(tmp_path):
    """Two optimizers (the step ends with the second), 2 micro-batches a step: FLOPs of
    the whole first step; both learning rates, once per epoch."""

    class TwoOptimizers(Regressor):
        def training_step(self, batch, batch_idx, optimizer_idx):
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.2),
            ]

    throughput = ThroughputMonitor(peak_flops=1e6)  # MFU against a made-up peak
    trainer = _fit(
        TwoOptimizers(n_train=16, batch_size=2),
        tmp_path,
        [LearningRateMonitor(logging_interval="epoch"), throughput],
        accumulate_grad_batches=2,
    )
    # per micro-batch, each optimizer's training step: 2 forward/backward of batch 2 each
    assert throughput.flops_per_step == 2 * 2 * FLOPS_PER_STEP
    m = _metrics(tmp_path / "metrics.csv")
    assert m["lr-SGD"] == {4: 0.1, 8: 0.1}  # once per epoch, at its end
    assert m["lr-SGD-1"] == {4: 0.2, 8: 0.2}
    for k, flops in m["throughput/flops_per_sec"].items():
        assert m["throughput/mfu"][k] == pytest.approx(flops / 1e6)
    assert trainer.callback_metrics["throughput/epoch/samples_per_sec"] > 0


if __name__ == "__main__":
    run_scenario(globals())
