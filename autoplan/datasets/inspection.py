"""Import's first pass: every case read and checked (nothing is written), then the output
decided from the whole dataset: dimensionality, channels, file ending, label ids."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoplan.datasets.sources import CaseJob, Collected
from autoplan.errors import InputError
from autoplan.io import (
    NATURAL_EXTENSIONS,
    NATURAL_FORMATS,
    file_ending,
    geometry_difference,
    mask_values,
    read_channel_files,
    read_mask,
)

# A 2D mask without --label-map holding more grey values than this is a photograph or a lossy
# JPEG (254 values when --masks named the images folder, ~90 for JPEG masks), not a label map.
MAX_UNMAPPED_MASK_VALUES = 32


@dataclass
class Inspection:
    id: str
    channels: int                     # total channels over the case's image files
    dim: int
    mask_values: list                 # distinct integer values in the mask
    first_image: Path = None


class InspectTask:
    """Read and check one case; picklable so joblib can ship it to worker processes."""

    def __init__(self, label_map: dict | None):
        self.allowed = None if label_map is None else {0, *label_map}

    def __call__(self, job: CaseJob) -> Inspection:
        images = read_channel_files(job.images, whole_geometry=True)
        for path, image in zip(job.images, images):
            low, high = image.array.min(), image.array.max()
            if low == high:
                raise InputError(path, f"constant image (every value is {low})")
        values = []
        if job.mask is not None:
            mask = read_mask(job.mask)
            if (problem := geometry_difference(images[0], mask)) is not None:
                raise InputError(job.mask, problem)
            values = self._mask_values(job.mask, mask.array, mask.meta.get("file_format") or mask.source_format)
        return Inspection(id=job.id, channels=sum(image.n_channels for image in images), dim=images[0].dim,
                          mask_values=values, first_image=job.images[0])

    def _mask_values(self, path: Path, array: np.ndarray, source_format: str) -> list:
        values = mask_values(path, array)
        if values and values[0] < 0:
            raise InputError(path, f"mask holds the negative value {values[0]}")
        lossy = (" (JPEG is lossy: edges get values between the labels; save masks as PNG)"
                 if source_format == "jpeg" else "")
        if self.allowed is not None:
            unknown = [v for v in values if v not in self.allowed]
            if unknown:
                raise InputError(path, f"mask value(s) {unknown[:10]} not in the label map "
                                       f"(known: {sorted(self.allowed)}){lossy}")
        elif source_format in NATURAL_FORMATS and len(values) > MAX_UNMAPPED_MASK_VALUES:
            raise InputError(path, f"mask holds {len(values)} different grey values: it looks like a photograph, "
                                   f"not a label map{lossy}; is --masks the images folder? Masks with known "
                                   "values take --label-map")
        return values


@dataclass
class OutputFormat:
    """How the imported files are written, decided once every case is known."""
    dim: int
    channels: int
    natural: bool                     # 2D natural images (PNG/JPEG/...), not volumes
    to_rgb: set                       # ids of grey cases written as RGB
    ending: str                       # output file ending
    copy_images: bool                 # image files can be linked/copied unchanged
    value_to_id: dict                 # mask value -> label id
    labels: dict                      # dataset.json labels {name: id}


def output_format(found: Collected, inspections: list, convert_grey: bool) -> OutputFormat:
    jobs = found.jobs
    dim, channels, to_rgb = _channel_policy(inspections, convert_grey)
    natural = dim == 2 and all(file_ending(p) in NATURAL_EXTENSIONS for j in jobs for p in j.images)
    if found.layout == "nnunet_raw":
        ending, copy_images = found.given["file_ending"], not to_rgb
    else:
        ending, copy_images = _output_ending(jobs, natural, found.task_type, to_rgb)
    if not natural and any(i.channels > len(j.images) for i, j in zip(inspections, jobs)):
        copy_images = False        # volumes holding several channels are split into channel files
    value_to_id, labels = _label_ids_from(found.label_map, inspections, found.task_type)
    return OutputFormat(dim=dim, channels=channels, natural=natural, to_rgb=to_rgb, ending=ending,
                        copy_images=copy_images, value_to_id=value_to_id, labels=labels)


def _channel_policy(inspections, convert_grey: bool) -> tuple:
    """(dim, channels, ids of grey cases to turn into RGB); mixed counts are refused."""
    dims = {i.dim for i in inspections}
    if len(dims) > 1:
        odd = next(i for i in inspections if i.dim != inspections[0].dim)
        raise InputError(odd.first_image, f"is {odd.dim}D but {inspections[0].first_image.name} "
                                          f"is {inspections[0].dim}D")
    counts: dict = {}
    for inspection in inspections:
        counts.setdefault(inspection.channels, []).append(inspection)
    if len(counts) == 1:
        return dims.pop(), next(iter(counts)), set()
    if set(counts) == {1, 3} and convert_grey:
        return dims.pop(), 3, {i.id for i in counts[1]}
    usual = max(counts, key=lambda c: len(counts[c]))
    odd = next(i for i in inspections if i.channels != usual)
    hint = " (pass convert_grey / --convert-grey to turn grey images into RGB)" \
        if set(counts) == {1, 3} else ""
    raise InputError(odd.first_image, f"has {odd.channels} channel(s) but {len(counts[usual])} "
                                      f"of {len(inspections)} images have {usual}{hint}")


def _output_ending(jobs, natural: bool, task_type: str, to_rgb: set) -> tuple:
    """(file ending, whether image files can be linked/copied unchanged)."""
    endings = {file_ending(p) for job in jobs for p in job.images}
    ending = ".nii.gz"
    if natural:
        ending = ".png"
        if task_type == "classification" and len(endings) == 1 and not to_rgb:
            ending = next(iter(endings))  # classification keeps JPEGs as they are: no re-encoding
    return ending, endings == {ending}


def _label_ids_from(label_map: dict | None, inspections, task_type: str) -> tuple:
    """({mask value: label id}, dataset.json labels {name: id})."""
    if task_type == "classification":
        return {}, {}
    if label_map is None:
        values = sorted({v for i in inspections for v in i.mask_values} - {0})
        if len(values) == 1:
            label_map = {values[0]: "foreground"}
        else:
            label_map = {v: f"label_{v}" for v in values}
    names = list(dict.fromkeys(label_map.values()))           # first appearance gives the id
    value_to_id = {value: names.index(name) + 1 for value, name in label_map.items()}
    labels = {"background": 0, **{name: index for index, name in enumerate(names, start=1)}}
    return value_to_id, labels


def mask_lookup(job: CaseJob, value_to_id: dict, ending: str) -> dict | None:
    """None where the mask file can be copied unchanged: a volume already holding label ids.

    Natural-image masks are always rewritten: palette or colour PNGs must become grey.
    """
    if job.mask is None:
        return None
    identity = all(value == label for value, label in value_to_id.items())
    if identity and file_ending(job.mask) == ending and ending not in NATURAL_EXTENSIONS:
        return None
    return {0: 0, **value_to_id}
