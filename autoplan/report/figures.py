"""Figures on matplotlib's Agg canvas (no pyplot state), and the learning curves of log.csv.

Figures are small and at 90 dpi, so a report takes seconds. ``plot_learning_curves``
draws one run; ``draw_curves`` lets the run comparison draw several in one figure.
"""

import csv
import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from autoplan.jsonio import atomic_write_bytes

DPI = 90
LOSS_COLUMNS = ("train_loss", "val_loss")
NON_METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> bytes:
    """Write the figure as a PNG; its bytes, for embedding."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return buffer.getvalue()


# ============================================================================ log.csv and learning curves


def read_log(log_csv) -> dict:
    """log.csv as {column: float array}; empty cells are NaN, text columns are left out."""
    with open(log_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = {}
    for name in (rows[0].keys() if rows else []):
        try:
            columns[name] = np.array([float(r[name]) if r.get(name) not in (None, "") else math.nan
                                      for r in rows])
        except ValueError:
            continue
    return columns


def metric_columns(log: dict) -> list:
    """Validation metric columns of a log: ``val_*`` except val_loss (then smoothed ``ema_*`` ones)."""
    names = [c for c in log if c.startswith("val_") and c != "val_loss"]
    names += [c for c in log if c.startswith("ema_")]
    return names or [c for c in log if c not in NON_METRIC_COLUMNS]


def primary_metric(log: dict) -> str | None:
    """The headline validation metric of a log (the first ``val_*`` column, e.g. val_dice)."""
    names = [c for c in log if c.startswith("val_") and c != "val_loss"]
    return names[0] if names else None


def draw_curves(axes_loss, axes_metric, log: dict, color=None, label_prefix="") -> list:
    """Losses on one axes, validation metrics on the other; the metric columns drawn.

    Without ``color`` every metric column of the log; with it (one run among several) only
    its primary metric, so the runs' curves stay readable together.
    """
    epochs = log.get("epoch", np.arange(1, len(next(iter(log.values()), [])) + 1))
    for column, style in zip(LOSS_COLUMNS, ("-", "--")):
        if column in log and np.isfinite(log[column]).any():
            axes_loss.plot(epochs, log[column], style, color=color, label=f"{label_prefix}{column}")
    names = metric_columns(log) if color is None else [primary_metric(log)] if primary_metric(log) else []
    for column in names:
        if np.isfinite(log[column]).any():
            style = ":" if column.startswith("ema_") else "-"
            axes_metric.plot(epochs, log[column], style, color=color, label=f"{label_prefix}{column}")
    return names


def finish_curve_axes(axes_loss, axes_metric, metric_title: str):
    axes_loss.set_title("losses")
    axes_metric.set_title(metric_title)
    for axes in (axes_loss, axes_metric):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)


def plot_learning_curves(log_csv, png) -> Path:
    """Two panels: train/val loss, and the validation metric(s), per epoch."""
    log = read_log(log_csv)
    figure = new_figure(9, 3.4)
    axes_loss, axes_metric = figure.subplots(1, 2)
    names = draw_curves(axes_loss, axes_metric, log)
    if not names:
        axes_metric.text(0.5, 0.5, "no validation metric in log.csv", ha="center", va="center")
    finish_curve_axes(axes_loss, axes_metric, "validation metrics")
    save_figure(figure, Path(png))
    return Path(png)
