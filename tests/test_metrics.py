"""Exact cross-rank metrics, the logger files, and the collectives logging costs."""

from __future__ import annotations

import csv
import itertools

import pytest
import yaml
from common import LogsMetrics, exact_validation, read_results
from conftest import launch_two
from scenarios import exact_metrics

import disttrain


def expected() -> dict[str, float]:
    disttrain.seed_everything(0)
    return exact_validation(LogsMetrics(n_val=7, batch_size=2), n_val=7)


def _assert_exact(metrics: dict[str, float]) -> None:
    for key, value in expected().items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_exact_validation_metrics_single_process(tmp_path):
    exact_metrics(tmp_path)
    _assert_exact(read_results(tmp_path, 1)[0])


@pytest.mark.parametrize("world_size", [2, 3])
def test_exact_validation_metrics_over_an_odd_dataset(scenario, world_size):
    _, outdir = scenario("exact_metrics", nproc=world_size)
    for metrics in read_results(outdir, world_size):
        _assert_exact(metrics)  # every rank sees the same, exact value


def test_log_in_prepare_data_is_refused():
    class LogsTooEarly(LogsMetrics):
        def prepare_data(self):
            self.log("x", 1.0)

    with pytest.raises(disttrain.HookFailed, match="runs on some ranks only"):
        disttrain.Trainer(max_epochs=1, enable_checkpointing=False).fit(LogsTooEarly())


def test_csv_and_tensorboard_files_of_a_two_rank_run(tmp_path):
    for logger in ("csv", "tensorboard"):
        run_dir = tmp_path / logger
        config = tmp_path / f"{logger}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {
                        "class_path": "common.HistogramsLikeTheSeed"
                        if logger == "tensorboard"
                        else "common.ReportsMetrics"
                    },
                    "trainer": {
                        "max_epochs": 2,
                        "logger": logger,
                        "log_every_n_steps": 2,
                        "num_sanity_val_steps": 1,
                    },
                    "run_dir": str(run_dir),
                }
            )
        )
        proc = launch_two(config)
        assert proc.returncode == 0, proc.stderr[-5000:]
        report = yaml.safe_load((run_dir / "report.yaml").read_text())
        if logger == "csv":
            rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
            val_rows = [r for r in rows if r.get("val_mse")]
            assert len(val_rows) == 2  # one per epoch, sanity check not logged
            assert float(val_rows[-1]["val_mse"]) == pytest.approx(report["val_mse"], rel=1e-6)
            assert float(val_rows[-1]["val_n"]) == 7.0  # exact over the unpadded shards
            assert [r["step"] for r in rows if r.get("train_loss")] == ["2", "4", "6", "8"]
            assert (run_dir / "hparams.yaml").exists()
            assert not list(run_dir.glob("metrics*.csv"))[1:]
        else:
            from tensorboard.backend.event_processing.event_accumulator import (
                EventAccumulator,
            )

            (events_dir,) = [run_dir / "tensorboard"]
            acc = EventAccumulator(str(events_dir), size_guidance={"histograms": 0})
            acc.Reload()
            assert acc.Scalars("val_mse")[-1].value == pytest.approx(report["val_mse"], rel=1e-6)
            tags = acc.Tags()["histograms"]
            assert "net.0.weight" in tags  # the seed's on_after_backward example, as written
            steps = sorted({e.step for e in acc.Histograms("net.0.weight")})
            assert steps == [0]  # global_step % 25 == 0 only at the start of this short run
            assert len(list(events_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 only


@pytest.mark.parametrize("data", ["map", "stream"])
def test_steady_state_steps_issue_no_collective_besides_the_gradient_all_reduce(scenario, data):
    """Map-style data, and a ShardedStream through 2 loader workers per rank (read a window
    ahead for uneven inputs, its position recorded per batch): the same collectives."""
    _, outdir = scenario("count_collectives", DATA=data)
    per_epoch = 8 if data == "map" else 12  # 32 samples / 48 in 12 shards, 2 ranks, 2 a batch
    for rank, result in enumerate(read_results(outdir, 2)):
        windows = result["windows"]
        # each window holds what ran since the previous on_batch_start / on_epoch_start
        steady = [
            w
            for prev, w in itertools.pairwise(windows)
            if prev[0] == "batch_start" and w[0] == "batch_start"
        ]
        assert len(steady) == 2 * (per_epoch - 1), rank
        for _, _, counts in steady:
            assert counts == {}, (rank, counts)  # logging every step; DDP's all-reduce is C++
        epoch_ends = [
            w
            for prev, w in itertools.pairwise(windows)
            if prev[0] == "batch_start" and w[0] == "epoch_start"
        ]
        # one object gather (sizes, then the pickled bytes) carries metrics and stop votes
        assert [counts for _, _, counts in epoch_ends] == [{"all_gather": 2}]
        assert result["tail"].get("all_gather") == 2  # the second epoch's end
