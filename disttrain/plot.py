"""``disttrain plot``: loss and metric curves from runs' ``metrics.csv`` (needs matplotlib).

One panel per metric (losses first, the learning rate last), the optimizer step on x and one
line per run. Everything a user can get wrong (no matplotlib, no run directory, no
``metrics.csv``, a file with nothing but ``step``/``epoch``) raises :class:`PlotError`, which
the command prints as one line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

NOT_METRICS = ("step", "epoch")


class PlotError(Exception):
    """Why nothing could be drawn, in one line."""


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric's ``(step, value)`` points from ``RUN_DIR/metrics.csv``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: no such run directory")
    path = run / "metrics.csv"
    if not path.is_file():
        raise PlotError(f"{path}: no metrics.csv (was the run's logger 'csv'?)")
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise PlotError(f"{path}: not a metrics file (no 'step' column)")
        for row in reader:
            try:
                step = int(row["step"])
                for key, value in row.items():
                    if key in NOT_METRICS or value in ("", None):
                        continue
                    series.setdefault(key, []).append((step, float(value)))
            except (TypeError, ValueError) as err:
                raise PlotError(f"{path}:{reader.line_num}: unreadable row ({err})") from None
    return series


def _panel_order(key: str) -> tuple[int, str]:
    """Losses first, then other metrics, the learning rate last; alphabetical within."""
    if "loss" in key:
        return 0, key
    return (2 if key == "lr" or key.startswith("lr-") else 1), key


def plot_runs(run_dirs: list[str], output: str | None = None) -> str:
    """Draw every metric of every run (one panel per metric); returns the PNG's path."""
    runs = {str(d): read_metrics(d) for d in run_dirs}  # run errors first: no import needed
    keys = sorted({k for series in runs.values() for k in series}, key=_panel_order)
    if not keys:
        files = ", ".join(str(Path(d) / "metrics.csv") for d in run_dirs)
        raise PlotError(f"{files}: no metrics to plot (log some with self.log in the module)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("disttrain plot needs matplotlib: pip install 'disttrain[plot]'") from None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        positive = True
        for name, series in runs.items():
            if key not in series:
                continue
            steps, values = zip(*series[key])
            positive = positive and min(values) > 0
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        if key == "lr" and positive:
            ax.set_yscale("log")  # schedules decay by factors
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize="small")
    else:
        fig.suptitle(run_dirs[0], fontsize="medium")
    fig.tight_layout()
    out = Path(output) if output else Path(run_dirs[0]) / "curves.png"
    try:
        fig.savefig(out, dpi=100)
    except OSError as err:
        raise PlotError(f"{out}: cannot write the plot ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return str(out)
