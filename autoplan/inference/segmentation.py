"""One segmentation case: preprocess as in training, sliding window with every network of an
ensemble, back into the original grid; labels from probabilities; the post-processing
(keep the largest component) that training decides on validation and prediction applies."""

import numpy as np
import torch
from scipy import ndimage

from autoplan import preprocessing
from autoplan.evaluation import dice, nanmean
from autoplan.inference.sliding_window import sliding_window_predict
from autoplan.runs import RunSpec


def default_mirror_axes(spec: RunSpec, tta: bool):
    """The axes training mirrored (the plan's ``mirror_axes``; None there means all), or none without TTA."""
    if not tta:
        return None
    axes = getattr(spec.configuration, "mirror_axes", None)
    return tuple(range(len(spec.configuration.patch_size))) if axes is None else tuple(axes)


def predict_case_probabilities(networks: list, spec: RunSpec, image, tta: bool = True, device="cpu",
                               case_id: str = "case"):
    """(probabilities ``(K, *original spatial shape)``, CaseProperties) for one segmentation case.

    Exactly the training preprocessing, the sliding window with every network (the folds
    of an ensemble), probabilities averaged, then resampled back into the original grid.
    """
    configuration = spec.configuration
    data, _, properties = preprocessing.preprocess_case(image, None, configuration, case_id)
    mirror_axes = default_mirror_axes(spec, tta)
    total = None
    for network in networks:
        probabilities = sliding_window_predict(network, torch.from_numpy(np.asarray(data, dtype=np.float32)),
                                               configuration.patch_size, configuration.n_outputs,
                                               mirror_axes=mirror_axes, device=device)
        total = probabilities if total is None else total + probabilities
    mean = (total / len(networks)).numpy()
    return np.asarray(preprocessing.revert_to_original(mean, properties, configuration), dtype=np.float32), properties


def probabilities_to_labels(probabilities: np.ndarray, spec: RunSpec) -> np.ndarray:
    """Label map with the dataset's label ids (output channel k is the k-th smallest id)."""
    label_values = np.asarray(sorted(int(v) for v in spec.labels.values()) or range(len(probabilities)))
    index = np.asarray(probabilities).argmax(axis=0)
    labels = label_values[index] if len(label_values) == len(probabilities) else index
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
        mask = result == label
        if mask.any():
            result[mask & ~largest_component(mask)] = 0
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
