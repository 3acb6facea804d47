"""Bootstrap confidence intervals: they hold the point estimate, narrow with more images, widen
when lesions are resampled whole, match scikit-learn's scores, and take milliseconds."""

import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, recall_score

from autoplan.bootstrap import classification_intervals, confusion_scores, segmentation_intervals
from autoplan.evaluation import classification_metrics, segmentation_case_metrics, summarize_segmentation
from autoplan.report import write_classification_report

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SHARES = [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]         # HAM10000's class shares


def _predictions(n: int, seed: int = 0, right: float = 0.7) -> tuple:
    """HAM10000-like truths; each prediction right with probability ``right``, else a random class."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice(len(CLASSES), n, p=SHARES)
    y_pred = np.where(rng.random(n) < right, y_true, rng.integers(0, len(CLASSES), n))
    return y_true, y_pred


def _width(interval) -> float:
    return interval[1] - interval[0]


def test_scores_of_confusion_matrices_match_scikit_learn():
    y_true, y_pred = _predictions(500, seed=1)
    scores = confusion_scores(confusion_matrix(y_true, y_pred, labels=range(len(CLASSES))))
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=range(7),
                                                        zero_division=0))
    present = np.isin(range(7), y_true)
    np.testing.assert_allclose(scores["recall"][present],
                               recall_score(y_true, y_pred, average=None, labels=range(7))[present])


def test_intervals_hold_the_point_estimate():
    y_true, y_pred = _predictions(800)
    probabilities = np.eye(len(CLASSES))[y_pred] * 0.9 + 0.1 / len(CLASSES)
    metrics = classification_metrics(y_true, probabilities, CLASSES)
    ci95 = metrics["ci95"]
    assert ci95["n_resamples"] == 1000 and ci95["level"] == 0.95
    for name, value in (("accuracy", metrics["accuracy"]), ("balanced_accuracy", metrics["balanced_accuracy"]),
                        ("macro_f1", metrics["macro_avg"]["f1"])):
        low, high = ci95[name]
        assert low < value < high, name
    for name in CLASSES:
        low, high = ci95["recall"][name]
        assert low <= metrics["per_class"][name]["recall"] <= high, name
        assert 0.0 <= low <= high <= 1.0


def test_intervals_narrow_with_more_images():
    small = classification_intervals(*_predictions(200, seed=2), CLASSES)
    large = classification_intervals(*_predictions(2000, seed=2), CLASSES)
    # ten times the images: about sqrt(10) = 3.2 times narrower
    assert _width(large["accuracy"]) < 0.5 * _width(small["accuracy"])
    assert _width(large["balanced_accuracy"]) < 0.6 * _width(small["balanced_accuracy"])
    assert _width(large["recall"]["nv"]) < 0.5 * _width(small["recall"]["nv"])


def test_resampling_whole_lesions_is_wider_when_lesions_repeat_images():
    """300 lesions shown in 3 images each (with the same prediction): there are 300 pieces of
    evidence, not 900; resampling the images one by one gives about sqrt(3) too narrow intervals."""
    y_true, y_pred = _predictions(300, seed=3)
    y_true, y_pred = np.repeat(y_true, 3), np.repeat(y_pred, 3)
    lesions = np.repeat([f"L{i}" for i in range(300)], 3).tolist()
    images = classification_intervals(y_true, y_pred, CLASSES)
    grouped = classification_intervals(y_true, y_pred, CLASSES, groups=lesions)
    assert grouped["resampled"].startswith("300 groups") and images["resampled"].startswith("900 images")
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert _width(grouped[name]) > 1.4 * _width(images[name]), name
    # the same 300 lesions given once each: the grouped interval is theirs
    once = classification_intervals(y_true[::3], y_pred[::3], CLASSES)
    assert _width(grouped["accuracy"]) == pytest.approx(_width(once["accuracy"]), rel=0.2)


def test_images_without_a_group_are_their_own_group_and_seed_fixes_the_result():
    y_true, y_pred = _predictions(300, seed=4)
    no_groups = classification_intervals(y_true, y_pred, CLASSES)
    all_none = classification_intervals(y_true, y_pred, CLASSES, groups=[None] * 300)
    assert all_none["accuracy"] == no_groups["accuracy"]
    assert classification_intervals(y_true, y_pred, CLASSES)["accuracy"] == no_groups["accuracy"]
    assert classification_intervals(y_true, y_pred, CLASSES, seed=1)["accuracy"] != no_groups["accuracy"]


def test_a_class_without_images_has_no_recall_interval():
    y_true = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    y_pred = np.array([0, 1, 1, 1, 0, 0, 0, 1])
    ci95 = classification_intervals(y_true, y_pred, ["a", "b", "c"])
    assert ci95["recall"]["c"] is None and ci95["recall"]["a"] is not None
    assert classification_intervals([0], [0], ["a", "b"])["accuracy"] is None      # one image: no interval


def test_bootstrap_of_1500_images_and_7_classes_takes_well_under_a_second():
    y_true, y_pred = _predictions(1500, seed=5)
    lesions = [f"L{i // 2}" for i in range(1500)]
    classification_intervals(y_true, y_pred, CLASSES, groups=lesions)        # warm up
    start = time.perf_counter()
    classification_intervals(y_true, y_pred, CLASSES, groups=lesions)
    assert time.perf_counter() - start < 0.5


def test_segmentation_dice_intervals_over_cases():
    rng = np.random.default_rng(6)
    per_case = []
    for i in range(30):
        reference = np.zeros((20, 20), int)
        reference[5:15, 5:15] = 1
        prediction = np.roll(reference, int(rng.integers(0, 4)), axis=1)
        per_case.append({"case": f"c{i}", "per_label": segmentation_case_metrics(prediction, reference, [1], None)})
    metrics = summarize_segmentation(per_case, {"1": "lesion"})
    low, high = metrics["ci95"]["dice"]["1"]
    assert low <= metrics["mean"]["1"]["dice"] <= high and high - low > 0
    assert metrics["ci95"]["foreground_dice"] == [low, high]
    # a label undefined in every case (both masks empty) has no interval
    assert segmentation_intervals([{"per_label": {"1": {"dice": None}}}] * 3, {"1": "x"})["dice"]["1"] is None


def test_segmentation_report_shows_the_dice_intervals_and_the_cases_scored(tmp_path):
    from autoplan.report import write_segmentation_report

    reference = np.zeros((20, 20), int)
    reference[5:15, 5:15] = 1
    per_case = [{"case": f"c{i}", "per_label": segmentation_case_metrics(np.roll(reference, i % 4, axis=1), reference,
                                                                          [1], None)} for i in range(12)]
    metrics = dict(summarize_segmentation(per_case, {"1": "lesion"}), split="untouched test split (12 cases)")
    write_segmentation_report(tmp_path, metrics, {"dataset": "T"}, samples=[])
    text = (tmp_path / "report.md").read_text()
    assert "Cases scored: untouched test split (12 cases)." in text
    low, high = metrics["ci95"]["dice"]["1"]
    row = next(line for line in text.splitlines() if line.startswith("| 1 lesion |"))
    assert row.rstrip(" |").endswith(f"{low:.3f}–{high:.3f}") and high > low
    assert "12 cases, one by one" in text


def test_classification_report_shows_the_intervals_and_the_cases_scored(tmp_path):
    y_true, y_pred = _predictions(400, seed=8)
    probabilities = np.eye(len(CLASSES))[y_pred] * 0.9 + 0.1 / len(CLASSES)
    lesions = [f"L{i // 2}" for i in range(400)]
    metrics = classification_metrics(y_true, probabilities, CLASSES, groups=lesions)
    write_classification_report(tmp_path, metrics, y_true, probabilities, CLASSES, {"dataset": "TaskDerm", "fold": 0})
    text = (tmp_path / "report.md").read_text()
    assert "Cases scored: validation fold 0." in text
    low, high = metrics["ci95"]["recall"]["mel"]
    mel_row = next(line for line in text.splitlines() if line.startswith("| mel |"))
    assert mel_row.rstrip(" |").endswith(f"{low:.3f}–{high:.3f}")
    low, high = metrics["ci95"]["balanced_accuracy"]
    assert f"{low:.3f}–{high:.3f}" in text and "200 groups" in text
    assert f"{low:.3f}–{high:.3f}" in (tmp_path / "report.html").read_text()
