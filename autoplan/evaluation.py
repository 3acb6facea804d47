"""Validation metrics: overlap and surface distances for segmentation, scikit-learn scores for classification.

Entry functions:
- ``segmentation_case_metrics(prediction, reference, label_ids, spacing)``: one case.
- ``summarize_segmentation(per_case, labels)``: the contract's segmentation ``metrics.json`` dict.
- ``segmentation_metrics(cases, labels, n_jobs)``: both of the above over many cases, in parallel.
- ``classification_metrics(y_true, probabilities, classes, cases)``: the classification ``metrics.json`` dict.
- ``headline_metrics(metrics)``: the numbers a reader looks at first (run.json, the CLI, compare).
- ``select_sample_cases(metrics)``: the best, median and worst case the reports show.

Both metrics dicts carry ``ci95``: 95 % bootstrap intervals (``autoplan.bootstrap``), over
lesions/patients for classification when the images' groups are given.

Conventions (also written into every metrics.json under ``conventions``):
- Surface of a mask = mask XOR its binary erosion with a full-connectivity structuring
  element (3x3 in 2D, 3x3x3 in 3D), the volume padded with background so objects that
  touch the border keep a surface there.
- Distances use the spacing in array axis order (millimetres; pixels when none is known).
  ASD is the mean of all surface distances of both directions pooled (MONAI's symmetric
  average surface distance). HD95 is the larger of the two directed 95th percentiles
  (np.percentile, linear interpolation), as MONAI's and medpy's hd95.
- Both masks empty: every metric NaN (excluded from means, as nnU-Net does).
  Reference empty, prediction not: Dice = Jaccard = precision = 0, recall NaN, distances NaN.
  Prediction empty, reference not: Dice = Jaccard = recall = 0, precision NaN, distances NaN.
  Distances are NaN (not inf) whenever one surface is missing, so means stay finite.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoplan.bootstrap import classification_intervals, segmentation_intervals
from autoplan.fingerprint.geometry import bounding_box
from autoplan.parallel import parallel_map

SEGMENTATION_METRICS = ("dice", "jaccard", "precision", "recall", "asd_mm", "hd95_mm")

CONVENTIONS = (
    "Surface = mask XOR erosion with a full-connectivity structuring element. "
    "Distances in {unit} using the image spacing. "
    "ASD = mean of all surface distances of both directions pooled; "
    "HD95 = max of the two directed 95th percentiles (as MONAI/medpy). "
    "Both empty: all metrics NaN, excluded from means. "
    "Reference empty, prediction not: Dice/Jaccard/precision 0, recall and distances NaN. "
    "Prediction empty, reference not: Dice/Jaccard/recall 0, precision and distances NaN. "
    "NaN is written as null in metrics.json and n/a in reports. "
    "Means are over cases where the metric is defined (NaN skipped); "
    "foreground_mean is the mean over labels of the per-label means."
)


# ---------------------------------------------------------------- segmentation


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def nanmean(values) -> float:
    """Mean of the defined values (None, NaN and inf skipped); NaN when none is defined."""
    values = np.asarray([math.nan if v is None else v for v in values], dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (undefined, left out of means as nnU-Net)."""
    overlap = int(np.logical_and(prediction, reference).sum())
    return _ratio(2 * overlap, int(prediction.sum()) + int(reference.sum()))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # full connectivity
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box_crop(pred: np.ndarray, ref: np.ndarray):
    """Both masks cut to the bounding box of their union and padded by one background voxel.

    Every surface voxel of either mask lies inside the box, so the nearest surface voxel
    of one mask to any surface voxel of the other is inside it too: distances are exact.
    The zero padding gives objects touching the image border a surface there.
    """
    box = bounding_box(pred | ref)
    return np.pad(pred[box], 1), np.pad(ref[box], 1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (prediction -> reference, reference -> prediction) for two non-empty masks."""
    pred, ref = _bounding_box_crop(pred, ref)
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_ref[pred_surface], to_pred[ref_surface]


def _check_inputs(prediction, reference, spacing):
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if spacing is None:
        spacing = (1.0,) * prediction.ndim
    spacing = tuple(float(s) for s in spacing)
    # A label map with a leading channel axis of one: (1, [Z,] Y, X).
    if prediction.ndim == len(spacing) + 1 and prediction.shape[0] == 1:
        prediction, reference = prediction[0], reference[0]
    if prediction.ndim not in (2, 3) or len(spacing) != prediction.ndim:
        raise ValueError(f"need a 2D or 3D label map with one spacing per axis, got shape "
                         f"{prediction.shape} and spacing {spacing}")
    return prediction, reference, spacing


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Dice, Jaccard, precision, recall, ASD and HD95 of two boolean masks (conventions above)."""
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    tp = int(np.logical_and(pred, ref).sum())
    result = {
        "dice": _ratio(2 * tp, n_pred + n_ref),
        "jaccard": _ratio(tp, n_pred + n_ref - tp),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_ref),
        "asd_mm": math.nan,
        "hd95_mm": math.nan,
        "n_ref": n_ref,
        "n_pred": n_pred,
    }
    if n_pred > 0 and n_ref > 0:
        pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
        result["asd_mm"] = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())
        result["hd95_mm"] = float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))
    return result


def segmentation_case_metrics(prediction: np.ndarray, reference: np.ndarray, label_ids: Sequence[int],
                              spacing: Sequence[float] | None) -> dict:
    """{str(label): {dice, jaccard, precision, recall, asd_mm, hd95_mm, n_ref, n_pred}} for one case.

    ``prediction`` and ``reference`` are label maps ``([Z,] Y, X)``; ``spacing`` is in array
    axis order (None: one pixel per unit).
    """
    prediction, reference, spacing = _check_inputs(prediction, reference, spacing)
    return {str(int(label)): binary_metrics(prediction == label, reference == label, spacing)
            for label in label_ids}


def summarize_segmentation(per_case: list[dict], labels: dict, distance_unit: str = "mm") -> dict:
    """The segmentation metrics.json dict from per-case results ``[{"case", "per_label"}]``.

    ``labels`` maps label id (str) to name; background (id 0) is left out. ``mean`` is the
    NaN-skipping mean over cases per label; ``foreground_mean`` the mean over labels of those.
    """
    labels = {str(k): v for k, v in labels.items() if str(k) != "0"}
    mean = {label: {metric: nanmean(case["per_label"].get(label, {}).get(metric) for case in per_case)
                    for metric in SEGMENTATION_METRICS}
            for label in labels}
    foreground_mean = {metric: nanmean(mean[label][metric] for label in labels)
                       for metric in SEGMENTATION_METRICS}
    return {
        "task_type": "segmentation",
        "labels": labels,
        "n_cases": len(per_case),
        "per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "ci95": segmentation_intervals(per_case, labels),
        "distance_unit": distance_unit,
        "conventions": CONVENTIONS.format(unit=distance_unit),
    }


def select_sample_cases(metrics: dict, n: int = 3) -> list:
    """Case ids of the best, median and worst case by mean foreground Dice (up to ``n``).

    From a segmentation metrics dict's ``per_case``; a case without any defined Dice ranks
    last. The reports show these (validation and evaluate alike).
    """
    scored = [(entry["case"], nanmean(m.get("dice") for m in entry["per_label"].values()))
              for entry in metrics.get("per_case", [])]
    scored = sorted(((c, d if math.isfinite(d) else -1.0) for c, d in scored), key=lambda cd: -cd[1])
    if not scored:
        return []
    picks = [scored[0][0], scored[len(scored) // 2][0], scored[-1][0]] + [c for c, _ in scored]
    return list(dict.fromkeys(picks))[:n]


def _case_entry(item: dict) -> dict:
    return {"case": item["case"],
            "per_label": segmentation_case_metrics(item["prediction"], item["reference"],
                                                   item["label_ids"], item.get("spacing"))}


def segmentation_metrics(cases: list[dict], labels: dict, n_jobs: int | None = 1,
                         distance_unit: str = "mm") -> dict:
    """metrics.json dict for ``cases = [{"case", "prediction", "reference", "spacing"}]`` (label maps)."""
    label_ids = [int(k) for k in labels if str(k) != "0"]
    items = [dict(item, label_ids=label_ids) for item in cases]
    per_case = parallel_map(_case_entry, items, n_jobs=n_jobs, desc="metrics")
    return summarize_segmentation(per_case, labels, distance_unit=distance_unit)


# ---------------------------------------------------------------- classification


def _auc_one_vs_rest(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if is_positive.all() or not is_positive.any():
        return None  # undefined without both positives and negatives
    return float(roc_auc_score(is_positive, scores))


def _balanced_accuracy(y_true, y_pred) -> float:
    from sklearn.metrics import balanced_accuracy_score

    if not len(y_true):
        return math.nan
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected on small sets
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def classification_metrics(y_true, probabilities, classes: list[str], cases: list[str] | None = None,
                           groups: list | None = None) -> dict:
    """The classification metrics.json dict; the predicted class is the most probable one.

    ``groups`` (one per image: its lesion or patient, None for none) makes the ``ci95``
    bootstrap resample whole lesions; without them images are resampled one by one."""
    from sklearn.metrics import (accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support)

    y_true = np.asarray(y_true).astype(int).ravel()
    probabilities = np.asarray(probabilities, dtype=float)
    n_classes = len(classes)
    if probabilities.ndim != 2 or probabilities.shape != (len(y_true), n_classes):
        raise ValueError(f"probabilities must be (N={len(y_true)}, K={n_classes}), got {probabilities.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"true class indices must be in 0..{n_classes - 1}")
    if cases is not None and len(cases) != len(y_true):
        raise ValueError(f"{len(cases)} case ids for {len(y_true)} cases")
    y_pred = probabilities.argmax(axis=1)
    indices = list(range(n_classes))

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=indices, zero_division=0)
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                           "support": int(support[k]),
                           "auc": _auc_one_vs_rest(y_true == k, probabilities[:, k])}

    def averaged(average):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=indices, average=average,
                                                     zero_division=0)
        return {"precision": float(p), "recall": float(r), "f1": float(f)}

    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    result = {
        "task_type": "classification",
        "classes": list(classes),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "per_class": per_class,
        "macro_avg": averaged("macro"),
        "weighted_avg": averaged("weighted"),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=indices).tolist(),
        "n_cases": int(len(y_true)),
        "ci95": classification_intervals(y_true, y_pred, list(classes), groups),
        "conventions": ("Prediction = most probable class. Precision/recall/F1 are 0 where undefined. "
                        "AUC is one-vs-rest per class (None when the class has no positives or no "
                        "negatives); macro_auc is the mean of the defined ones. balanced_accuracy is "
                        "the mean recall over classes present in the reference. ci95: percentile "
                        "bootstrap intervals, resampling lesions/patients (groups) with replacement."),
    }
    if cases is not None:
        result["per_case"] = [
            {"case": str(case), "true": classes[t], "predicted": classes[p],
             "probabilities": {name: float(probabilities[i, k]) for k, name in enumerate(classes)}}
            for i, (case, t, p) in enumerate(zip(cases, y_true, y_pred))]
    return result


# ---------------------------------------------------------------- headline


def _segmentation_headline(metrics: dict) -> dict:
    labels = metrics.get("labels", {})
    headline = {f"dice_{labels[label]}": values.get("dice") for label, values in (metrics.get("mean") or {}).items()}
    headline.update({f"foreground_{name}": value for name, value in (metrics.get("foreground_mean") or {}).items()})
    return headline


def _classification_headline(metrics: dict) -> dict:
    return {"accuracy": metrics.get("accuracy"), "balanced_accuracy": metrics.get("balanced_accuracy"),
            "macro_f1": (metrics.get("macro_avg") or {}).get("f1"), "macro_auc": metrics.get("macro_auc")}


_HEADLINES = {"segmentation": _segmentation_headline, "classification": _classification_headline}


def headline_metrics(metrics: dict) -> dict:
    """The numbers a reader looks at first, from a metrics.json dict: per-label Dice
    (``dice_<name>``) and the foreground means (``foreground_<metric>``) of a segmentation;
    accuracy, balanced accuracy, macro F1 and macro AUC of a classification."""
    return _HEADLINES[metrics.get("task_type", "segmentation")](metrics)
