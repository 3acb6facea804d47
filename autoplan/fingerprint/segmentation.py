"""Segmentation fingerprint, following nnU-Net v2's extractor: shapes after cropping to the
nonzero box, foreground intensities from an equal-weight per-case sample, and per label its
voxels, cases and connected components."""

import functools

import numpy as np
from scipy import ndimage

from autoplan.fingerprint.channels import channel_kinds
from autoplan.fingerprint.geometry import (
    ANISOTROPY_THRESHOLD,
    bounding_box,
    case_summary,
    check_consistent,
    geometry_fields,
    median_list,
    spacing_notes,
)
from autoplan.fingerprint.intensity import (
    MAX_FOREGROUND_SAMPLES,
    combine_foreground_samples,
    foreground_sample,
    scales_differ,
)
from autoplan.fingerprint.summary import format_number
from autoplan.fingerprint.types import Fingerprint, LabelStats
from autoplan.io import read_case_images, read_case_labels
from autoplan.parallel import parallel_map


def fingerprint_segmentation(dataset, source_hash: str, n_jobs) -> Fingerprint:
    label_ids = sorted(dataset.foreground_labels)
    samples_per_case = int(MAX_FOREGROUND_SAMPLES // len(dataset.cases))
    analyze = functools.partial(_analyze_segmentation_case, label_ids=label_ids,
                                samples_per_case=samples_per_case)
    results = parallel_map(analyze, dataset.cases, n_jobs=n_jobs, desc="fingerprint")
    check_consistent(dataset, results)

    n_channels = results[0]["n_channels"]
    spacings = np.array([r["spacing"] for r in results], dtype=float)
    shapes = np.array([r["shape"] for r in results], dtype=float)
    intensity = [combine_foreground_samples([r["samples"][c] for r in results])
                 for c in range(n_channels)]
    total_voxels = int(sum(r["n_voxels"] for r in results))
    labels = _label_stats(dataset, results, label_ids, total_voxels)
    foreground = sum(stats.voxel_count for stats in labels.values())
    maxima = [r["channel_max"][0] for r in results]
    fingerprint = Fingerprint(
        **geometry_fields(dataset, results, shapes, spacings, source_hash),
        channels=channel_kinds(dataset, results),
        cropped_shapes=[r["cropped_shape"] for r in results],
        median_cropped_shape=median_list(np.array([r["cropped_shape"] for r in results])),
        median_relative_size_after_cropping=float(np.median([r["relative_size"] for r in results])),
        intensity=intensity,
        per_case_intensity_max=maxima,
        intensity_scales_differ=scales_differ(maxima),
        labels=labels,
        foreground_fraction=foreground / total_voxels if total_voxels else 0.0,
        background_foreground_ratio=(total_voxels - foreground) / foreground if foreground else None,
        source_formats=sorted({r["source_format"] for r in results}),
        per_case_intensity_percentiles=[r["percentiles"] for r in results],
        per_case_label_fractions=[_case_label_fractions(r, label_ids) for r in results],
        per_case_label_components=[{str(i): r["full_components"][i] for i in label_ids} if r["has_mask"] else None
                                   for r in results],
    )
    fingerprint.notes = _segmentation_notes(fingerprint) + spacing_notes(results)
    unlabelled = sum(1 for r in results if not r["has_mask"])
    if unlabelled:
        fingerprint.notes.insert(0, f"{unlabelled} of {len(results)} cases have no mask: label and "
                                    "foreground statistics cover only the labelled cases' voxels")
    return fingerprint


def _analyze_segmentation_case(case, label_ids, samples_per_case) -> dict:
    """One case: geometry, crop to nonzero, foreground sample, label voxels and components.

    Runs in a worker; returns small arrays only (the foreground sample is the largest).
    """
    image = read_case_images(case)
    if case.label is None:  # unlabelled import (e.g. DICOM studies for prediction): all background
        seg = np.zeros(image.spatial_shape, dtype=np.uint8)
    else:
        seg = read_case_labels(case, image, label_ids)
    data = image.array

    # nnU-Net crops to the bounding box of the nonzero voxels of all channels (after filling
    # holes, which cannot change a bounding box, so it is skipped here).
    box = bounding_box(np.any(data != 0, axis=0))
    cropped_seg = seg[box]
    samples = foreground_sample(data[(slice(None), *box)], cropped_seg > 0, samples_per_case)

    counts, components, full_components = {}, {}, {}
    for label_id in label_ids:
        # Inside the label's bounding box (the same components): labelling a 512 x 512 x 400 CT
        # whole takes seconds and 400 MB of int32 component ids, per label and connectivity.
        mask = seg == label_id
        mask = mask[bounding_box(mask)]
        counts[label_id] = int(mask.sum())
        components[label_id] = component_sizes(mask) if counts[label_id] else []
        full_components[label_id] = full_component_count(mask) if counts[label_id] else 0
    return {
        **case_summary(case, image),
        "voxel_volume": float(np.prod(image.spacing)),
        "has_mask": case.label is not None,
        "cropped_shape": [int(s.stop - s.start) for s in box],
        "relative_size": float(cropped_seg.size / seg.size),
        "samples": samples,
        "label_counts": counts,
        "components": components,
        "full_components": full_components,
    }


def component_sizes(mask: np.ndarray) -> list:
    """Voxel counts of the face-connected components of ``mask``."""
    components, n = ndimage.label(mask)
    return np.bincount(components.ravel())[1:].tolist() if n else []


def full_component_count(mask: np.ndarray) -> int:
    """Connected components of ``mask`` with full connectivity (diagonals join), as
    ``inference.segmentation.largest_component`` counts them: what prediction's quality check compares."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return int(ndimage.label(mask, structure=structure)[1])


def _case_label_fractions(result: dict, label_ids) -> dict | None:
    """{label id: fraction of the case's voxels}; None for a case without a mask (nothing known)."""
    if not result["has_mask"]:
        return None
    return {str(i): result["label_counts"][i] / result["n_voxels"] for i in label_ids}


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


def _segmentation_notes(fp: Fingerprint) -> list:
    notes = []
    if fp.intensity_scales_differ:
        maxima = np.array(fp.per_case_intensity_max, dtype=float)
        n_high = int((maxima > 10 * np.median(maxima)).sum())
        notes.append(f"intensity scales differ between cases: per-case maxima run from "
                     f"{format_number(maxima.min())} to {format_number(maxima.max())} ({n_high} cases above 10x the "
                     "median maximum); normalise each case on its own (z-score), not with global values")
    if fp.anisotropy > ANISOTROPY_THRESHOLD:
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
