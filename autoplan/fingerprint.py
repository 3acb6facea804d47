"""Fingerprint: what a dataset is (shapes, spacings, intensities, labels, classes).

Entry function: ``fingerprint_dataset(dataset, results_dir, force, n_jobs)`` writes
``RESULTS/NAME/fingerprint.json`` and returns the :class:`Fingerprint`. It is cached:
the file is reused while the dataset's files (names, sizes, mtimes) and dataset.json
are unchanged.

Segmentation follows nnU-Net v2's fingerprint extractor so the numbers agree with it:
shapes after cropping to the bounding box of the nonzero voxels of all channels, the
median relative size after cropping, and foreground intensity statistics from a
per-case sample in which every case carries the same weight (nnU-Net draws
``1e8 // n_cases`` foreground voxels per case, with replacement, seed 1234).
Classification reads each image once and keeps only small per-image summaries
(size, channel sums, a pixel hash) for class balance, groups and duplicates.
"""

import functools
import hashlib
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoplan.errors import InputError
from autoplan.jsonio import JsonDataclass
from autoplan.parallel import parallel_map

# Bump when the computation changes: it is part of the cache key. 2: per-case intensity
# percentiles, label fractions and components, source formats (for prediction's quality flags).
FINGERPRINT_VERSION = 2
# nnU-Net v2 samples at most 10e7 foreground voxels for the whole dataset, spread evenly.
MAX_FOREGROUND_SAMPLES = int(10e7)
SAMPLE_SEED = 1234
# Per-case maxima spanning more than this factor mean one global scale cannot fit all cases.
INTENSITY_SCALE_RATIO = 10.0
NATURAL_FORMATS = ("png", "jpeg", "tiff", "bmp")
# Per-case intensity percentiles that prediction compares new images with (autoplan/qc.py).
CASE_PERCENTILES = (0.5, 50.0, 99.5)
# Integer pixels spanning at most this many values are counted in a histogram (exact, and about
# 8x faster than sorting: it matters over thousands of photos); others are sorted.
HISTOGRAM_SPAN = 1 << 20
# Larger images give their percentiles from an even subsample of this many values: ample for
# ranges that quality checks widen by 3-4x.
PERCENTILE_SAMPLE = 1_000_000


@dataclass
class ChannelInfo:
    name: str
    kind: str            # 'xray' | 'rgb' | 'mr' | 'ct' | 'grey'
    kind_reason: str     # why this kind was guessed ("values span -1024..3071 HU")


@dataclass
class IntensityStats:
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class LabelStats:
    name: str
    voxel_fraction: float                 # of all voxels in the dataset
    case_fraction: float                  # fraction of cases where the label is present
    components_per_case_median: float
    component_size_median_voxels: float
    component_size_median_mm: float       # mm^3 (3D) or mm^2 (2D); pixels where no spacing is known
    voxel_count: int = 0                  # voxels of this label in the whole dataset
    components_per_case_max: int = 0      # most components seen in one case


@dataclass
class Fingerprint(JsonDataclass):
    dataset: str
    task_type: str                        # 'segmentation' | 'classification'
    dim: int                              # 2 | 3
    axis_order: list                      # ['z', 'y', 'x'] or ['y', 'x']: the order of every shape/spacing here
    n_cases: int
    channels: list[ChannelInfo]
    case_ids: list
    shapes: list                          # per case, spatial, array axis order
    spacings: list                        # per case, array axis order (mm; 1.0 where unknown)
    median_shape: list
    median_spacing: list
    shape_percentiles: dict               # {"p5": [...], "p95": [...]}
    spacing_percentiles: dict
    anisotropy: float                     # largest / smallest median spacing
    total_voxels: int
    disk_bytes: int
    source_hash: str                      # of file names, sizes and mtimes: the cache key
    # segmentation (None for classification)
    cropped_shapes: list | None = None
    median_cropped_shape: list | None = None
    median_relative_size_after_cropping: float | None = None
    intensity: list[IntensityStats] | None = None           # per channel, foreground voxels
    per_case_intensity_max: list | None = None               # per case, channel 0
    intensity_scales_differ: bool | None = None             # per-case normalisation needed
    labels: dict[str, LabelStats] | None = None              # by label id as string
    foreground_fraction: float | None = None
    # classification (None for segmentation)
    class_counts: dict | None = None
    class_frequencies: dict | None = None
    imbalance_ratio: float | None = None                     # largest / smallest class count
    n_groups: int | None = None
    images_per_group: dict | None = None                     # {"median":, "max":, "mean":}
    groups_per_class: dict | None = None
    aspect_ratios: dict | None = None                        # {"median":, "p5":, "p95":} width / height
    channel_mean: list | None = None                         # per channel, 0..1 scale for 8-bit
    channel_std: list | None = None
    duplicates: list = field(default_factory=list)           # [{"hash":, "cases": [...], "classes": [...]}]
    notes: list = field(default_factory=list)                # human-readable observations
    # added after the first interface (all optional)
    background_foreground_ratio: float | None = None         # background voxels per foreground voxel
    groups_with_several_classes: int | None = None           # classification: groups whose images disagree
    # per-case summaries prediction's quality flags compare with (autoplan/qc.py); None before v2
    source_formats: list | None = None                       # distinct image formats ('png', 'nifti', ...)
    per_case_intensity_percentiles: list | None = None       # per case, per channel [p0.5, p50, p99.5], whole image
    per_case_label_fractions: list | None = None             # per case {label id: fraction of voxels}; None: no mask
    per_case_label_components: list | None = None            # per case {label id: components, full connectivity}


# ============================================================================ entry


def fingerprint_dataset(dataset, results_dir, force=False, n_jobs=None) -> Fingerprint:
    """Fingerprint ``dataset`` into ``results_dir/NAME/fingerprint.json`` (cached by source hash)."""
    path = Path(results_dir) / dataset.name / "fingerprint.json"
    source_hash = dataset_source_hash(dataset)
    if not force:
        cached = _load_cached(path, source_hash)
        if cached is not None:
            return cached
    if not dataset.cases:
        raise InputError(Path(dataset.root) / "imagesTr", "no cases found (expected CASE_0000"
                         f"{dataset.file_ending} files or a 'cases' list in dataset.json)")
    if dataset.task_type == "classification":
        fingerprint = _fingerprint_classification(dataset, source_hash, n_jobs)
    elif dataset.task_type == "segmentation":
        fingerprint = _fingerprint_segmentation(dataset, source_hash, n_jobs)
    else:
        raise InputError(Path(dataset.root) / "dataset.json",
                         f"unknown task_type {dataset.task_type!r} (segmentation or classification)")
    fingerprint.save(path)
    return fingerprint


def dataset_source_hash(dataset) -> str:
    """Hash of every case file's name, size and mtime, and of dataset.json: the cache key.

    Missing files raise InputError here, before any work starts.
    """
    root = Path(dataset.root)
    digest = hashlib.sha256(f"autoplan-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    files = [root / "dataset.json"]
    for case in dataset.cases:
        files.extend(Path(p) for p in case.images)
        if case.label is not None:
            files.append(Path(case.label))
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            raise InputError(path, "missing (listed by dataset.json or the images of a case)") from None
        name = os.path.relpath(path, root)
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _load_cached(path: Path, source_hash: str):
    if not path.is_file():
        return None
    try:
        cached = Fingerprint.load(path)
    except (ValueError, TypeError, KeyError, OSError):
        return None  # unreadable or from an older layout: recompute
    return cached if cached.source_hash == source_hash else None


def _map_cases(analyze, jobs, n_jobs) -> list:
    """``analyze`` over the cases in parallel; the first case's InputError is raised here."""
    results = parallel_map(functools.partial(_report_input_errors, analyze), jobs,
                           n_jobs=n_jobs, desc="fingerprint")
    for result in results:
        if "input_error" in result:
            raise InputError(*result["input_error"])
    return results


def _report_input_errors(analyze, job) -> dict:
    """Runs in a worker: an InputError comes back as data (it does not survive pickling)."""
    try:
        return analyze(job)
    except InputError as error:
        return {"input_error": (error.path, error.problem)}


# ============================================================================ segmentation


def _fingerprint_segmentation(dataset, source_hash: str, n_jobs) -> Fingerprint:
    label_ids = sorted(dataset.foreground_labels)
    samples_per_case = int(MAX_FOREGROUND_SAMPLES // len(dataset.cases))
    jobs = [(case.id, [str(p) for p in case.images], case.label and str(case.label), label_ids,
             samples_per_case) for case in dataset.cases]
    results = _map_cases(_analyze_segmentation_case, jobs, n_jobs)
    _check_consistent(dataset, results)

    n_channels = results[0]["n_channels"]
    spacings = np.array([r["spacing"] for r in results], dtype=float)
    shapes = np.array([r["shape"] for r in results], dtype=float)
    intensity = [_combine_foreground_samples([r["samples"][c] for r in results])
                 for c in range(n_channels)]
    total_voxels = int(sum(r["n_voxels"] for r in results))
    labels = _label_stats(dataset, results, label_ids, total_voxels)
    foreground = sum(stats.voxel_count for stats in labels.values())
    maxima = [r["channel_max"][0] for r in results]
    fingerprint = Fingerprint(
        **_geometry_fields(dataset, results, shapes, spacings, source_hash),
        channels=_channel_kinds(dataset, results),
        cropped_shapes=[r["cropped_shape"] for r in results],
        median_cropped_shape=_median_list(np.array([r["cropped_shape"] for r in results])),
        median_relative_size_after_cropping=float(np.median([r["relative_size"] for r in results])),
        intensity=intensity,
        per_case_intensity_max=maxima,
        intensity_scales_differ=_scales_differ(maxima),
        labels=labels,
        foreground_fraction=foreground / total_voxels if total_voxels else 0.0,
        background_foreground_ratio=(total_voxels - foreground) / foreground if foreground else None,
        source_formats=sorted({r["source_format"] for r in results}),
        per_case_intensity_percentiles=[r["percentiles"] for r in results],
        per_case_label_fractions=[_case_label_fractions(r, label_ids) for r in results],
        per_case_label_components=[{str(i): r["full_components"][i] for i in label_ids} if r["has_mask"] else None
                                   for r in results],
    )
    fingerprint.notes = _segmentation_notes(fingerprint) + _spacing_notes(results)
    unlabelled = sum(1 for r in results if not r["has_mask"])
    if unlabelled:
        fingerprint.notes.insert(0, f"{unlabelled} of {len(results)} cases have no mask: label and "
                                    "foreground statistics cover only the labelled cases' voxels")
    return fingerprint


def _analyze_segmentation_case(job) -> dict:
    """One case: geometry, crop to nonzero, foreground sample, label voxels and components.

    Runs in a worker; returns small arrays only (the foreground sample is the largest).
    """
    case_id, image_paths, label_path, label_ids, samples_per_case = job
    image = _read_channels(image_paths)
    seg = _read_mask(label_path, image, image_paths, label_ids)
    data = image.array

    # nnU-Net crops to the bounding box of the nonzero voxels of all channels (after filling
    # holes, which cannot change a bounding box, so it is skipped here).
    nonzero = np.any(data != 0, axis=0)
    box = _bounding_box(nonzero)
    cropped_seg = seg[box]
    cropped_data = data[(slice(None), *box)]
    foreground = cropped_seg > 0
    samples = _foreground_sample(cropped_data, foreground, samples_per_case)

    voxel_volume = float(np.prod(image.spacing))
    counts, components, full_components = {}, {}, {}
    for label_id in label_ids:
        mask = seg == label_id
        counts[label_id] = int(mask.sum())
        components[label_id] = _component_sizes(mask) if counts[label_id] else []
        full_components[label_id] = full_component_count(mask) if counts[label_id] else 0
    flat = data.reshape(data.shape[0], -1)
    return {
        "case": case_id,
        "n_channels": int(data.shape[0]),
        "shape": [int(s) for s in image.spatial_shape],
        "spacing": [float(s) for s in image.spacing],
        "voxel_volume": voxel_volume,
        "n_voxels": int(seg.size),
        "disk_bytes": sum(os.path.getsize(p) for p in image_paths + [label_path] if p),
        "has_mask": label_path is not None,
        "cropped_shape": [int(s.stop - s.start) for s in box],
        "relative_size": float(cropped_seg.size / seg.size),
        "samples": samples,
        "label_counts": counts,
        "components": components,
        "full_components": full_components,
        "percentiles": intensity_percentiles(data),
        "channel_min": [float(v) for v in flat.min(axis=1)],
        "channel_max": [float(v) for v in flat.max(axis=1)],
        "integer_valued": [_is_integer_valued(c) for c in flat],
        "source_format": image.source_format,
        "bit_depth": image.meta.get("bit_depth"),
        "dtype": str(data.dtype),
    }


def _read_mask(label_path, image, image_paths, label_ids) -> np.ndarray:
    """The case's label map as integers; all background for a case without a mask."""
    if label_path is None:  # unlabelled import (e.g. DICOM studies for prediction)
        return np.zeros(image.spatial_shape, dtype=np.uint8)
    seg_image = _read(label_path)
    if seg_image.n_channels != 1:
        raise InputError(label_path, f"a mask must have one channel, found {seg_image.n_channels} "
                                     "(colour mask? import it with --label-map)")
    seg = seg_image.array[0]
    if seg.shape != image.spatial_shape:
        raise InputError(label_path, f"mask shape {list(seg.shape)} differs from the image's "
                                     f"{list(image.spatial_shape)} ({image_paths[0]})")
    return _integer_labels(seg, label_path, label_ids)


def _read(path):
    from autoplan.io.images import read_image  # imported here: workers need only this

    return read_image(path)


def _read_channels(paths):
    """One ImageData with the channels of all of a case's files stacked."""
    images = [_read(p) for p in paths]
    first = images[0]
    for path, other in zip(paths[1:], images[1:]):
        if other.spatial_shape != first.spatial_shape:
            raise InputError(path, f"shape {list(other.spatial_shape)} differs from "
                                   f"{list(first.spatial_shape)} of {paths[0]}")
    if len(images) > 1:
        first.array = np.concatenate([im.array for im in images], axis=0)
    return first


def _integer_labels(seg: np.ndarray, path, label_ids) -> np.ndarray:
    """The mask as integers; values that dataset.json does not declare are an input error."""
    if np.issubdtype(seg.dtype, np.floating):
        if not np.array_equal(seg, np.round(seg)):
            raise InputError(path, "mask holds fractional values; masks hold integer label ids")
        seg = seg.astype(np.int64)
    present = np.unique(seg)
    unknown = sorted(set(present.tolist()) - set(label_ids) - {0})
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10])
        raise InputError(path, f"mask holds values {shown} that dataset.json's labels do not declare "
                               f"(declared: {sorted(set(label_ids) | {0})})")
    return seg


def _bounding_box(mask: np.ndarray) -> tuple:
    """Slices of the bounding box of ``mask``; the whole array when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _foreground_sample(data: np.ndarray, foreground: np.ndarray, samples_per_case: int) -> list:
    """Per channel, this case's foreground intensities as nnU-Net would weigh them.

    nnU-Net draws ``samples_per_case`` voxels with replacement (RandomState(1234), one
    draw per channel in order). When the case has no more foreground voxels than that,
    all of them, equally weighted, are that draw's expectation (and far smaller to ship);
    otherwise we make the very same draw.
    """
    n_foreground = int(foreground.sum())
    if n_foreground == 0:
        return [np.zeros(0, dtype=np.float32) for _ in range(data.shape[0])]
    values = [channel[foreground].astype(np.float32) for channel in data]
    if n_foreground <= samples_per_case:
        return values
    random = np.random.RandomState(SAMPLE_SEED)
    return [random.choice(v, samples_per_case, replace=True) for v in values]


def _component_sizes(mask: np.ndarray) -> list:
    """Voxel counts of the face-connected components of ``mask``."""
    components, n = ndimage.label(mask)
    return np.bincount(components.ravel())[1:].tolist() if n else []


def full_component_count(mask: np.ndarray) -> int:
    """Connected components of ``mask`` with full connectivity (diagonals join), as
    ``inference.largest_component`` counts them: what prediction's quality check compares."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return int(ndimage.label(mask, structure=structure)[1])


def _case_label_fractions(result: dict, label_ids) -> dict | None:
    """{label id: fraction of the case's voxels}; None for a case without a mask (nothing known)."""
    if not result["has_mask"]:
        return None
    return {str(i): result["label_counts"][i] / result["n_voxels"] for i in label_ids}


def intensity_percentiles(array: np.ndarray) -> list:
    """Per channel ``[p0.5, p50, p99.5]`` of a channel-first image (np.percentile's linear rule)."""
    array = np.asarray(array)
    return [_channel_percentiles(channel.ravel()) for channel in array.reshape(array.shape[0], -1)]


def _channel_percentiles(values: np.ndarray) -> list:
    if values.dtype.kind in "biu":
        low = int(values.min())
        if int(values.max()) - low <= HISTOGRAM_SPAN:
            shifted = values if low == 0 and values.dtype.kind in "bu" else values.astype(np.int64) - low
            return [low + v for v in _histogram_percentiles(np.bincount(shifted), CASE_PERCENTILES)]
    probe = values[:: max(1, values.size // PERCENTILE_SAMPLE)].astype(np.float64)
    return [float(v) for v in np.percentile(probe, CASE_PERCENTILES)]


def _histogram_percentiles(counts: np.ndarray, percentiles) -> list:
    """np.percentile (linear) of the values 0..len(counts)-1 counted ``counts`` times."""
    cumulative = np.cumsum(counts)
    positions = np.asarray(percentiles, dtype=np.float64) / 100.0 * (cumulative[-1] - 1)
    below = np.floor(positions)
    above = np.minimum(below + 1, cumulative[-1] - 1)
    value_below = np.searchsorted(cumulative, below, side="right")
    value_above = np.searchsorted(cumulative, above, side="right")
    return (value_below + (positions - below) * (value_above - value_below)).astype(float).tolist()


def _is_integer_valued(values: np.ndarray) -> bool:
    if not np.issubdtype(values.dtype, np.floating):
        return True
    probe = values[:: max(1, values.size // 100_000)]  # a strided probe is enough to tell
    return bool(np.array_equal(probe, np.round(probe)))


def _combine_foreground_samples(per_case: list) -> IntensityStats | None:
    """nnU-Net's statistics over the pooled samples, each case weighing the same."""
    per_case = [s for s in per_case if len(s)]
    if not per_case:
        return None
    values = np.concatenate(per_case).astype(np.float64)
    weights = np.concatenate([np.full(len(s), 1.0 / len(s)) for s in per_case])
    total = weights.sum()
    mean = float(np.dot(weights, values) / total)
    std = float(np.sqrt(np.dot(weights, (values - mean) ** 2) / total))
    p005, median, p995 = _weighted_percentiles(values, weights, (0.5, 50.0, 99.5))
    return IntensityStats(mean=mean, median=median, std=std, min=float(values.min()),
                          max=float(values.max()), percentile_00_5=p005, percentile_99_5=p995)


def _weighted_percentiles(values, weights, percentiles) -> list:
    """Percentiles of a weighted sample: each value sits at the middle of its weight.

    With equal weights this is np.percentile up to O(1/N) in position.
    """
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    cumulative = np.cumsum(weights)
    positions = (cumulative - weights / 2) / cumulative[-1]
    return [float(np.interp(p / 100.0, positions, values)) for p in percentiles]


def _check_consistent(dataset, results) -> None:
    channels = {r["n_channels"] for r in results}
    dims = {len(r["shape"]) for r in results}
    if len(channels) > 1 or len(dims) > 1:
        root = Path(dataset.root) / "imagesTr"
        odd = next(r for r in results if r["n_channels"] != results[0]["n_channels"]
                   or len(r["shape"]) != len(results[0]["shape"]))
        raise InputError(root, f"cases differ in channels or dimensionality: {results[0]['case']} has "
                               f"{results[0]['n_channels']} channel(s), {len(results[0]['shape'])}D; "
                               f"{odd['case']} has {odd['n_channels']}, {len(odd['shape'])}D")


def _label_stats(dataset, results, label_ids, total_voxels) -> dict:
    names = dataset.foreground_labels
    n_cases = len(results)
    stats = {}
    for label_id in label_ids:
        counts = [r["label_counts"][label_id] for r in results]
        present = [r for r in results if r["label_counts"][label_id] > 0]
        per_case = [len(r["components"][label_id]) for r in present]
        sizes = [s for r in present for s in r["components"][label_id]]
        sizes_mm = [s * r["voxel_volume"] for r in present for s in r["components"][label_id]]
        stats[str(label_id)] = LabelStats(
            name=names[label_id],
            voxel_fraction=sum(counts) / total_voxels if total_voxels else 0.0,
            case_fraction=len(present) / n_cases,
            components_per_case_median=float(np.median(per_case)) if per_case else 0.0,
            component_size_median_voxels=float(np.median(sizes)) if sizes else 0.0,
            component_size_median_mm=float(np.median(sizes_mm)) if sizes_mm else 0.0,
            voxel_count=int(sum(counts)),
            components_per_case_max=int(max(per_case)) if per_case else 0,
        )
    return stats


def _scales_differ(maxima) -> bool:
    positive = [m for m in maxima if m > 0]
    if len(positive) < 2:
        return False
    return max(positive) / min(positive) > INTENSITY_SCALE_RATIO


def _segmentation_notes(fp: Fingerprint) -> list:
    notes = []
    if fp.intensity_scales_differ:
        maxima = np.array(fp.per_case_intensity_max, dtype=float)
        n_high = int((maxima > 10 * np.median(maxima)).sum())
        notes.append(f"intensity scales differ between cases: per-case maxima run from "
                     f"{format_number(maxima.min())} to {format_number(maxima.max())} ({n_high} cases above 10x the "
                     "median maximum); normalise each case on its own (z-score), not with global values")
    if fp.anisotropy > 3:
        notes.append(f"anisotropic spacing (largest/smallest median spacing {fp.anisotropy:.1f}): "
                     "consider a 2D configuration or anisotropic pooling")
    if fp.median_relative_size_after_cropping is not None and fp.median_relative_size_after_cropping < 0.75:
        notes.append(f"cropping to the nonzero region keeps a median "
                     f"{fp.median_relative_size_after_cropping:.0%} of each image")
    for label_id, stats in (fp.labels or {}).items():
        if stats.case_fraction < 1:
            notes.append(f"label {label_id} ({stats.name}) is absent from "
                         f"{1 - stats.case_fraction:.0%} of cases")
        if stats.components_per_case_median > 1:
            notes.append(f"label {label_id} ({stats.name}) has a median of "
                         f"{stats.components_per_case_median:g} components per case: "
                         "do not keep only the largest component")
    if fp.foreground_fraction is not None and 0 < fp.foreground_fraction < 0.01:
        notes.append(f"foreground is {fp.foreground_fraction:.2%} of voxels: oversample foreground patches")
    for channel in fp.channels:
        notes.append(f"channel {channel.name!r} taken as {channel.kind}: {channel.kind_reason}")
    return notes


# ============================================================================ channel kinds

_RGB_NAMES = {"R", "G", "B", "RED", "GREEN", "BLUE"}
_MR_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "T1C", "T1GD", "T1CE", "T2W", "T1W")
_XRAY_WORDS = ("XRAY", "X-RAY", "CXR", "RADIOGRAPH", "DX", "CR")


def _channel_kinds(dataset, results) -> list:
    dim = len(results[0]["shape"])
    names = [str(dataset.channel_names.get(str(c), f"channel {c}")) for c in range(results[0]["n_channels"])]
    if results[0]["n_channels"] == 3 and len(dataset.channel_names) < 3:
        names = ["R", "G", "B"]  # one RGB file read as three channels
    elif results[0]["n_channels"] == 1 and names[0].upper() in _RGB_NAMES:
        names = ["grey"]  # declared RGB, stored grey
    kinds = []
    for c, name in enumerate(names):
        low = min(r["channel_min"][c] for r in results)
        high = max(r["channel_max"][c] for r in results)
        kind, reason = _guess_kind(
            name, dim, low, high,
            integer=all(r["integer_valued"][c] for r in results),
            natural=all(r["source_format"] in NATURAL_FORMATS for r in results),
            eight_bit=all(r["bit_depth"] == 8 or r["dtype"] == "uint8" for r in results),
            n_channels=len(names),
        )
        kinds.append(ChannelInfo(name=name, kind=kind, kind_reason=reason))
    return kinds


def _guess_kind(name, dim, low, high, integer, natural, eight_bit, n_channels):
    """(kind, reason): the channel's name when it says, else the intensity range."""
    words = set(re.split(r"[^A-Z0-9-]+", name.upper()))
    span = f"values {format_number(low)}..{format_number(high)}"
    if name.upper() in _RGB_NAMES:
        return "rgb", f"channel name {name!r} (colour image)"
    if "CT" in words:
        return "ct", f"channel name {name!r} ({span})"
    if words & set(_XRAY_WORDS):
        return "xray", f"channel name {name!r} ({span})"
    if words & set(_MR_WORDS):
        return "mr", f"channel name {name!r} ({span})"
    # Air is -1000 HU; MR and photographs never go that far below zero.
    if low < -500 and integer:
        return "ct", (f"guessed from intensities: integer {span}, minimum below -500, "
                      "which look like Hounsfield units")
    if dim == 2 and natural and eight_bit and n_channels == 1:
        return "xray", f"guessed: 8-bit grey 2D images ({span}), taken as radiographs"
    if dim == 2:
        return "grey", f"guessed: 2D grey images ({span})"
    return "mr", f"guessed: volumes with {span}, no values below -500 (not CT), taken as MR"


# ============================================================================ classification


def _fingerprint_classification(dataset, source_hash: str, n_jobs) -> Fingerprint:
    classes = list(dataset.classes) if dataset.classes else sorted({c.class_name for c in dataset.cases})
    for case in dataset.cases:
        if case.class_name not in classes:
            raise InputError(Path(dataset.root) / "dataset.json",
                             f"case {case.id!r} has class {case.class_name!r}, not in classes {classes}")
    jobs = [(case.id, [str(p) for p in case.images]) for case in dataset.cases]
    results = _map_cases(_analyze_classification_case, jobs, n_jobs)
    _check_consistent(dataset, results)

    shapes = np.array([r["shape"] for r in results], dtype=float)
    spacings = np.array([r["spacing"] for r in results], dtype=float)
    counts = Counter(case.class_name for case in dataset.cases)
    class_counts = {name: int(counts.get(name, 0)) for name in classes}
    nonzero_counts = [n for n in class_counts.values() if n > 0]
    mean, std = _channel_moments(results)
    aspect = shapes[:, -1] / shapes[:, -2]  # width / height
    fingerprint = Fingerprint(
        **_geometry_fields(dataset, results, shapes, spacings, source_hash),
        channels=_classification_channels(dataset, results),
        class_counts=class_counts,
        class_frequencies={k: v / len(results) for k, v in class_counts.items()},
        imbalance_ratio=max(nonzero_counts) / min(nonzero_counts),
        aspect_ratios={"median": float(np.median(aspect)), "p5": float(np.percentile(aspect, 5)),
                       "p95": float(np.percentile(aspect, 95)), "min": float(aspect.min()),
                       "max": float(aspect.max())},
        channel_mean=mean,
        channel_std=std,
        duplicates=_duplicates(dataset, results),
        source_formats=sorted({r["source_format"] for r in results}),
        per_case_intensity_percentiles=[r["percentiles"] for r in results],
    )
    _group_fields(fingerprint, dataset, classes)
    fingerprint.notes = _classification_notes(fingerprint, class_counts) + _spacing_notes(results)
    return fingerprint


def _analyze_classification_case(job) -> dict:
    """One image read once: size, per-channel sums on a 0..1 scale, and a hash of its pixels."""
    case_id, image_paths = job
    image = _read_channels(image_paths)
    data = image.array
    flat = data.reshape(data.shape[0], -1)
    sums, squares = _channel_sums(flat)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype.str}{data.shape}".encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return {
        "case": case_id,
        "n_channels": int(data.shape[0]),
        "shape": [int(s) for s in image.spatial_shape],
        "spacing": [float(s) for s in image.spacing],
        "n_voxels": int(flat.shape[1]),
        "disk_bytes": sum(os.path.getsize(p) for p in image_paths),
        "sums": sums,
        "sums_of_squares": squares,
        "hash": digest.hexdigest(),
        "percentiles": intensity_percentiles(data),
        "source_format": image.source_format,
        "bit_depth": image.meta.get("bit_depth"),
        "dtype": str(data.dtype),
        "channel_min": [float(v) for v in flat.min(axis=1)],
        "channel_max": [float(v) for v in flat.max(axis=1)],
        "integer_valued": [_is_integer_valued(c) for c in flat],
    }


def _channel_sums(flat: np.ndarray) -> tuple:
    """Per-channel sums and sums of squares on the 0..1 scale.

    8/16-bit pixels are summed as exact integers (faster than floats, no rounding).
    """
    scale = _full_scale(flat.dtype)
    if flat.dtype in (np.uint8, np.uint16, bool):
        wide = flat.astype(np.uint64)
        sums = wide.sum(axis=1)
        squares = np.einsum("ij,ij->i", wide, wide)
        return (sums / scale).tolist(), (squares / scale ** 2).tolist()
    values = flat.astype(np.float64) / scale
    return values.sum(axis=1).tolist(), np.einsum("ij,ij->i", values, values).tolist()


def _full_scale(dtype) -> float:
    """The divisor that puts integer pixels on 0..1 (8-bit: 255, 16-bit: 65535); floats stay."""
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype == bool:
        return 1.0
    return 1.0


def _channel_moments(results) -> tuple:
    n = sum(r["n_voxels"] for r in results)
    sums = np.sum([r["sums"] for r in results], axis=0)
    squares = np.sum([r["sums_of_squares"] for r in results], axis=0)
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
    return mean.tolist(), std.tolist()


def _classification_channels(dataset, results) -> list:
    n_channels = results[0]["n_channels"]
    if n_channels == 3:
        reason = ("channel names R, G, B" if len(dataset.channel_names) >= 3
                  else "3-channel colour images")
        return [ChannelInfo(name=n, kind="rgb", kind_reason=reason) for n in ("R", "G", "B")]
    return _channel_kinds(dataset, results)


def _duplicates(dataset, results) -> list:
    """Sets of images with identical decoded pixels, with their classes and groups."""
    by_hash = defaultdict(list)
    for case, result in zip(dataset.cases, results):
        by_hash[result["hash"]].append(case)
    duplicates = []
    for digest, cases in by_hash.items():
        if len(cases) < 2:
            continue
        classes = [c.class_name for c in cases]
        groups = [c.group for c in cases]
        duplicates.append({
            "hash": digest,
            "cases": [c.id for c in cases],
            "classes": classes,
            "groups": groups,
            "same_class": len(set(classes)) == 1,
            "same_group": len(set(groups)) == 1 and groups[0] is not None,
        })
    return duplicates


def _group_fields(fp: Fingerprint, dataset, classes) -> None:
    """Groups (patient/lesion): a group's images must stay on one side of every split."""
    if all(case.group is None for case in dataset.cases):
        return
    # An image without a group is a group of its own.
    groups = [case.group if case.group is not None else f"__case__{case.id}" for case in dataset.cases]
    sizes = np.array(list(Counter(groups).values()))
    fp.n_groups = int(len(sizes))
    fp.images_per_group = {"median": float(np.median(sizes)), "mean": float(sizes.mean()),
                           "max": int(sizes.max()), "groups_with_several_images": int((sizes > 1).sum())}
    classes_of_group = defaultdict(set)
    for group, case in zip(groups, dataset.cases):
        classes_of_group[group].add(case.class_name)
    fp.groups_per_class = {name: sum(1 for s in classes_of_group.values() if name in s) for name in classes}
    fp.groups_with_several_classes = sum(1 for s in classes_of_group.values() if len(s) > 1)


def _classification_notes(fp: Fingerprint, class_counts: dict) -> list:
    notes = []
    empty = [name for name, n in class_counts.items() if n == 0]
    if empty:
        notes.append(f"classes without images: {', '.join(empty)}")
    if fp.imbalance_ratio and fp.imbalance_ratio > 3:
        largest = max(class_counts, key=class_counts.get)
        smallest = min((k for k in class_counts if class_counts[k]), key=class_counts.get)
        notes.append(f"classes are imbalanced: {largest} {class_counts[largest]} vs {smallest} "
                     f"{class_counts[smallest]} ({fp.imbalance_ratio:.1f}x): use class weights or "
                     "balanced sampling, and report balanced accuracy")
    if fp.n_groups is None:
        notes.append("no groups (patient/lesion) given: each image is split on its own; images of "
                     "one patient in training and validation would inflate scores")
    elif fp.n_groups < fp.n_cases:
        notes.append(f"{fp.n_cases} images belong to {fp.n_groups} groups (up to "
                     f"{fp.images_per_group['max']} images per group): split by group")
    if fp.groups_with_several_classes:
        notes.append(f"{fp.groups_with_several_classes} groups hold images of different classes")
    if fp.duplicates:
        n_images = sum(len(d["cases"]) for d in fp.duplicates)
        cross_group = sum(1 for d in fp.duplicates if not d["same_group"])
        conflicting = sum(1 for d in fp.duplicates if not d["same_class"])
        notes.append(f"{len(fp.duplicates)} sets of identical images ({n_images} images); "
                     f"{cross_group} sets span different groups and would leak across a split; "
                     f"{conflicting} sets carry conflicting classes")
    if len({tuple(s) for s in fp.shapes}) > 1:
        notes.append(f"image sizes vary (median {format_shape(fp.median_shape)}, aspect ratio "
                     f"{fp.aspect_ratios['p5']:.2f}..{fp.aspect_ratios['p95']:.2f} for 90% of images)")
    for channel in fp.channels[:1] if fp.channels and fp.channels[0].kind == "rgb" else fp.channels:
        notes.append(f"channel {channel.name!r} taken as {channel.kind}: {channel.kind_reason}")
    return notes


# ============================================================================ shared


def _geometry_fields(dataset, results, shapes, spacings, source_hash) -> dict:
    dim = shapes.shape[1]
    median_spacing = _median_list(spacings, as_int=False)
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
        "median_shape": _median_list(shapes),
        "median_spacing": median_spacing,
        "shape_percentiles": _percentiles(shapes),
        "spacing_percentiles": _percentiles(spacings),
        "anisotropy": float(max(median_spacing) / smallest) if smallest > 0 else 1.0,
        "total_voxels": int(sum(r["n_voxels"] for r in results)),
        "disk_bytes": int(sum(r["disk_bytes"] for r in results)),
        "source_hash": source_hash,
    }


def _spacing_notes(results) -> list:
    if all(r["source_format"] in NATURAL_FORMATS for r in results):
        return ["natural image files (PNG/JPEG/...) store no physical spacing: spacing 1 is "
                "used, so sizes in mm are sizes in pixels"]
    return []


def _median_list(values: np.ndarray, as_int=True) -> list:
    """Per-axis median; shapes stay whole numbers when the median is one (as nnU-Net reports)."""
    median = np.median(np.asarray(values, dtype=float), axis=0)
    if as_int:
        return [int(m) if float(m).is_integer() else float(m) for m in median]
    return [float(m) for m in median]


def _percentiles(values: np.ndarray) -> dict:
    return {
        "min": np.min(values, axis=0).tolist(),
        "p5": np.percentile(values, 5, axis=0).tolist(),
        "p95": np.percentile(values, 95, axis=0).tolist(),
        "max": np.max(values, axis=0).tolist(),
    }


def format_number(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def format_shape(values) -> str:
    return " x ".join(format_number(v) for v in values)


def _bytes_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ============================================================================ summary


def format_fingerprint_summary(fp: Fingerprint) -> str:
    """A readable multi-line summary for the terminal."""
    axes = ",".join(fp.axis_order)
    lines = [
        f"Dataset {fp.dataset}: {fp.task_type}, {fp.dim}D, {fp.n_cases} cases, "
        f"{len(fp.channels)} channel(s)",
    ]
    for index, channel in enumerate(fp.channels):
        lines.append(f"  channel {index} {channel.name!r}: {channel.kind} ({channel.kind_reason})")
    lines += [
        f"  shapes and spacings in axis order ({axes})",
        f"  median shape    {format_shape(fp.median_shape)}   "
        f"(p5 {format_shape(fp.shape_percentiles['p5'])}, p95 {format_shape(fp.shape_percentiles['p95'])})",
        f"  median spacing  {format_shape(fp.median_spacing)} mm   anisotropy {fp.anisotropy:.2f}",
        f"  total           {fp.total_voxels:,} voxels, {_bytes_text(fp.disk_bytes)} on disk",
    ]
    if fp.task_type == "segmentation":
        lines += _segmentation_summary(fp)
    else:
        lines += _classification_summary(fp)
    if fp.notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in fp.notes]
    return "\n".join(lines)


def _segmentation_summary(fp: Fingerprint) -> list:
    lines = [f"  after cropping to nonzero: median shape {format_shape(fp.median_cropped_shape)}, "
             f"median relative size {fp.median_relative_size_after_cropping:.3f}"]
    for index, stats in enumerate(fp.intensity or []):
        if stats is None:
            lines.append(f"  foreground intensity ch{index}: no foreground voxels")
            continue
        lines.append(f"  foreground intensity ch{index}: mean {format_number(stats.mean)}, std {format_number(stats.std)}, "
                     f"median {format_number(stats.median)}, p0.5 {format_number(stats.percentile_00_5)}, "
                     f"p99.5 {format_number(stats.percentile_99_5)}, range {format_number(stats.min)}..{format_number(stats.max)}")
    if fp.per_case_intensity_max:
        lines.append(f"  per-case maximum (ch0): {format_number(min(fp.per_case_intensity_max))}.."
                     f"{format_number(max(fp.per_case_intensity_max))}"
                     f"{'  -> scales differ: normalise per case' if fp.intensity_scales_differ else ''}")
    unit = "mm^3" if fp.dim == 3 else "mm^2"
    lines.append("  labels:")
    for label_id, stats in (fp.labels or {}).items():
        lines.append(f"    {label_id} {stats.name}: {stats.voxel_fraction:.2%} of voxels, in "
                     f"{stats.case_fraction:.0%} of cases, {stats.components_per_case_median:g} "
                     f"component(s)/case (median), median component {format_number(stats.component_size_median_voxels)} "
                     f"voxels = {format_number(stats.component_size_median_mm)} {unit}")
    if fp.foreground_fraction is not None:
        ratio = fp.background_foreground_ratio
        lines.append(f"  foreground {fp.foreground_fraction:.2%} of voxels"
                     + (f" (background:foreground = {ratio:.1f}:1)" if ratio is not None else ""))
    return lines


def _classification_summary(fp: Fingerprint) -> list:
    lines = ["  classes:"]
    for name, count in fp.class_counts.items():
        groups = f", {fp.groups_per_class[name]} groups" if fp.groups_per_class else ""
        lines.append(f"    {name:<12} {count:>7} ({fp.class_frequencies[name]:.1%}){groups}")
    lines.append(f"  imbalance (largest/smallest class): {fp.imbalance_ratio:.1f}")
    if fp.n_groups is not None:
        lines.append(f"  groups: {fp.n_groups} (images per group: median {fp.images_per_group['median']:g}, "
                     f"max {fp.images_per_group['max']})")
    ar = fp.aspect_ratios
    lines.append(f"  aspect ratio (width/height): median {ar['median']:.3f}, p5 {ar['p5']:.3f}, p95 {ar['p95']:.3f}")
    lines.append("  channel mean " + ", ".join(f"{m:.3f}" for m in fp.channel_mean)
                 + "; std " + ", ".join(f"{s:.3f}" for s in fp.channel_std) + " (0..1 scale)")
    lines.append(f"  identical images: {len(fp.duplicates)} sets")
    for dup in fp.duplicates[:5]:
        lines.append(f"    {', '.join(dup['cases'])}: classes {', '.join(map(str, dup['classes']))}")
    if len(fp.duplicates) > 5:
        lines.append(f"    ... {len(fp.duplicates) - 5} more in fingerprint.json")
    return lines
