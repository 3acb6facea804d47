"""Classification fingerprint: each image read once, kept as small summaries (size, channel sums,
a pixel hash) for class balance, groups (patients, lesions) and identical images."""

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.fingerprint.channels import channel_kinds
from autoplan.fingerprint.geometry import case_summary, check_consistent, geometry_fields, spacing_notes
from autoplan.fingerprint.summary import format_shape
from autoplan.fingerprint.types import ChannelInfo, Fingerprint
from autoplan.io import read_case_images
from autoplan.parallel import parallel_map


def fingerprint_classification(dataset, source_hash: str, n_jobs) -> Fingerprint:
    classes = list(dataset.classes) if dataset.classes else sorted({c.class_name for c in dataset.cases})
    for case in dataset.cases:
        if case.class_name not in classes:
            raise InputError(Path(dataset.root) / "dataset.json",
                             f"case {case.id!r} has class {case.class_name!r}, not in classes {classes}")
    results = parallel_map(_analyze_classification_case, dataset.cases, n_jobs=n_jobs, desc="fingerprint")
    check_consistent(dataset, results)

    shapes = np.array([r["shape"] for r in results], dtype=float)
    spacings = np.array([r["spacing"] for r in results], dtype=float)
    counts = Counter(case.class_name for case in dataset.cases)
    class_counts = {name: int(counts.get(name, 0)) for name in classes}
    nonzero_counts = [n for n in class_counts.values() if n > 0]
    mean, std = _channel_moments(results)
    aspect = shapes[:, -1] / shapes[:, -2]  # width / height
    fingerprint = Fingerprint(
        **geometry_fields(dataset, results, shapes, spacings, source_hash),
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
    fingerprint.notes = _classification_notes(fingerprint, class_counts) + spacing_notes(results)
    return fingerprint


def _analyze_classification_case(case) -> dict:
    """One image read once: size, per-channel sums on a 0..1 scale, and a hash of its pixels."""
    image = read_case_images(case)
    data = image.array
    sums, squares = _channel_sums(data.reshape(data.shape[0], -1))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype.str}{data.shape}".encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return {**case_summary(case, image), "sums": sums, "sums_of_squares": squares, "hash": digest.hexdigest()}


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
    return channel_kinds(dataset, results)


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
