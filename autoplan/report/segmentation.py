"""The segmentation report: headline and per-case tables, overlays of reference and prediction
on sample cases (three orthogonal slices through the structure for volumes), and 3D surface
renderings (marching cubes, drawn to scale in mm)."""

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import LightSource
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from autoplan.evaluation import nanmean
from autoplan.fingerprint.geometry import bounding_box
from autoplan.report.document import (Document, add_curves, add_run_info, bootstrap_note, fmt, interval_text, safe_name,
                                      scored_cases)
from autoplan.report.figures import new_figure, save_figure

# (name for the legend, RGB): label k gets entry (k - 1) mod 8
LABEL_COLORS = [("red", (0.95, 0.25, 0.2)), ("green", (0.2, 0.85, 0.3)), ("blue", (0.25, 0.5, 1.0)),
                ("yellow", (1.0, 0.85, 0.1)), ("magenta", (0.9, 0.3, 0.9)), ("cyan", (0.1, 0.9, 0.9)),
                ("orange", (1.0, 0.55, 0.1)), ("brown", (0.6, 0.4, 0.2))]
SEGMENTATION_COLUMNS = [("dice", "Dice"), ("jaccard", "Jaccard"), ("precision", "Precision"),
                        ("recall", "Recall"), ("asd_mm", "ASD"), ("hd95_mm", "HD95")]


# ============================================================================ pictures


def _label_color(label: int) -> tuple:
    return LABEL_COLORS[(int(label) - 1) % len(LABEL_COLORS)][1]


def _label_color_name(label: int) -> str:
    return LABEL_COLORS[(int(label) - 1) % len(LABEL_COLORS)][0]


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
    dice = nanmean(m.get("dice") for m in (case_metrics or {}).values())
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
        figure = new_figure(3.0 * len(titles), 3.2)
        axes_row = np.atleast_1d(figure.subplots(1, len(titles)))
        display = _as_display(image, window)
        aspect = spacing[0] / spacing[1]
        for axes, labels, title in zip(axes_row, [None] + label_maps, titles):
            _draw_labels(axes, display, labels, label_ids, title, aspect, "upper")
    else:
        centre = _structure_centre(reference, prediction)
        figure = new_figure(2.6 * len(titles), 7.6)
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
    box = bounding_box(union)
    extent = np.array([(s.stop - s.start + 2) * sp for s, sp in zip(box, spacing)])[::-1]  # x, y, z
    # Coarser marching cubes for large structures keeps the drawing to about 10^4 triangles.
    step = max(1, math.ceil(max(s.stop - s.start for s in box) / 64))
    light = LightSource(azdeg=225, altdeg=45)
    figure = new_figure(3.6 * len(maps), 3.8)
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


# ============================================================================ the report


def _segmentation_tables(document: Document, metrics: dict, run_info: dict):
    labels = metrics.get("labels", {})
    unit = metrics.get("distance_unit", "mm")
    ci95 = metrics.get("ci95") or {}
    header = ["label"] + [f"{title} ({unit})" if key.endswith("_mm") else title
                          for key, title in SEGMENTATION_COLUMNS] + ["Dice 95 % CI"]
    rows = [[f"{label} {name}"] + [fmt(metrics["mean"].get(label, {}).get(key)) for key, _ in SEGMENTATION_COLUMNS]
            + [interval_text((ci95.get("dice") or {}).get(str(label)))] for label, name in labels.items()]
    rows.append(["foreground mean"] + [fmt(metrics["foreground_mean"].get(key)) for key, _ in SEGMENTATION_COLUMNS]
                + [interval_text(ci95.get("foreground_dice"))])
    document.heading("Headline metrics")
    document.paragraph(f"Cases scored: {scored_cases(metrics, run_info)}. "
                       f"{metrics.get('n_cases', len(metrics.get('per_case', [])))} cases; mean over cases "
                       f"per label (undefined values skipped), foreground mean = mean over labels.")
    document.table(header, rows, mean_rows=1)
    if ci95:
        document.paragraph(bootstrap_note(ci95), note=True)

    # Per case: all six metrics for up to three labels, Dice and HD95 beyond (metrics.json has all).
    columns = SEGMENTATION_COLUMNS if len(labels) <= 3 else [SEGMENTATION_COLUMNS[0], SEGMENTATION_COLUMNS[5]]
    header = ["case"] + [f"{name} {title}" + (f" ({unit})" if key.endswith("_mm") else "")
                         for name in labels.values() for key, title in columns]
    rows = [[entry["case"]] + [fmt(entry["per_label"].get(label, {}).get(key))
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
    document = Document(title)
    add_run_info(document, run_info)
    _segmentation_tables(document, metrics, run_info)
    document.heading("Metric conventions")
    document.paragraph(_segmentation_conventions(metrics), note=True)
    add_curves(document, out_dir, log_csv)

    labels = metrics.get("labels", {})
    label_ids = [int(k) for k in labels]
    per_case = {entry["case"]: entry["per_label"] for entry in metrics.get("per_case", [])}
    if samples:
        document.heading("Sample cases")
        legend = ", ".join(f"{name} = {_label_color_name(k)}" for k, name in labels.items())
        document.paragraph(f"Reference and prediction overlaid on the image ({legend}); 3D cases on three "
                           "orthogonal slices through the structure's centre, drawn to scale.", note=True)
    for sample in samples or []:
        case = str(sample.get("case", "case"))
        figure = overlay_figure(sample, label_ids, per_case.get(case))
        name = f"overlay_{safe_name(case)}.png"
        document.image(save_figure(figure, out_dir / name), name, f"{case}: reference vs prediction")
        if np.asarray(sample["prediction"]).ndim == 3:
            figure = render_3d_figure(sample, label_ids, labels)
            if figure is not None:
                name = f"render3d_{safe_name(case)}.png"
                document.image(save_figure(figure, out_dir / name), name,
                               f"{case}: 3D surfaces of the predicted structures (and reference), in mm")
    return document.write(out_dir)

