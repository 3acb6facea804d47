"""One segmentation case: preprocess as in training, sliding window with every network of an
ensemble, back into the original grid slab by slab (``predict_case``); labels from probabilities;
the post-processing (keep the largest component) that training decides on validation and
prediction applies."""

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from autoplan import preprocessing
from autoplan.evaluation import dice, nanmean
from autoplan.fingerprint.geometry import bounding_box
from autoplan.inference.sliding_window import sliding_window_slabs
from autoplan.preprocessing.case import OriginalGrid
from autoplan.runs import RunSpec


def default_mirror_axes(spec: RunSpec, tta: bool):
    """The axes training mirrored (the plan's ``mirror_axes``; None there means all), or none without TTA."""
    if not tta:
        return None
    axes = getattr(spec.configuration, "mirror_axes", None)
    return tuple(range(len(spec.configuration.patch_size))) if axes is None else tuple(axes)


# Rows of the original grid reverted and labelled at a time: K x rows x plane float32 values up to
# this many (32 MB), so the label path's memory is a few slices, not the volume times the classes.
#
# Why the probabilities are resampled (chunk by chunk) and the argmax taken after, not the argmax
# taken in the working grid and the label map resampled: measured by benchmarks/scaling.py
# --stages revert on the same working-grid probabilities (benchmarks/RESULTS.md; a 128 x 192 x 192
# CT, 4 classes), the chunked path gives exactly the whole-array path's labels (Dice 1.0) in half
# its time (0.52 s vs 1.13 s) and less memory, while the label-map shortcuts disagree with it at
# boundaries (nearest neighbour: Dice 0.948, 0.18 s; each label's one-hot linearly: 0.957, 2.6 s,
# the slowest of the four). Validation decided the post-processing on labels made
# from resampled probabilities too, so prediction keeps that rule.
REVERT_CHUNK_VALUES = 2 ** 23


@dataclass
class CasePrediction:
    """One case in its own grid: the label map (dataset ids, before post-processing), the
    probabilities ``(K, ...)`` when asked for (else None), each member's CaseProperties."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    properties: list


def _label_lookup(spec: RunSpec, n_classes: int):
    """Channel k -> label id (the k-th smallest id), or None where the ids do not match the channels."""
    values = np.asarray(sorted(int(v) for v in spec.labels.values()) or range(n_classes))
    return values if len(values) == n_classes else None


def _member_rows(networks: list, spec: RunSpec, image, tta: bool, device, case_id: str, clock: dict | None):
    """(OriginalGrid of one member's probabilities, its CaseProperties): preprocessing now,
    the sliding window lazily, slab by slab, as the grid's rows are asked for."""
    configuration = spec.configuration
    started = time.perf_counter()
    data, _, properties = preprocessing.preprocess_case(image, None, configuration, case_id)
    if configuration.previous_stage:     # one-hot channels resampled with the image: back to 0/1, as trained
        first = configuration.n_image_channels
        data[first:] = data[first:] > 0.5
    _tick(clock, "preprocess", started)
    slabs = sliding_window_slabs(networks, torch.from_numpy(np.asarray(data, dtype=np.float32)),
                                 configuration.patch_size, configuration.n_outputs,
                                 mirror_axes=default_mirror_axes(spec, tta), device=device)
    return OriginalGrid(_timed(slabs, clock, "network"), properties, configuration, configuration.n_outputs), properties


def predict_case(members: list, image, tta: bool = True, device="cpu", case_id: str = "case",
                 with_probabilities: bool = False, clock: dict | None = None) -> CasePrediction:
    """Labels (and, when asked, probabilities) of one case from ``members`` [(networks, spec)]:
    each member's folds averaged in its working grid, the members averaged in the original grid.

    Each member's sliding window finishes its working grid slab by slab; those are resampled
    back to the original grid (as ``revert_to_original`` does) a few rows at a time, averaged
    over members, and the most probable label taken, so without ``with_probabilities`` memory
    stays at a few rows of K-class probabilities plus one label map (docs/predict.md, Memory).
    ``clock`` ({stage: seconds}) gets preprocess / network / revert (resampling back and labels).
    """
    spec = members[0][1]
    grids, properties = zip(*[_member_rows(networks, member_spec, image, tta, device, case_id, clock)
                              for networks, member_spec in members])
    n_classes, shape = grids[0].n_classes, grids[0].shape
    lookup = _label_lookup(spec, n_classes)
    biggest = int(lookup.max()) if lookup is not None else n_classes - 1
    labels = np.empty(shape, dtype=np.uint8 if biggest < 256 else np.uint16)
    probabilities = np.empty((n_classes, *shape), dtype=np.float32) if with_probabilities else None
    rows_per_chunk = max(1, REVERT_CHUNK_VALUES // (n_classes * int(np.prod(shape[1:]))))
    for first in range(0, shape[0], rows_per_chunk):
        started, network_before = time.perf_counter(), (clock or {}).get("network", 0.0)
        chunks = [grid.rows(rows_per_chunk) for grid in grids]     # runs the networks as needed
        mean = chunks[0] if len(chunks) == 1 else np.mean(chunks, axis=0).astype(np.float32)
        index = mean.argmax(axis=0)
        labels[first:first + len(index)] = lookup[index] if lookup is not None else index
        if probabilities is not None:
            probabilities[:, first:first + len(index)] = mean
        if clock is not None:    # the networks ran inside grid.rows: their time is theirs
            _tick(clock, "revert", started + clock.get("network", 0.0) - network_before)
    if labels.dtype == np.uint16 and labels.max(initial=0) < 256:
        labels = labels.astype(np.uint8)
    return CasePrediction(labels, probabilities, list(properties))


def predict_case_probabilities(networks: list, spec: RunSpec, image, tta: bool = True, device="cpu",
                               case_id: str = "case"):
    """(probabilities ``(K, *original spatial shape)``, CaseProperties) for one segmentation case.

    Exactly the training preprocessing, the sliding window with every network (the folds
    of an ensemble), probabilities averaged, then resampled back into the original grid.
    """
    prediction = predict_case([(networks, spec)], image, tta, device, case_id, with_probabilities=True)
    return prediction.probabilities, prediction.properties[0]


def _tick(clock: dict | None, stage: str, started: float) -> None:
    if clock is not None:
        clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - started


def _timed(slabs, clock: dict | None, stage: str):
    """The slabs of a generator, the time spent making each one added to ``clock[stage]``."""
    iterator = iter(slabs)
    while True:
        started = time.perf_counter()
        try:
            slab = next(iterator)
        except StopIteration:
            return
        _tick(clock, stage, started)
        yield slab


def probabilities_to_labels(probabilities: np.ndarray, spec: RunSpec) -> np.ndarray:
    """Label map with the dataset's label ids (output channel k is the k-th smallest id)."""
    lookup = _label_lookup(spec, len(probabilities))
    index = np.asarray(probabilities).argmax(axis=0)
    labels = lookup[index] if lookup is not None else index
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


# ============================================================================ post-processing


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity, as nnU-Net) of a boolean mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def apply_postprocessing(label_map: np.ndarray, postprocessing: dict | None) -> np.ndarray:
    """Keep only the largest component of every label flagged ``{label id str: true}``.

    Removed voxels become background. Labels not flagged are left as they are.
    """
    flagged = [int(label) for label, keep in (postprocessing or {}).items() if keep]
    if not flagged:
        return label_map
    result = np.array(label_map, copy=True)
    for label in flagged:
        # Components are labelled inside the label's bounding box only: int32 component ids of
        # a whole 512 x 512 x 400 CT would be 400 MB for an organ of a few percent of it.
        mask = result == label
        box = bounding_box(mask)
        mask = mask[box]
        if mask.any():
            result[box][mask & ~largest_component(mask)] = 0
    return result


def component_dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> tuple:
    """(Dice of ``label`` as predicted, its Dice when only the largest component is kept)."""
    predicted, wanted = np.asarray(prediction) == label, np.asarray(reference) == label
    before = dice(predicted, wanted)
    return before, dice(largest_component(predicted), wanted) if predicted.any() else before


def keeps_largest_component(before: list, after: list) -> bool:
    """nnU-Net's rule: post-process a label only when its mean Dice strictly improves."""
    return bool(np.isfinite(np.asarray(before, dtype=float)).any() and nanmean(after) > nanmean(before))


def decide_postprocessing(predictions, references, label_ids, spacing_per_case=None) -> dict:
    """``{label id str: bool}``: keep-largest-component where it raises the label's mean Dice.

    As nnU-Net: judged per label on the validation cases, applied only on a strict
    improvement. Removing components of one label only turns voxels into background, so
    labels are judged independently. Dice needs no spacing; ``spacing_per_case`` is
    accepted so callers can pass what they have.
    """
    decision = {}
    for label in label_ids:
        pairs = [component_dice(prediction, reference, label) for prediction, reference in zip(predictions, references)]
        before, after = [p[0] for p in pairs], [p[1] for p in pairs]
        decision[str(int(label))] = keeps_largest_component(before, after)
    return decision
