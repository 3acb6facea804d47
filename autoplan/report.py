"""Reports of a run: one self-contained report.html, a report.md with the same tables, PNG pictures.

Entry functions:
- ``plot_learning_curves(log_csv, png)``: losses and validation metrics per epoch.
- ``write_segmentation_report(out_dir, metrics, run_info, samples, log_csv)``.
- ``write_classification_report(out_dir, metrics, y_true, probabilities, classes, run_info, gradcam, log_csv)``.
- ``compare_runs(run_dirs) -> str`` and ``plot_compare_curves(run_dirs, png)``: ablation tables.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state), small and at
90 dpi, so a report takes seconds. Every picture is saved next to report.md and embedded
in report.html as a base64 PNG, so the HTML file reads offline on its own.
"""

import base64
import csv
import datetime
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LightSource
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from autoplan.errors import InputError
from autoplan.jsonio import atomic_write_bytes, atomic_write_text, read_json
from autoplan.paths import fold_folders

DPI = 90
LABEL_COLORS = [(0.95, 0.25, 0.2), (0.2, 0.85, 0.3), (0.25, 0.5, 1.0), (1.0, 0.85, 0.1),
                (0.9, 0.3, 0.9), (0.1, 0.9, 0.9), (1.0, 0.55, 0.1), (0.6, 0.4, 0.2)]
SEGMENTATION_COLUMNS = [("dice", "Dice"), ("jaccard", "Jaccard"), ("precision", "Precision"),
                        ("recall", "Recall"), ("asd_mm", "ASD"), ("hd95_mm", "HD95")]
LOSS_COLUMNS = ("train_loss", "val_loss")
NON_METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")


# ============================================================================ small helpers


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _png_bytes(figure: Figure, tight: bool = True) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def _save_figure(figure: Figure, path: Path, tight: bool = True) -> bytes:
    data = _png_bytes(figure, tight)
    atomic_write_bytes(path, data)
    return data


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value))


def _fmt(value, digits: int = 4) -> str:
    if _is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


def _fmt_setting(value) -> str:
    """Options and plan fields as written: 0.2, 0.001, 1e-05, [40, 56, 40]."""
    if isinstance(value, (float, np.floating)) and not _is_missing(value):
        return f"{float(value):g}"
    return _fmt(value)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "case"


def _nanmean(values) -> float:
    values = np.asarray([math.nan if _is_missing(v) else float(v) for v in values], dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


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


def _lower_is_better(name: str) -> bool:
    return any(word in name for word in ("loss", "hd95", "asd", "error"))


def _draw_curves(axes_loss, axes_metric, log: dict, color=None, label_prefix=""):
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


def _finish_curve_axes(axes_loss, axes_metric, metric_title: str):
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
    figure = _figure(9, 3.4)
    axes_loss, axes_metric = figure.subplots(1, 2)
    names = _draw_curves(axes_loss, axes_metric, log)
    if not names:
        axes_metric.text(0.5, 0.5, "no validation metric in log.csv", ha="center", va="center")
    _finish_curve_axes(axes_loss, axes_metric, "validation metrics")
    _save_figure(figure, Path(png))
    return Path(png)


# ============================================================================ HTML / Markdown building


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}tr.mean td{font-weight:bold;background:#f6f6f6}
img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}pre{background:#f6f6f6;padding:0.6em;white-space:pre-wrap}
.note{font-size:0.85em;color:#444}"""


class _Document:
    """The same content written twice: HTML (pictures embedded) and Markdown (pictures linked)."""

    def __init__(self, title: str):
        self.html = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                     f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
        self.markdown = [f"# {title}", ""]
        self.paragraph(f"Written {datetime.datetime.now().isoformat(timespec='seconds')} by autoplan.")

    def heading(self, text: str):
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.markdown += [f"## {text}", ""]

    def paragraph(self, text: str, note: bool = False):
        css = " class='note'" if note else ""
        self.html.append(f"<p{css}>{html.escape(text)}</p>")
        self.markdown += [text, ""]

    def preformatted(self, text: str):
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.markdown += ["```", text, "```", ""]

    def table(self, header: list, rows: list, mean_rows: int = 0):
        """``rows`` of already formatted cells; the last ``mean_rows`` rows are emphasised."""
        cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        lines = [f"<table><tr>{cells}</tr>"]
        for index, row in enumerate(rows):
            css = " class='mean'" if index >= len(rows) - mean_rows else ""
            lines.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
        self.html.append("".join(lines) + "</table>")
        self.markdown += [markdown_table(header, rows), ""]

    def image(self, png: bytes, filename: str, caption: str):
        encoded = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
                         f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
        self.markdown += [f"![{caption}]({filename})", ""]

    def write(self, out_dir: Path) -> Path:
        self.html.append("</body></html>")
        atomic_write_text(out_dir / "report.md", "\n".join(self.markdown).rstrip() + "\n")
        atomic_write_text(out_dir / "report.html", "\n".join(self.html) + "\n")
        return out_dir / "report.html"


def markdown_table(header: list, rows: list) -> str:
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(value, prefix: str = "") -> dict:
    """Nested dicts as {"a.b": value}; lists stay whole."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _add_run_info(document: _Document, run_info: dict):
    """Top-level scalars in one table, each dict (options, plan, ...) in its own, citations as text."""
    run_info = dict(run_info or {})
    citations = run_info.pop("citations", None)
    document.heading("Run")
    scalars = [(k, v) for k, v in run_info.items() if not isinstance(v, dict)]
    if scalars:
        document.table(["item", "value"], [(k, _fmt_setting(v)) for k, v in scalars])
    for key, value in run_info.items():
        if isinstance(value, dict) and value:
            flat = {k: v for k, v in _flatten(value).items() if not k.startswith("reasons")}
            document.paragraph(f"{key}:")
            document.table(["field", "value"], [(k, _fmt_setting(v)) for k, v in flat.items()])
    if citations:
        document.paragraph("Please cite:")
        document.preformatted(citations if isinstance(citations, str) else "\n".join(map(str, citations)))


def _add_curves(document: _Document, out_dir: Path, log_csv):
    if log_csv is None or not Path(log_csv).is_file():
        return
    document.heading("Learning curves")
    png = plot_learning_curves(log_csv, out_dir / "curves.png")
    document.image(png.read_bytes(), png.name, "Losses and validation metrics per epoch (log.csv).")


# ============================================================================ segmentation pictures


def _label_color(label: int):
    return LABEL_COLORS[(int(label) - 1) % len(LABEL_COLORS)]


def _intensity_window(image: np.ndarray) -> tuple:
    values = image[np.isfinite(image)]
    if not values.size:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _as_display(image_slice: np.ndarray, window: tuple) -> np.ndarray:
    """(C, H, W) slice -> (H, W) grey or (H, W, 3) RGB in 0..1."""
    low, high = window
    scaled = np.clip((image_slice.astype(np.float32) - low) / (high - low), 0, 1)
    return np.moveaxis(scaled, 0, -1) if scaled.shape[0] == 3 else scaled[0]


def _draw_labels(axes, display: np.ndarray, label_slice, label_ids, title: str, aspect: float, origin: str):
    axes.imshow(display, cmap="gray", aspect=aspect, origin=origin, interpolation="nearest")
    if label_slice is not None:
        overlay = np.zeros(label_slice.shape + (4,), np.float32)
        for label in label_ids:
            mask = label_slice == label
            if mask.any():
                overlay[mask] = (*_label_color(label), 0.35)
                # contour's default places row 0 at y=0, as imshow does for either origin
                axes.contour(mask.astype(np.float32), levels=[0.5], colors=[_label_color(label)], linewidths=0.9)
        axes.imshow(overlay, aspect=aspect, origin=origin, interpolation="nearest")
    axes.set_title(title, fontsize=8)
    axes.set_axis_off()


def _structure_centre(*label_maps) -> tuple:
    """Centre of mass of the reference foreground (else the prediction's, else the volume centre)."""
    for label_map in label_maps:
        if label_map is not None and (label_map > 0).any():
            return tuple(int(round(c.mean())) for c in np.nonzero(label_map > 0))
    shape = next(m for m in label_maps if m is not None).shape
    return tuple(s // 2 for s in shape)


def _orthogonal_views(spacing) -> list:
    """(name, slicer for axis, row spacing, column spacing, origin) for axial, coronal, sagittal."""
    sz, sy, sx = spacing
    return [("axial", 0, sy, sx, "upper"), ("coronal", 1, sz, sx, "lower"), ("sagittal", 2, sz, sy, "lower")]


def _panel_titles(case_metrics: dict | None, has_reference: bool) -> list:
    dice = _nanmean(m.get("dice") for m in (case_metrics or {}).values())
    prediction = "prediction" + (f" (Dice {dice:.3f})" if math.isfinite(dice) else "")
    return ["image"] + (["reference"] if has_reference else []) + [prediction]


def overlay_figure(sample: dict, label_ids: list, case_metrics: dict | None = None) -> Figure:
    """Image | reference | prediction, for a 2D case or three orthogonal slices of a 3D one."""
    prediction = np.asarray(sample["prediction"])
    reference = None if sample.get("reference") is None else np.asarray(sample["reference"])
    image = np.asarray(sample["image"], dtype=np.float32)
    if image.ndim == prediction.ndim:
        image = image[None]
    if image.shape[1:] != prediction.shape or (reference is not None and reference.shape != prediction.shape):
        raise ValueError(f"case {sample.get('case')}: image {image.shape}, prediction {prediction.shape} and "
                         f"reference {None if reference is None else reference.shape} do not match")
    spacing = list(sample.get("spacing") or [1.0] * prediction.ndim)
    window = _intensity_window(image[:3] if image.shape[0] == 3 else image[:1])
    label_maps = [reference, prediction] if reference is not None else [prediction]
    titles = _panel_titles(case_metrics, reference is not None)
    if prediction.ndim == 2:
        figure = _figure(3.0 * len(titles), 3.2)
        axes_row = np.atleast_1d(figure.subplots(1, len(titles)))
        display = _as_display(image, window)
        aspect = spacing[0] / spacing[1]
        for axes, labels, title in zip(axes_row, [None] + label_maps, titles):
            _draw_labels(axes, display, labels, label_ids, title, aspect, "upper")
    else:
        centre = _structure_centre(reference, prediction)
        figure = _figure(2.6 * len(titles), 7.6)
        grid = figure.subplots(3, len(titles))
        for row, (view, axis, row_spacing, column_spacing, origin) in enumerate(_orthogonal_views(spacing)):
            index = centre[axis]
            display = _as_display(np.take(image, index, axis=axis + 1), window)
            for column, (labels, title) in enumerate(zip([None] + label_maps, titles)):
                cut = None if labels is None else np.take(labels, index, axis=axis)
                _draw_labels(grid[row, column], display, cut, label_ids, f"{title}, {view} {index}",
                             row_spacing / column_spacing, origin)
    figure.suptitle(str(sample.get("case", "")), fontsize=9)
    return figure


def _surface_mesh(mask: np.ndarray, spacing, step: int):
    from skimage.measure import marching_cubes

    vertices, faces, _, _ = marching_cubes(mask.astype(np.float32), 0.5, spacing=tuple(spacing), step_size=step)
    return vertices[:, ::-1], faces  # (z, y, x) -> (x, y, z) for plotting


def render_3d_figure(sample: dict, label_ids: list, names: dict) -> Figure | None:
    """Marching-cubes surfaces of the predicted (and reference) structures, to scale (spacing respected)."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    prediction = np.asarray(sample["prediction"])
    reference = None if sample.get("reference") is None else np.asarray(sample["reference"])
    spacing = list(sample.get("spacing") or [1.0] * 3)
    maps = [("prediction", prediction)] + ([("reference", reference)] if reference is not None else [])
    union = np.isin(prediction, label_ids) | (np.isin(reference, label_ids) if reference is not None else False)
    if not np.isin(prediction, label_ids).any():
        return None
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(union))
    extent = np.array([(s.stop - s.start + 2) * sp for s, sp in zip(box, spacing)])[::-1]  # x, y, z
    # Coarser marching cubes for large structures keeps the drawing to about 10^4 triangles.
    step = max(1, math.ceil(max(s.stop - s.start for s in box) / 64))
    light = LightSource(azdeg=225, altdeg=45)
    figure = _figure(3.6 * len(maps), 3.8)
    for column, (title, label_map) in enumerate(maps):
        axes = figure.add_subplot(1, len(maps), column + 1, projection="3d")
        crop = np.pad(label_map[box], 1)
        for label in label_ids:
            mask = crop == label
            if mask.sum() < 2 or min(mask.shape) < 2:
                continue
            vertices, faces = _surface_mesh(mask, spacing, step)
            # no edgecolors: shading would try to shade "none" as well
            axes.add_collection3d(Poly3DCollection(vertices[faces], facecolors=_label_color(label),
                                                   linewidths=0, shade=True, lightsource=light,
                                                   label=names.get(str(label), str(label))))
        axes.set_xlim(0, extent[0])
        axes.set_ylim(0, extent[1])
        axes.set_zlim(0, extent[2])
        axes.set_box_aspect(tuple(extent))  # a copy: matplotlib rescales a float array in place
        axes.set_xlabel("x (mm)", fontsize=7)
        axes.set_ylabel("y (mm)", fontsize=7)
        axes.set_zlabel("z (mm)", fontsize=7)
        axes.tick_params(labelsize=6)
        for axis in (axes.xaxis, axes.yaxis, axes.zaxis):
            axis.set_major_locator(MaxNLocator(4))
        axes.set_title(title, fontsize=8)
    figure.suptitle(f"{sample.get('case', '')}: 3D surfaces", fontsize=9)
    return figure


def select_sample_cases(metrics: dict, n: int = 3) -> list:
    """Case ids of the best, median and worst cases by mean foreground Dice (up to ``n``)."""
    scored = [(entry["case"], _nanmean(m.get("dice") for m in entry["per_label"].values()))
              for entry in metrics.get("per_case", [])]
    scored = sorted(((c, d if math.isfinite(d) else -1.0) for c, d in scored), key=lambda cd: -cd[1])
    if not scored:
        return []
    picks = [scored[0][0], scored[len(scored) // 2][0], scored[-1][0]] + [c for c, _ in scored]
    return list(dict.fromkeys(picks))[:n]


# ============================================================================ segmentation report


def _segmentation_tables(document: _Document, metrics: dict):
    labels = metrics.get("labels", {})
    unit = metrics.get("distance_unit", "mm")
    header = ["label"] + [f"{title} ({unit})" if key.endswith("_mm") else title
                          for key, title in SEGMENTATION_COLUMNS]
    rows = [[f"{label} {name}"] + [_fmt(metrics["mean"].get(label, {}).get(key)) for key, _ in SEGMENTATION_COLUMNS]
            for label, name in labels.items()]
    rows.append(["foreground mean"] + [_fmt(metrics["foreground_mean"].get(key)) for key, _ in SEGMENTATION_COLUMNS])
    document.heading("Headline metrics")
    document.paragraph(f"{metrics.get('n_cases', len(metrics.get('per_case', [])))} cases; mean over cases "
                       f"per label (undefined values skipped), foreground mean = mean over labels.")
    document.table(header, rows, mean_rows=1)

    # Per case: all six metrics for up to three labels, Dice and HD95 beyond (metrics.json has all).
    columns = SEGMENTATION_COLUMNS if len(labels) <= 3 else [SEGMENTATION_COLUMNS[0], SEGMENTATION_COLUMNS[5]]
    header = ["case"] + [f"{name} {title}" + (f" ({unit})" if key.endswith("_mm") else "")
                         for name in labels.values() for key, title in columns]
    rows = [[entry["case"]] + [_fmt(entry["per_label"].get(label, {}).get(key))
                               for label in labels for key, _ in columns]
            for entry in metrics.get("per_case", [])]
    document.heading("Per case")
    document.table(header, rows)


def _segmentation_conventions(metrics: dict) -> str:
    unit = metrics.get("distance_unit", "mm")
    return metrics.get("conventions") or (
        f"Distances in {unit}. ASD: mean of both directed surface-distance sets pooled. HD95: the larger of "
        "the two directed 95th percentiles. Both masks empty: all metrics undefined (n/a), left out of means. "
        "Reference empty: Dice 0, distances n/a. Prediction empty: Dice 0, recall 0, precision and distances n/a.")


def write_segmentation_report(out_dir, metrics: dict, run_info: dict, samples: list, log_csv=None,
                              title: str = "Segmentation report") -> Path:
    """report.html (self-contained), report.md and overlay_/render3d_ PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = _Document(title)
    _add_run_info(document, run_info)
    _segmentation_tables(document, metrics)
    document.heading("Metric conventions")
    document.paragraph(_segmentation_conventions(metrics), note=True)
    _add_curves(document, out_dir, log_csv)

    labels = metrics.get("labels", {})
    label_ids = [int(k) for k in labels]
    per_case = {entry["case"]: entry["per_label"] for entry in metrics.get("per_case", [])}
    if samples:
        document.heading("Sample cases")
        legend = ", ".join(f"{name} = {'red green blue yellow magenta cyan orange brown'.split()[(int(k) - 1) % 8]}"
                           for k, name in labels.items())
        document.paragraph(f"Reference and prediction overlaid on the image ({legend}); 3D cases on three "
                           "orthogonal slices through the structure's centre, drawn to scale.", note=True)
    for sample in samples or []:
        case = str(sample.get("case", "case"))
        figure = overlay_figure(sample, label_ids, per_case.get(case))
        name = f"overlay_{_safe_name(case)}.png"
        document.image(_save_figure(figure, out_dir / name), name, f"{case}: reference vs prediction")
        if np.asarray(sample["prediction"]).ndim == 3:
            figure = render_3d_figure(sample, label_ids, labels)
            if figure is not None:
                name = f"render3d_{_safe_name(case)}.png"
                document.image(_save_figure(figure, out_dir / name), name,
                               f"{case}: 3D surfaces of the predicted structures (and reference), in mm")
    return document.write(out_dir)


# ============================================================================ classification report


def confusion_figure(confusion, classes: list) -> Figure:
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = 2.2 + 0.45 * len(classes)
    figure = _figure(2 * size + 0.6, size)
    for axes, values, title, text in zip(figure.subplots(1, 2), (counts, normalised),
                                         ("counts", "row-normalised (recall on the diagonal)"),
                                         ("{:.0f}", "{:.2f}")):
        axes.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        for (i, j), value in np.ndenumerate(values):
            axes.text(j, i, text.format(value), ha="center", va="center", fontsize=7,
                      color="white" if value > 0.6 * values.max() else "black")
        axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title, fontsize=9)
    return figure


def roc_figure(y_true, probabilities, classes: list) -> Figure:
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    figure = _figure(4.6, 4.2)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], ":", color="grey")
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.all() or not positive.any():
            continue  # one-vs-rest ROC needs both positives and negatives
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probabilities[:, k]):.3f})")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("one-vs-rest ROC", fontsize=9)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower right")
    return figure


def _image_01(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # channel-first given
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if image.min() < 0 or image.max() > 1:
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def gradcam_figure(gradcam: list, classes: list) -> Figure | None:
    """Rows per true class, correct predictions first; jet heat map over the image."""
    from skimage.transform import resize

    rows = {}
    for item in gradcam:
        true = item.get("true", item.get("true_class"))
        rows.setdefault(true, []).append(item)
    order = [c for c in classes if c in rows] + [c for c in rows if c not in classes]
    if not order:
        return None
    n_columns = min(6, max(len(rows[c]) for c in order))
    figure = _figure(2.0 * n_columns, 2.2 * len(order))
    grid = np.atleast_2d(figure.subplots(len(order), n_columns, squeeze=False))
    for row, true in enumerate(order):
        items = sorted(rows[true], key=lambda it: it.get("predicted", it.get("predicted_class")) != true)
        for column in range(n_columns):
            axes = grid[row, column]
            axes.set_axis_off()
            if column >= len(items):
                continue
            item = items[column]
            image = _image_01(item["image"])
            heatmap = np.asarray(item["heatmap"], dtype=np.float32)
            if heatmap.shape != image.shape[:2]:
                heatmap = resize(heatmap, image.shape[:2], order=1)
            predicted = item.get("predicted", item.get("predicted_class"))
            axes.imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes.imshow(np.clip(heatmap, 0, 1), cmap="jet", alpha=0.4, vmin=0, vmax=1)
            axes.set_title(f"{item.get('case', '')}\ntrue {true} / pred {predicted}", fontsize=7,
                           color="green" if predicted == true else "red")
    return figure


def _classification_tables(document: _Document, metrics: dict, classes: list):
    macro_auc = metrics.get("macro_auc")
    if macro_auc is None:
        macro_auc = _nanmean(c.get("auc") for c in metrics["per_class"].values())
    document.heading("Headline metrics")
    document.table(["accuracy", "balanced accuracy", "macro F1", "macro AUC", "cases"],
                   [[_fmt(metrics.get("accuracy")), _fmt(metrics.get("balanced_accuracy")),
                     _fmt(metrics.get("macro_avg", {}).get("f1")), _fmt(macro_auc), _fmt(metrics.get("n_cases"))]])
    document.heading("Per class")
    rows = [[name] + [_fmt(metrics["per_class"][name].get(k)) for k in ("precision", "recall", "f1", "support", "auc")]
            for name in classes]
    for average in ("macro_avg", "weighted_avg"):
        values = metrics.get(average, {})
        rows.append([average.replace("_avg", " average")] +
                    [_fmt(values.get(k)) for k in ("precision", "recall", "f1")] + ["", ""])
    document.table(["class", "precision", "recall", "F1", "support", "AUC (one-vs-rest)"], rows, mean_rows=2)
    document.paragraph(metrics.get("conventions") or "AUC is one-vs-rest; n/a where a class has no positives.",
                       note=True)


def write_classification_report(out_dir, metrics: dict, y_true, probabilities, classes: list, run_info: dict,
                                gradcam: list | None = None, log_csv=None,
                                title: str = "Classification report") -> Path:
    """report.html (self-contained), report.md, confusion_matrix.png, roc.png and gradcam.png in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    document = _Document(title)
    _add_run_info(document, run_info)
    _classification_tables(document, metrics, classes)
    _add_curves(document, out_dir, log_csv)
    document.heading("Confusion matrix")
    png = _save_figure(confusion_figure(metrics["confusion_matrix"], classes), out_dir / "confusion_matrix.png")
    document.image(png, "confusion_matrix.png", "Confusion matrix: counts and row-normalised (rows: true class).")
    document.heading("ROC curves")
    png = _save_figure(roc_figure(y_true, probabilities, classes), out_dir / "roc.png")
    document.image(png, "roc.png", "One-vs-rest ROC curve and AUC per class.")
    figure = gradcam_figure(gradcam or [], classes)
    if figure is not None:
        document.heading("Grad-CAM")
        png = _save_figure(figure, out_dir / "gradcam.png")
        document.image(png, "gradcam.png", "Grad-CAM heat maps of the predicted class; one row per true class, "
                                           "titles green when correct, red when wrong.")
    return document.write(out_dir)


# ============================================================================ comparing runs


# options that do not change what a run learns, and so never name a difference
IGNORED_OPTIONS = {"run_name", "fold", "resume", "n_jobs", "n_workers", "device"}
OPTION_ORDER = ["dataset", "configuration", "loss", "dropout", "base_features", "norm", "augment", "optimizer",
                "lr", "batch_size", "epochs", "pretrained"]


@dataclass
class RunSummary:
    """One row of the compare table: a run (one fold, or the mean over its folds)."""

    name: str
    folds: list
    options: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def _effective_options(plan: dict) -> dict:
    """The run's options with "plan's choice" (None) replaced by what the plan chose."""
    configuration = plan.get("configuration") or {}
    if not isinstance(configuration, dict):
        configuration = {"name": configuration}
    options = {k: v for k, v in _flatten(plan.get("options") or {}).items() if k not in IGNORED_OPTIONS}
    for key, value in list(options.items()):
        if value is None:
            options[key] = plan.get(key, configuration.get(key))
    if options.get("base_features") is None and configuration.get("network", {}).get("features_per_stage"):
        options["base_features"] = configuration["network"]["features_per_stage"][0]
    if options.get("base_features") is None and configuration.get("network", {}).get("width"):
        options["base_features"] = configuration["network"]["width"]
    options["configuration"] = configuration.get("name", options.get("configuration"))
    options["patch_size"] = configuration.get("patch_size")
    options["dataset"] = plan.get("dataset")
    return options


def _fold_metrics(fold: Path) -> dict:
    """Headline numbers of one fold: validation metrics.json, then final/best values from log.csv."""
    values = {}
    if (fold / "metrics.json").is_file():
        metrics = read_json(fold / "metrics.json")
        if metrics.get("task_type") == "classification":
            values["accuracy"] = metrics.get("accuracy")
            values["balanced acc."] = metrics.get("balanced_accuracy")
            values["macro F1"] = (metrics.get("macro_avg") or {}).get("f1")
            values["macro AUC"] = metrics.get("macro_auc")
        else:
            unit = metrics.get("distance_unit", "mm")
            values["Dice (fg mean)"] = (metrics.get("foreground_mean") or {}).get("dice")
            values[f"HD95 {unit} (fg mean)"] = (metrics.get("foreground_mean") or {}).get("hd95_mm")
            for label, name in (metrics.get("labels") or {}).items():
                values[f"Dice {name}"] = (metrics.get("mean") or {}).get(label, {}).get("dice")
    if (fold / "log.csv").is_file():
        log = read_log(fold / "log.csv")
        if "train_loss" in log and np.isfinite(log["train_loss"]).any():
            values["final train loss"] = log["train_loss"][np.isfinite(log["train_loss"])][-1]
        name = primary_metric(log)
        if name and np.isfinite(log[name]).any():
            values[f"best {name}"] = np.nanmin(log[name]) if _lower_is_better(name) else np.nanmax(log[name])
        if "seconds" in log:
            values["train min"] = np.nansum(log["seconds"]) / 60
        values["epochs run"] = len(next(iter(log.values()), []))
    return values


def summarize_run(run_dir) -> RunSummary:
    run_dir = Path(run_dir)
    folds = fold_folders(run_dir)
    is_fold = folds == [run_dir]
    name = f"{run_dir.parent.name}/{run_dir.name}" if is_fold else run_dir.name
    options = _effective_options(read_json(folds[0] / "plan.json"))
    per_fold = [_fold_metrics(fold) for fold in folds]
    columns = list(dict.fromkeys(k for values in per_fold for k in values))
    metrics = {k: _nanmean(values.get(k) for values in per_fold) for k in columns}
    return RunSummary(name=name, folds=[f.name for f in folds], options=options, metrics=metrics)


def _differing_options(summaries: list) -> list:
    keys = list(dict.fromkeys(k for s in summaries for k in s.options))
    if len(summaries) > 1:
        keys = [k for k in keys if len({_fmt_setting(s.options.get(k)) for s in summaries}) > 1]
    return sorted(keys, key=lambda k: (OPTION_ORDER.index(k) if k in OPTION_ORDER else len(OPTION_ORDER), k))


def _metric_digits(name: str) -> int:
    return 2 if any(word in name for word in ("HD95", "min")) else 0 if name == "epochs run" else 4


def compare_runs(run_dirs: list) -> str:
    """Markdown ablation table: one row per run, the options that differ, headline metrics."""
    if not run_dirs:
        raise InputError(None, "compare needs at least one run folder")
    summaries = [summarize_run(d) for d in run_dirs]
    options = _differing_options(summaries)
    metric_names = list(dict.fromkeys(k for s in summaries for k in s.metrics))
    header = ["run", "folds"] + options + metric_names
    rows = []
    for s in summaries:
        folds = s.folds[0] if len(s.folds) == 1 else f"{len(s.folds)} (mean)"
        rows.append([s.name, folds] + [_fmt_setting(s.options.get(k)) for k in options] +
                    [_fmt(s.metrics.get(k), _metric_digits(k)) for k in metric_names])
    notes = ("Options: only those that differ between the runs (all of them for a single run). "
             "Validation metrics from each fold's metrics.json, training columns from log.csv; "
             "a run folder with several folds shows the mean over its folds.")
    return markdown_table(header, rows) + "\n\n" + notes + "\n"


def _mean_log(folds: list) -> dict:
    """Per-epoch mean over the folds' logs (epochs aligned by number)."""
    logs = [read_log(f / "log.csv") for f in folds if (f / "log.csv").is_file()]
    logs = [log for log in logs if "epoch" in log and len(log["epoch"])]
    if not logs:
        return {}
    epochs = np.unique(np.concatenate([log["epoch"] for log in logs]))
    merged = {"epoch": epochs}
    for column in dict.fromkeys(c for log in logs for c in log if c != "epoch"):
        stacked = np.full((len(logs), len(epochs)), np.nan)
        for i, log in enumerate(logs):
            if column in log:
                stacked[i, np.searchsorted(epochs, log["epoch"])] = log[column]
        merged[column] = np.array([_nanmean(col) for col in stacked.T])
    return merged


def plot_compare_curves(run_dirs: list, png) -> Path:
    """Learning curves of several runs in one figure (losses; the headline validation metric)."""
    figure = _figure(10, 3.8)
    axes_loss, axes_metric = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(run_dirs))]
    metric_names = set()
    for run_dir, color in zip(run_dirs, colors):
        summary_name = summarize_run(run_dir).name
        log = _mean_log(fold_folders(run_dir))
        if log:
            metric_names.update(_draw_curves(axes_loss, axes_metric, log, color=color, label_prefix=f"{summary_name}: "))
    _finish_curve_axes(axes_loss, axes_metric, " / ".join(sorted(metric_names)) or "validation metric")
    _save_figure(figure, Path(png))
    return Path(png)
