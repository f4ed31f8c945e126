"""``disttrain plot``: loss and metric curves from runs' ``metrics.csv`` (needs matplotlib).

One panel per metric (losses first, the learning rate last), the optimizer step on x and one
colour per run. Rows appended later at an earlier step (a resumed run, or a ``validate`` or
``test`` run writing into the same file) start a new, unconnected piece of the line.
Everything a user can get wrong (no matplotlib, no run directory, no ``metrics.csv``, a file
with nothing but ``step``/``epoch``) raises :class:`PlotError`, which the command prints as
one line.
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


STAGES = ("train", "val", "test")


def _panel_order(key: str) -> tuple[int, int, str]:
    """Losses first, then other metrics, the learning rate last; train, val, test within."""
    group = 0 if "loss" in key else 2 if key == "lr" or key.startswith("lr-") else 1
    prefix = key.split("_", 1)[0]
    return group, STAGES.index(prefix) if prefix in STAGES else len(STAGES), key


def _pieces(points: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
    """``points`` cut wherever the step goes back: each piece is one run over the file."""
    pieces: list[list[tuple[int, float]]] = []
    for point in points:
        if not pieces or point[0] < pieces[-1][-1][0]:
            pieces.append([])
        pieces[-1].append(point)
    return pieces


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
        raise PlotError("needs matplotlib: pip install 'disttrain[plot]'") from None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        positive = True
        for color, (name, series) in enumerate(runs.items()):
            points = series.get(key, [])
            positive = positive and all(v > 0 for _, v in points)
            for i, piece in enumerate(_pieces(points)):
                steps, values = zip(*piece)
                marker = "." if len(points) < 30 else None
                ax.plot(steps, values, f"C{color}", marker=marker, label=None if i else name)
            if len(points) == 1:  # a lone test value: say it
                ax.annotate(
                    f"{points[0][1]:.4g}", points[0], textcoords="offset points", xytext=(5, 5)
                )
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
