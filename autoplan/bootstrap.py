"""95 % bootstrap confidence intervals of classification (and segmentation) scores.

Entry function: ``classification_intervals(y_true, y_pred, classes, groups)`` -> the
``ci95`` entry of a classification metrics.json. ``segmentation_intervals(per_case, labels)``
does the same for per-label mean Dice.

Why grouped: HAM10000 shows many lesions in two to six images. Resampling images as if
they were independent counts a lesion's copies as separate evidence and gives intervals
that are too narrow; resampling whole lesions (``Case.group``; an image without a group is
its own group) keeps them together, as a new set of lesions would.

How (vectorised, no Python loop over resamples): each group's (true, predicted) counts
form one row of a groups x K*K table; a resample is a vector of how often each group was
drawn (uniform draws with replacement, as many as there are groups), so all resamples'
confusion matrices are one matrix product. The interval is the 2.5th and 97.5th
percentile over resamples (percentile bootstrap); a class absent from a resample has no
recall there and that resample is left out of its interval. 1000 resamples of 1500 images
of 7 classes take a few milliseconds.
"""

import numpy as np

N_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
_CHUNK = 250            # resamples per matrix product: bounds memory for large evaluation sets


def _group_codes(groups, n: int) -> np.ndarray:
    """Integer group of each item; None (no group) makes an item its own group."""
    if groups is None:
        return np.arange(n)
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} items")
    keys = [("group", g) if g is not None else ("item", i) for i, g in enumerate(groups)]
    index = {}
    return np.asarray([index.setdefault(key, len(index)) for key in keys])


def resample_counts(n_groups: int, n_resamples: int, rng: np.random.Generator):
    """Blocks of (resamples, n_groups): how often each group is drawn in each resample."""
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        draws = rng.integers(0, n_groups, size=(size, n_groups)) + n_groups * np.arange(size)[:, None]
        yield np.bincount(draws.ravel(), minlength=size * n_groups).reshape(size, n_groups).astype(float)


def confusion_scores(confusion: np.ndarray) -> dict:
    """accuracy, balanced_accuracy, macro_f1 and per-class recall of confusion matrices
    ``(..., K, K)`` (rows: true class), with scikit-learn's conventions: recall is NaN for a
    class without images (balanced accuracy averages the classes present), F1 is 0 where
    undefined and macro F1 averages all K classes."""
    confusion = np.asarray(confusion, dtype=float)
    true_positives = np.diagonal(confusion, axis1=-2, axis2=-1)
    support, predicted = confusion.sum(axis=-1), confusion.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, true_positives / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * true_positives / (support + predicted), 0.0)
        present = support > 0
        balanced = np.where(present.any(-1), np.nansum(recall, -1) / present.sum(-1), np.nan)
        accuracy = true_positives.sum(-1) / confusion.sum((-2, -1))
    return {"accuracy": accuracy, "balanced_accuracy": balanced, "macro_f1": f1.mean(-1), "recall": recall}


def _interval(samples: np.ndarray, level: float):
    """[low, high] percentile interval over the first axis (NaN resamples left out); None if none."""
    tail = 100 * (1 - level) / 2
    defined = samples[np.isfinite(samples)]
    if not defined.size:
        return None
    low, high = np.percentile(defined, [tail, 100 - tail])
    return [float(low), float(high)]


def classification_intervals(y_true, y_pred, classes: list, groups=None, n_resamples: int = N_RESAMPLES,
                             seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict:
    """``{"accuracy": [lo, hi], "balanced_accuracy", "macro_f1", "recall": {class: [lo, hi]},
    "level", "n_resamples", "seed", "resampled"}``: percentile bootstrap over groups of images
    (``groups``: one per image, None = its own group; no groups: images one by one)."""
    y_true, y_pred = np.asarray(y_true, int).ravel(), np.asarray(y_pred, int).ravel()
    n_classes = len(classes)
    codes = _group_codes(groups, len(y_true))
    n_groups = int(codes.max()) + 1 if codes.size else 0
    result = {"level": level, "n_resamples": n_resamples, "seed": seed,
              "resampled": (f"{n_groups} groups (lesions/patients; an image without a group is its own)"
                            if groups is not None and any(g is not None for g in groups)
                            else f"{n_groups} images, one by one")}
    if n_groups < 2:
        return dict(result, accuracy=None, balanced_accuracy=None, macro_f1=None, recall={c: None for c in classes})
    per_group = np.zeros((n_groups, n_classes * n_classes))
    np.add.at(per_group, (codes, y_true * n_classes + y_pred), 1.0)
    rng = np.random.default_rng(seed)
    blocks = [confusion_scores((counts @ per_group).reshape(-1, n_classes, n_classes))
              for counts in resample_counts(n_groups, n_resamples, rng)]
    scores = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        result[name] = _interval(scores[name], level)
    result["recall"] = {name: _interval(scores["recall"][:, k], level) for k, name in enumerate(classes)}
    return result


def segmentation_intervals(per_case: list, labels: dict, n_resamples: int = N_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict:
    """``{"dice": {label: [lo, hi]}, "foreground_dice": [lo, hi], ...}``: cases resampled with
    replacement; a resample's mean skips the cases where a label's Dice is undefined (as the
    metrics' means do)."""
    labels = [str(k) for k in labels if str(k) != "0"]
    dice = np.array([[_as_float((case["per_label"].get(label) or {}).get("dice")) for label in labels]
                     for case in per_case]).reshape(len(per_case), len(labels))
    result = {"level": level, "n_resamples": n_resamples, "seed": seed,
              "resampled": f"{len(per_case)} cases, one by one"}
    if len(per_case) < 2 or not labels:
        return dict(result, dice={label: None for label in labels}, foreground_dice=None)
    defined = np.isfinite(dice)
    values = np.where(defined, dice, 0.0)
    means = []
    for counts in resample_counts(len(per_case), n_resamples, np.random.default_rng(seed)):
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append((counts @ values) / (counts @ defined))
    means = np.concatenate(means)
    finite = np.isfinite(means)
    with np.errstate(invalid="ignore", divide="ignore"):     # the mean over labels a resample defines
        foreground = np.where(finite, means, 0.0).sum(1) / finite.sum(1)
    result["dice"] = {label: _interval(means[:, i], level) for i, label in enumerate(labels)}
    result["foreground_dice"] = _interval(foreground, level)
    return result


def _as_float(value) -> float:
    return float("nan") if value is None else float(value)
