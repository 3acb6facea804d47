"""What every case contributes whatever the task (geometry, size, intensity range), and the
dataset-wide geometry fields made of it: shapes, spacings, their medians and spread, anisotropy."""

import os
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.fingerprint.intensity import intensity_percentiles, is_integer_valued
from autoplan.io import NATURAL_FORMATS

# A grid whose coarsest axis is more than this many times its finest is anisotropic (nnU-Net's
# ANISO_THRESHOLD): the fingerprint notes it and preprocessing resamples such volumes in-plane
# first, then along the coarse axis with nearest neighbour.
ANISOTROPY_THRESHOLD = 3.0


def case_summary(case, image) -> dict:
    """What every case contributes whatever the task: geometry, size on disk, whole-image
    intensity percentiles and range, and what its pixels are (format, bit depth, dtype)."""
    data = image.array
    flat = data.reshape(data.shape[0], -1)
    files = list(case.images) + ([case.label] if case.label is not None else [])
    return {
        "case": case.id,
        "n_channels": int(data.shape[0]),
        "shape": [int(s) for s in image.spatial_shape],
        "spacing": [float(s) for s in image.spacing],
        "n_voxels": int(flat.shape[1]),
        "disk_bytes": sum(os.path.getsize(p) for p in files),
        "percentiles": intensity_percentiles(data),
        "channel_min": [float(v) for v in flat.min(axis=1)],
        "channel_max": [float(v) for v in flat.max(axis=1)],
        "integer_valued": [is_integer_valued(c) for c in flat],
        "source_format": image.source_format,
        "bit_depth": image.meta.get("bit_depth"),
        "dtype": str(data.dtype),
    }


def bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the bounding box of ``mask``; the whole array when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def check_consistent(dataset, results) -> None:
    channels = {r["n_channels"] for r in results}
    dims = {len(r["shape"]) for r in results}
    if len(channels) > 1 or len(dims) > 1:
        root = Path(dataset.root) / "imagesTr"
        odd = next(r for r in results if r["n_channels"] != results[0]["n_channels"]
                   or len(r["shape"]) != len(results[0]["shape"]))
        raise InputError(root, f"cases differ in channels or dimensionality: {results[0]['case']} has "
                               f"{results[0]['n_channels']} channel(s), {len(results[0]['shape'])}D; "
                               f"{odd['case']} has {odd['n_channels']}, {len(odd['shape'])}D")


def geometry_fields(dataset, results, shapes, spacings, source_hash) -> dict:
    dim = shapes.shape[1]
    median_spacing = median_list(spacings, as_int=False)
    smallest = min(median_spacing)
    return {
        "dataset": dataset.name,
        "task_type": dataset.task_type,
        "dim": int(dim),
        "axis_order": ["z", "y", "x"][-dim:] if dim <= 3 else [f"axis{i}" for i in range(dim)],
        "n_cases": len(results),
        "case_ids": [r["case"] for r in results],
        "shapes": [r["shape"] for r in results],
        "spacings": [r["spacing"] for r in results],
        "median_shape": median_list(shapes),
        "median_spacing": median_spacing,
        "shape_percentiles": _axis_percentiles(shapes),
        "spacing_percentiles": _axis_percentiles(spacings),
        "anisotropy": float(max(median_spacing) / smallest) if smallest > 0 else 1.0,
        "total_voxels": int(sum(r["n_voxels"] for r in results)),
        "disk_bytes": int(sum(r["disk_bytes"] for r in results)),
        "source_hash": source_hash,
    }


def median_list(values: np.ndarray, as_int=True) -> list:
    """Per-axis median; shapes stay whole numbers when the median is one (as nnU-Net reports)."""
    median = np.median(np.asarray(values, dtype=float), axis=0)
    if as_int:
        return [int(m) if float(m).is_integer() else float(m) for m in median]
    return [float(m) for m in median]


def _axis_percentiles(values: np.ndarray) -> dict:
    return {
        "min": np.min(values, axis=0).tolist(),
        "p5": np.percentile(values, 5, axis=0).tolist(),
        "p95": np.percentile(values, 95, axis=0).tolist(),
        "max": np.max(values, axis=0).tolist(),
    }


def spacing_notes(results) -> list:
    if all(r["source_format"] in NATURAL_FORMATS for r in results):
        return ["natural image files (PNG/JPEG/...) store no physical spacing: spacing 1 is "
                "used, so sizes in mm are sizes in pixels"]
    return []
