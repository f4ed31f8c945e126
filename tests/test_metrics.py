"""Exact cross-rank metrics, the logger files, and the collectives logging costs.

Each test's torchrun ranks run the scenario function written above it
(``conftest.run_beside``); the modules a ``disttrain launch`` config names
(``test_metrics.ReportsMetrics``) are here too, above their tests."""

from __future__ import annotations

import csv
import itertools
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from common import (
    LogsMetrics,
    exact_validation,
    read_results,
    run_scenario,
    sharded_stream,
    write_result,
)
from conftest import ROOT, launch_two, run_beside

import disttrain
from disttrain import Trainer


# -- exact validation metrics over an odd-sized set ----------------------------------------
def exact_metrics(outdir):
    """Validate ``LogsMetrics`` (7 samples, batches of 2); write the reduced metrics."""
    disttrain.seed_everything(0)
    module = LogsMetrics(n_val=7, batch_size=2)
    trainer = Trainer(enable_checkpointing=False, logger=None)
    trainer.validate(module)
    write_result(outdir, trainer.global_rank, dict(trainer.callback_metrics))


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
def test_exact_validation_metrics_over_an_odd_dataset(tmp_path, world_size):
    outdir = tmp_path / "out"
    run_beside(__file__, "exact_metrics", outdir, nproc=world_size)
    for metrics in read_results(outdir, world_size):
        _assert_exact(metrics)  # every rank sees the same, exact value


def test_log_in_prepare_data_is_refused():
    class LogsTooEarly(LogsMetrics):
        def prepare_data(self):
            self.log("x", 1.0)

    with pytest.raises(disttrain.HookFailed, match="runs on some ranks only"):
        disttrain.Trainer(max_epochs=1, enable_checkpointing=False).fit(LogsTooEarly())


# -- the logger's files --------------------------------------------------------------------
class ReportsMetrics(LogsMetrics):
    """Writes the reduced metrics it ends with, for a test to compare with the logger's files."""

    def __init__(self):
        super().__init__(n_val=7, batch_size=2)

    def on_fit_end(self):
        if self.global_rank == 0:
            Path(self.trainer.config.default_root_dir, "report.yaml").write_text(
                yaml.safe_dump(dict(self.trainer.callback_metrics))
            )


class HistogramsLikeTheSeed(ReportsMetrics):
    """The seed's own ``on_after_backward`` example, as written."""

    def on_after_backward(self):
        # example to inspect gradient information in tensorboard
        if self.trainer.global_step % 25 == 0:  # don't make the tf file huge
            params = self.state_dict()
            for k, v in params.items():
                grads = v
                name = k
                self.logger.experiment.add_histogram(
                    tag=name, values=grads, global_step=self.trainer.global_step
                )


def test_csv_and_tensorboard_files_of_a_two_rank_run(tmp_path):
    for logger in ("csv", "tensorboard"):
        run_dir = tmp_path / logger
        config = tmp_path / f"{logger}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {
                        "class_path": "test_metrics.HistogramsLikeTheSeed"
                        if logger == "tensorboard"
                        else "test_metrics.ReportsMetrics"
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


# -- the collectives logging costs ---------------------------------------------------------
def count_collectives(outdir):
    """Count every torch.distributed call per training step with the benchmark's own counter
    (DDP's gradient all-reduce, in C++, is not a Python call): 2 epochs of ``LogsMetrics``
    logging every step, from map-style data (32 samples) or, with ``DATA=stream``, from the
    shared ``sharded_stream`` (48 samples in 12 shards) read by 2 loader workers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from overhead import CollectiveCounter

    counter = CollectiveCounter()
    current = counter.current
    windows = []

    class Windows(disttrain.Callback):
        def on_epoch_start(self, trainer, module):
            windows.append(("epoch_start", trainer.current_epoch, dict(current)))
            current.clear()

        def on_batch_start(self, trainer, module, batch):
            windows.append(("batch_start", trainer.current_epoch, dict(current)))
            current.clear()

    class FromStream(LogsMetrics):  # a ShardedStream read by 2 workers, its position kept
        def train_dataloader(self):
            return torch.utils.data.DataLoader(sharded_stream(), batch_size=2, num_workers=2)

    stream = os.environ.get("DATA") == "stream"
    module = (FromStream if stream else LogsMetrics)(n_train=32, batch_size=2)
    trainer = Trainer(
        max_epochs=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        log_every_n_steps=1,
        callbacks=[Windows()],
    )
    trainer.fit(module)
    write_result(outdir, trainer.global_rank, {"windows": windows, "tail": dict(current)})


@pytest.mark.parametrize("data", ["map", "stream"])
def test_steady_state_steps_issue_no_collective_besides_the_gradient_all_reduce(tmp_path, data):
    """Map-style data, and a ShardedStream through 2 loader workers per rank (read a window
    ahead for uneven inputs, its position recorded per batch): the same collectives."""
    outdir = tmp_path / "out"
    run_beside(__file__, "count_collectives", outdir, DATA=data)
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
        # one object gather carries metrics and stop votes: one all-gather (each rank's size
        # travels in its slot with the pickled bytes)
        assert [counts for _, _, counts in epoch_ends] == [{"all_gather": 1}]
        assert result["tail"].get("all_gather") == 1  # the second epoch's end


if __name__ == "__main__":
    run_scenario(globals())
