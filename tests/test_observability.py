"""Seeing a run: the hang report, the profiler, the hook schedule, plots, progress lines."""

from __future__ import annotations

import time

import pytest
import yaml
from common import LogsMetrics, Regressor
from conftest import disttrain_cli, launch_two, worker_env

import disttrain
from disttrain.cli import main as cli


class SleepsInBatchEnd(Regressor):
    """Rank 1 sleeps in on_batch_end at step 3, past the collective timeout."""

    def __init__(self, sleep: float = 8.0):
        super().__init__(n_train=32)
        self.sleep = sleep

    def on_batch_end(self):
        if self.global_rank == 1 and self.global_step == 3:
            time.sleep(self.sleep)


def test_hang_report_names_the_rank_and_the_hook(tmp_path):
    config = tmp_path / "hang.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "test_observability.SleepsInBatchEnd"},
                "trainer": {"max_epochs": 1, "timeout": 3, "num_sanity_val_steps": 0},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    start = time.monotonic()
    proc = launch_two(config)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    report = proc.stderr[proc.stderr.index("flight recorder") :]
    assert "rank 1: in hook 'on_batch_end' at step 3" in report, report
    assert "rank 0: in collective 'gradient sync in backward' at step 3" in report, report
    assert "ranks [0] wait in a collective that rank(s) [1] never joined" in report, report
    assert elapsed < 60, elapsed
    assert sorted(p.name for p in (tmp_path / "run" / "flight").iterdir()) == [
        "rank0.json",
        "rank1.json",
    ]


def test_profiler_reports_hooks_and_phases(tmp_path):
    module = LogsMetrics(n_train=16)
    trainer = disttrain.Trainer(max_epochs=1, profiler="simple", num_sanity_val_steps=0)
    trainer.fit(module)
    report = trainer.profile_report
    for name in (
        "data loading",
        "forward",
        "optimizer step",
        "LogsMetrics.backward",
        "LogsMetrics.transfer_batch_to_device",
        "ModelCheckpoint.on_epoch_end",
    ):
        assert name in report, name
    row = next(line for line in report.splitlines() if line.startswith("forward"))
    assert row.split()[1] == "8"  # 8 batches: one forward each
    # each phase's share of the training loop (the epochs, their validation included)
    loop = next(line for line in report.splitlines() if line.startswith("training loop"))
    assert loop.split()[2] == "1" and loop.split()[-1] == "100.0%"
    waited = next(line for line in report.splitlines() if line.startswith("data loading"))
    share = float(waited.split()[-1].rstrip("%"))
    totals = trainer.profiler.totals
    expected = 100 * totals["data loading"] / totals["training loop"]
    assert share == pytest.approx(expected, abs=0.06) and 0 < share < 100
    assert disttrain.Trainer(max_epochs=1).profiler is None  # off: nothing attached


def test_hooks_command_reads_the_table(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "disttrain.examples.regression.Regression"},
                "trainer": {"prepare_data_per_node": True},
                "launch": {"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "h:1"},
            }
        )
    )
    assert cli.main(["hooks", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("prepare_data"))
    assert row.split()[1:5] == ["runs", "-", "runs", "-"]  # local zero of each of 2 nodes
    assert "verdict (after waiting on a heartbeat)" in row
    assert "agreement" in next(
        line for line in out.splitlines() if line.startswith("on_batch_start")
    )
    assert cli.main(["hooks", "--config", str(path), "--world-size", "1"]) == 0


def test_plot_writes_a_png(tmp_path):
    runs = []
    for lr in (0.05, 0.2):
        run_dir = tmp_path / f"lr{lr}"
        trainer = disttrain.Trainer(
            max_epochs=2, default_root_dir=str(run_dir), log_every_n_steps=2
        )
        trainer.fit(LogsMetrics(lr=lr))
        runs.append(str(run_dir))
    out = tmp_path / "curves.png"
    assert cli.main(["plot", *runs, "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_progress_lines_when_not_a_terminal(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "common.LogsMetrics"},
                "trainer": {"max_epochs": 1, "log_every_n_steps": 2},
                "run_dir": str(tmp_path / "run"),
            }
        )
    )
    proc = launch_two(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "steps/s" in line]
    assert len(lines) >= 3 and all(line.startswith("[rank 0]") for line in lines)
    assert "train_loss" in lines[0]  # prog_bar metrics
    everyone = launch_two(
        config,
        f"run_dir={tmp_path / 'run2'}",
        "trainer.resume=auto",
        env=worker_env(DISTTRAIN_LOG_ALL_RANKS="1"),
    )
    assert "[rank 1] resume=auto: no checkpoint" in everyone.stderr  # each rank logs it
    assert "[rank 1]" not in proc.stderr


@pytest.mark.parametrize("command", ["hooks", "plot"])
def test_new_commands_have_help(command):
    out = disttrain_cli(command, "--help", timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout
