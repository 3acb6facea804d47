"""autoplan calibrate (issue 28, part 2): a classifier's decision rule chosen on out-of-fold
predictions, kept only where it generalises, written into the run's plan and used by predict."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from autoplan import pipeline
from autoplan.calibration import (CALIBRATION_FILE, choose_rule, decision_scores, fit_offsets, rule_metrics)
from autoplan.cli import main
from autoplan.datasets import import_dataset
from autoplan.inference.classification import decision_probabilities
from autoplan.paths import resolve_folders
from autoplan.runs import RunSpec, TrainOptions

TINY = dict(epochs=2, iterations_per_epoch=3, n_workers=0, device="cpu")


def _spec(n_classes: int, weights=None):
    imbalance = ({"strategy": "weighted_loss", "class_weights": list(weights), "posterior_correction": 0.5}
                 if weights is not None else {"strategy": "none"})
    return SimpleNamespace(dataset="Toy", classes=[f"c{k}" for k in range(n_classes)],
                           configuration=SimpleNamespace(imbalance=imbalance))


def _biased_predictions(n: int, shift: float, seed: int = 0) -> tuple:
    """3 classes (70 / 20 / 10 %); the model's log-probabilities are informative posteriors
    (the class prior included, so with ``shift`` 0 their argmax is the accuracy-optimal rule)
    pushed ``shift`` against the rarest class, a bias a log offset can undo."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.7, 0.2, 0.1])
    y = rng.choice(3, size=n, p=prior)
    logits = rng.normal(0, 1.0, size=(n, 3)) + np.log(prior)
    logits[np.arange(n), y] += 1.5
    logits[:, 2] -= shift
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return log_p, y


def test_offsets_undo_a_consistent_bias_against_a_rare_class():
    log_p, y = _biased_predictions(3000, shift=2.0)
    before = rule_metrics(y, log_p, 3)
    offsets = fit_offsets(log_p, y, np.zeros(3), 0.0, "balanced_accuracy")
    after = rule_metrics(y, decision_scores(log_p, np.zeros(3), 0.0, offsets), 3)
    assert offsets[2] > 1.0                      # the rare class is pushed back up
    assert after["recall"][2] > before["recall"][2] + 0.2
    assert after["balanced_accuracy"] > before["balanced_accuracy"] + 0.05


def test_cross_fitting_keeps_offsets_only_when_they_generalise():
    groups = [f"lesion{i // 2}" for i in range(3000)]
    biased = choose_rule(*_biased_predictions(3000, shift=2.0), _spec(3), groups, "mean")
    assert biased.rule == "correction+offsets" and biased.class_log_offsets[2] > 0.5
    assert biased.cross_fitted["correction+offsets"] > biased.cross_fitted["correction"]
    # a model with no bias, on few images: per-class offsets fit noise and lose out of sample
    unbiased_log_p, unbiased_y = _biased_predictions(120, shift=0.0, seed=3)
    unbiased = choose_rule(unbiased_log_p, unbiased_y, _spec(3), groups[:120], "accuracy")
    assert unbiased.rule == "correction" and not any(unbiased.class_log_offsets)


def test_the_correction_is_chosen_for_the_objective():
    """With weights that favour the rare class, accuracy wants them taken back (c near 1),
    balanced accuracy wants them kept (c small)."""
    log_p, y = _biased_predictions(3000, shift=-1.0, seed=1)     # a model tilted *towards* the rare class
    weights = np.array([0.5, 1.0, 3.0])
    groups = list(range(3000))
    for_accuracy = choose_rule(log_p, y, _spec(3, weights), groups, "accuracy")
    for_balance = choose_rule(log_p, y, _spec(3, weights), groups, "balanced_accuracy")
    assert for_accuracy.posterior_correction > for_balance.posterior_correction
    assert for_accuracy.after["accuracy"] >= for_accuracy.before["accuracy"]


def test_a_negative_correction_leans_further_than_training_did():
    """A model with too little tilt for the weights it claims (scores that carry the whole class
    prior, as if trained unweighted) under (1/frequency)^0.25 weights: balanced accuracy wants
    more lean towards the rare classes than training gave, a correction below 0 (logit
    adjustment for the prior), and further than accuracy wants."""
    log_p, y = _biased_predictions(3000, shift=0.0, seed=2)
    weights = np.array([0.7, 0.2, 0.1]) ** -0.25
    groups = list(range(3000))
    for_balance = choose_rule(log_p, y, _spec(3, weights / weights.mean()), groups, "balanced_accuracy")
    for_accuracy = choose_rule(log_p, y, _spec(3, weights / weights.mean()), groups, "accuracy")
    assert for_balance.posterior_correction < min(0.0, for_accuracy.posterior_correction)
    # the prior-free rule (c = -3 for fourth-root weights) is within the grid and recovers the rare class
    assert for_balance.after["recall"][2] > rule_metrics(y, log_p, 3)["recall"][2] + 0.2
    assert for_balance.after["balanced_accuracy"] > rule_metrics(y, log_p, 3)["balanced_accuracy"] + 0.03


def test_decision_probabilities_apply_correction_and_offsets():
    probabilities = np.array([[0.6, 0.3, 0.1]])
    imbalance = {"strategy": "weighted_loss", "class_weights": [0.5, 1.0, 2.0], "posterior_correction": 1.0,
                 "class_log_offsets": [0.0, 0.0, np.log(4.0)]}
    expected = probabilities * np.array([2.0, 1.0, 0.5]) * np.array([1.0, 1.0, 4.0])
    np.testing.assert_allclose(decision_probabilities(probabilities, imbalance), expected / expected.sum())
    # a logit-adjusted loss leans by its factors the same way, and the correction takes it back
    adjusted = dict(imbalance, strategy="logit_adjusted")
    np.testing.assert_allclose(decision_probabilities(probabilities, adjusted), expected / expected.sum())
    # without a weighted loss the correction does nothing, the offsets still apply
    plain = decision_probabilities(probabilities, {"strategy": "none", "class_log_offsets": [0.0, np.log(2), 0.0]})
    np.testing.assert_allclose(plain, [[0.6 / 1.3, 0.6 / 1.3, 0.1 / 1.3]])


@pytest.mark.slow
def test_calibrate_writes_the_rule_into_the_plan_and_predict_decides_with_it(tmp_path, capsys):
    from autoplan.demo import write_demo_sources
    from autoplan import Predictor

    sources = write_demo_sources(tmp_path / "sources", n_xray=2, n_derm_per_class=8)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    dataset = import_dataset("DemoDerm", sources["derm_images"], folders.raw, labels_csv=sources["derm_labels"],
                             id_column="image_id", label_column="dx", group_column="patient", quiet=True, n_jobs=1)
    pipeline.plan(dataset, folders, device="cpu", n_jobs=1)
    pipeline.train(dataset, folders, TrainOptions(fold="0", run_name="r", **TINY))
    pipeline.train(dataset, folders, TrainOptions(fold="1", run_name="r", **TINY))
    folder_args = ["--raw", str(folders.raw), "--preprocessed", str(folders.preprocessed),
                   "--results", str(folders.results)]
    assert main(["calibrate", "DemoDerm", "--no-tta", "--objective", "balanced_accuracy", *folder_args]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and "out-of-fold before" in out
    run_dir = folders.results / "DemoDerm" / "classifier" / "r"
    calibration = json.loads((run_dir / CALIBRATION_FILE).read_text())
    splits = json.loads((folders.results / "DemoDerm" / "splits.json").read_text())
    assert calibration["folds"] == [0, 1]
    assert calibration["n_images"] == len(splits[0]["val"]) + len(splits[1]["val"])
    for fold in (0, 1):
        imbalance = RunSpec.load(run_dir / f"fold_{fold}" / "plan.json").configuration.imbalance
        assert imbalance["class_log_offsets"] == calibration["class_log_offsets"]
        assert imbalance["posterior_correction"] == calibration["posterior_correction"]
        assert "autoplan calibrate (balanced_accuracy)" in imbalance["decision_reason"]
    # predict decides with the calibrated rule: the fold's decision probabilities are its
    # model probabilities times weight^-c times exp(offsets), renormalised
    from autoplan.inference.classification import model_probabilities
    from autoplan.io import read_case_images
    from autoplan.preprocessing import load_classification_image

    predictor = Predictor.load(run_dir / "fold_0", tta=False)
    spec, network = predictor.ensemble.spec, predictor.ensemble.networks[0]
    pixels = np.stack([load_classification_image(read_case_images(dataset.case(c)), spec.configuration)
                       for c in splits[0]["val"]])
    raw = model_probabilities([network], pixels, spec.configuration, False, "cpu")
    weights = np.asarray(spec.configuration.imbalance.get("class_weights") or np.ones(raw.shape[1]))
    corrected = raw * weights ** -calibration["posterior_correction"] * np.exp(calibration["class_log_offsets"])
    np.testing.assert_allclose(predictor.classify_pixels(pixels), corrected / corrected.sum(1, keepdims=True),
                               rtol=1e-5)


def test_calibrate_refuses_segmentation_and_missing_runs(tmp_path, capsys):
    from autoplan.demo import write_demo_sources

    sources = write_demo_sources(tmp_path / "sources", n_xray=4, n_derm_per_class=4)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    import_dataset("DemoDerm", sources["derm_images"], folders.raw, labels_csv=sources["derm_labels"],
                   id_column="image_id", label_column="dx", quiet=True, n_jobs=1)
    folder_args = ["--raw", str(folders.raw), "--results", str(folders.results)]
    assert main(["calibrate", "DemoDerm", *folder_args]) == 2
    assert "name the run to calibrate" in capsys.readouterr().err
    assert main(["calibrate", "DemoDerm", "--run", "nope", *folder_args]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_offsets_need_a_gain_beyond_two_standard_errors():
    """A win smaller than two standard errors of the paired cross-fitted gain keeps the
    correction alone; the evidence is in the Calibration either way."""
    from autoplan.calibration import OFFSETS_MARGIN_ERRORS, offsets_gain

    noisy = {"correction": [0.70, 0.72, 0.69, 0.71], "correction+offsets": [0.72, 0.71, 0.70, 0.72]}
    gain, error = offsets_gain(noisy)
    assert gain == pytest.approx(0.0075) and gain < OFFSETS_MARGIN_ERRORS * error
    clear = {"correction": [0.70, 0.72, 0.69, 0.71], "correction+offsets": [0.75, 0.76, 0.74, 0.76]}
    gain, error = offsets_gain(clear)
    assert gain > OFFSETS_MARGIN_ERRORS * error
    groups = [f"lesion{i // 2}" for i in range(3000)]
    biased = choose_rule(*_biased_predictions(3000, shift=2.0), _spec(3), groups, "mean")
    assert biased.offsets_gain[0] > OFFSETS_MARGIN_ERRORS * biased.offsets_gain[1] > 0
