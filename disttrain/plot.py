"""``disttrain plot``: loss and metric curves from runs' ``metrics.csv`` (needs matplotlib)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv (was the run's logger 'csv'?)")
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_runs(run_dirs: list[str], output: str | None = None) -> str:
    """Draw every metric of every run (side by side per metric); returns the PNG's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("disttrain plot needs matplotlib: pip install 'disttrain[plot]'") from err
    runs = {str(d): read_metrics(d) for d in run_dirs}
    keys = sorted({k for series in runs.values() for k in series})
    if not keys:
        raise ValueError(f"no metrics to plot in {', '.join(run_dirs)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, series in runs.items():
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(output) if output else Path(run_dirs[0]) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)
