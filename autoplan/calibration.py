"""A classifier's decision rule, chosen on out-of-fold predictions: ``autoplan calibrate``.

Entry function: ``calibrate_run(dataset, run_dir, objective, tta, device)`` -> ``Calibration``
(``RUN/calibration.json``); the chosen rule is written into every fold's ``plan.json``
(``configuration.imbalance``), which is what ``predict``, ``evaluate`` and model packages use.

Why: the weighted loss tilts a classifier towards rare classes, and where to put the
decision between "most images right" (accuracy) and "every class found" (balanced
accuracy) is a choice made from data. Made on the fold being reported, it flatters that
fold (HAM10000's posterior correction 0.5 was chosen so). Here it is made on each trained
fold's own validation cases, predicted by the model that did not train on them, and the
report of an untouched test split (``autoplan split``) then says what it is worth.

The rule: decision scores are ``log p - c * log w + b`` (p the model's probabilities, w the
training class weights, c the posterior correction, b one log offset per class: logit
adjustment). Two candidates are fitted:
  * ``correction``: c alone, on the objective's grid (b = 0): 0..1 for ``mean`` and
    ``accuracy``; from ``CORRECTION_MIN`` to 1 for ``balanced_accuracy``. Below 0 the rule
    leans further towards the rare classes than training did (logit adjustment for the class
    prior, one parameter): with weights (1/frequency)^e, c = 1 - 1/e decides from the model's
    posterior divided by the class prior, the rule that maximises balanced accuracy;
  * ``correction+offsets``: that c, then b by coordinate ascent over a grid in [-2, 2].
The offsets have one parameter per class and can fit the noise of a few hundred images, so
they are kept only when they also win on cases they were not fitted on: the out-of-fold
cases are halved by lesion/patient (several seeded halvings), each candidate is fitted on
one half and scored on the other, both ways. The offsets are kept when their gain over the
correction alone, paired split by split, exceeds two standard errors (``OFFSETS_MARGIN_ERRORS``);
the chosen rule is then refitted on all the out-of-fold cases.

Objective (``--objective``): ``mean`` of accuracy and balanced accuracy (the default: the
majority class is most images, so accuracy alone rewards ignoring the rare classes and
balanced accuracy alone gives the majority away), ``balanced_accuracy`` or ``accuracy``.
"""

import datetime
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autoplan.artifacts import leaning_factors
from autoplan.errors import InputError
from autoplan.jsonio import JsonDataclass
from autoplan.planning.classification import CLASS_WEIGHT_EXPONENT
from autoplan.runs import RunSpec

CALIBRATION_FILE = "calibration.json"
OBJECTIVES = ("mean", "balanced_accuracy", "accuracy")
# Weights are (1/frequency)^e, so the model's posterior leans by prior^-e; c = 1 - 1/e removes the
# prior altogether (the balanced rule). Measured out of sample (cross-fitted halves of the fold-0
# validation images of three 30-minute HAM10000 runs, benchmarks/RESULTS.md session 17): going
# below 0 gained balanced accuracy (+0.036 and +0.030 with weighted-loss models, SE 0.008-0.012)
# but lost on the mean objective (-0.012, -0.003), where the halves fitted leans that did not
# hold. So only the balanced-accuracy objective searches below 0.
CORRECTION_MIN = round(1.0 - 1.0 / CLASS_WEIGHT_EXPONENT, 2)
_AS_TRAINED_TO_UNWEIGHTED = np.round(np.linspace(0.0, 1.0, 11), 2)
CORRECTION_GRIDS = {"mean": _AS_TRAINED_TO_UNWEIGHTED, "accuracy": _AS_TRAINED_TO_UNWEIGHTED,
                    "balanced_accuracy": np.round(np.arange(CORRECTION_MIN, 1.0 + 1e-9, 0.1), 2)}
OFFSET_GRID = np.round(np.linspace(-2.0, 2.0, 41), 2)
OFFSET_SWEEPS = 3
CROSS_FIT_REPEATS = 5
CROSS_FIT_SEED = 0
# Offsets are kept only when their paired cross-fitted gain over the correction alone exceeds
# this many standard errors (the usual two, not tuned): one parameter per class can win a few
# thousandths by chance, within what one halving to the next moves.
OFFSETS_MARGIN_ERRORS = 2.0


@dataclass
class Calibration(JsonDataclass):
    """RUN/calibration.json: the decision rule chosen for a classifier run, and the evidence."""

    dataset: str
    run: str                       # RESULTS/NAME/CFG/RUN folder
    folds: list                    # folds whose validation cases were used
    n_images: int
    objective: str
    rule: str                      # "correction" or "correction+offsets"
    posterior_correction: float
    class_log_offsets: list
    cross_fitted: dict             # {rule: mean objective on the halves it was not fitted on}
    before: dict                   # out-of-fold metrics with the run's earlier rule
    after: dict                    # out-of-fold metrics with the chosen rule (fitted on them: optimistic)
    reason: str
    tta: bool = True
    created: str = ""
    classes: list = field(default_factory=list)
    offsets_gain: list = field(default_factory=list)     # [mean, standard error] of the paired cross-fitted gain


# ============================================================================ scoring a rule


def decision_scores(log_probabilities, log_weights, correction: float, offsets=None) -> np.ndarray:
    scores = log_probabilities - correction * log_weights
    return scores if offsets is None else scores + np.asarray(offsets)


def rule_metrics(y_true, scores, n_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present) and per-class recall."""
    y_pred = np.asarray(scores).argmax(axis=1)
    recall = [float(np.mean(y_pred[y_true == k] == k)) if np.any(y_true == k) else float("nan")
              for k in range(n_classes)]
    return {"accuracy": float(np.mean(y_pred == y_true)), "balanced_accuracy": float(np.nanmean(recall)),
            "recall": recall}


def objective_value(metrics: dict, objective: str) -> float:
    if objective == "mean":
        return 0.5 * (metrics["accuracy"] + metrics["balanced_accuracy"])
    return metrics[objective]


def _score(y_true, scores, objective: str) -> float:
    return objective_value(rule_metrics(y_true, scores, scores.shape[1]), objective)


# ============================================================================ fitting


def fit_correction(log_p, y_true, log_w, objective: str) -> float:
    """The grid's posterior correction with the best objective (ties: the nearest to 0, deciding
    as trained)."""
    grid = sorted(CORRECTION_GRIDS[objective], key=lambda c: (abs(c), c))
    values = [_score(y_true, decision_scores(log_p, log_w, c), objective) for c in grid]
    return float(grid[int(np.argmax(values))])


def fit_offsets(log_p, y_true, log_w, correction: float, objective: str) -> np.ndarray:
    """Per-class log offsets by coordinate ascent from zero; a change must raise the objective
    (so ties keep the smaller move)."""
    offsets = np.zeros(log_p.shape[1])
    best = _score(y_true, decision_scores(log_p, log_w, correction, offsets), objective)
    for _ in range(OFFSET_SWEEPS):
        changed = False
        for k in range(len(offsets)):
            for value in sorted(OFFSET_GRID, key=abs):
                trial = offsets.copy()
                trial[k] = value
                score = _score(y_true, decision_scores(log_p, log_w, correction, trial), objective)
                if score > best + 1e-12:
                    best, offsets, changed = score, trial, True
        if not changed:
            break
    return offsets


def fit_rule(rule: str, log_p, y_true, log_w, objective: str) -> tuple:
    """(posterior correction, offsets) of ``rule`` fitted on these images."""
    correction = fit_correction(log_p, y_true, log_w, objective)
    if rule == "correction":
        return correction, np.zeros(log_p.shape[1])
    return correction, fit_offsets(log_p, y_true, log_w, correction, objective)


def group_halves(groups: list, repeats: int = CROSS_FIT_REPEATS, seed: int = CROSS_FIT_SEED) -> list:
    """``repeats`` boolean masks, each putting a random half of the groups (lesions) on one side."""
    names = np.asarray([str(g) for g in groups])
    unique = np.unique(names)
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(repeats):
        chosen = set(rng.permutation(unique)[: len(unique) // 2])
        halves.append(np.array([name in chosen for name in names]))
    return halves


def cross_fitted_scores(log_p, y_true, log_w, groups, objective: str) -> dict:
    """{rule: [objective of the rule fitted on one half of the groups, scored on the other], one
    per half and halving, in the same order for both rules (so they pair up)}."""
    results = {}
    for rule in ("correction", "correction+offsets"):
        values = []
        for half in group_halves(groups):
            for fit_side, score_side in ((half, ~half), (~half, half)):
                correction, offsets = fit_rule(rule, log_p[fit_side], y_true[fit_side], log_w, objective)
                scores = decision_scores(log_p[score_side], log_w, correction, offsets)
                values.append(_score(y_true[score_side], scores, objective))
        results[rule] = values
    return results


def offsets_gain(per_split: dict) -> tuple:
    """(mean, standard error) of what the offsets add to the correction alone, paired split by split."""
    gain = np.asarray(per_split["correction+offsets"]) - np.asarray(per_split["correction"])
    return float(gain.mean()), float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0


# ============================================================================ the run's folds


def run_folds(run_dir: Path) -> dict:
    """{fold index: fold folder} of the run's finished folds."""
    folds = {int(p.name[5:]): p for p in Path(run_dir).glob("fold_*") if p.name[5:].isdigit()
             and (p / "plan.json").is_file()
             and any((p / name).is_file() for name in ("checkpoint_best.pt", "checkpoint_final.pt"))}
    if not folds:
        raise InputError(run_dir, "no finished fold (fold_K with plan.json and a checkpoint): train it first")
    return dict(sorted(folds.items()))


def _training_log_weights(spec: RunSpec) -> np.ndarray:
    weights = leaning_factors(spec.configuration.imbalance)
    n_classes = len(spec.classes or [])
    return np.log(np.asarray(weights, dtype=np.float64)) if weights else np.zeros(n_classes)


def out_of_fold_probabilities(dataset, splits, folds: dict, tta: bool, device) -> tuple:
    """(model probabilities (N, K) before any decision rule, true class indices, case ids):
    each fold's network on that fold's validation cases."""
    from autoplan.inference.classification import model_probabilities
    from autoplan.io import read_case_images
    from autoplan.preprocessing import load_classification_image
    from autoplan.runs import load_trained

    classes = list(dataset.classes)
    probabilities, y_true, cases = [], [], []
    for fold, fold_dir in folds.items():
        if fold >= len(splits):
            raise InputError(fold_dir, f"fold {fold} is not in splits.json ({len(splits)} folds)")
        spec, network = load_trained(fold_dir, device=device)
        for start in range(0, len(splits[fold]["val"]), 64):
            chunk = [dataset.case(case_id) for case_id in splits[fold]["val"][start:start + 64]]
            pixels = np.stack([load_classification_image(read_case_images(case), spec.configuration)
                               for case in chunk])
            probabilities.append(model_probabilities([network], pixels, spec.configuration, tta, device))
            y_true += [classes.index(case.class_name) for case in chunk]
            cases += [case.id for case in chunk]
    return np.concatenate(probabilities), np.asarray(y_true), cases


# ============================================================================ entry


def _reason(calibration: "Calibration", objective: str, folds: list, n_images: int) -> str:
    cross_fitted, (gain, error) = calibration.cross_fitted, calibration.offsets_gain
    verdict = "exceeds" if calibration.rule == "correction+offsets" else "does not exceed"
    return (f"{calibration.rule}: on out-of-fold cases they were not fitted on ({CROSS_FIT_REPEATS} halvings "
            f"of the lesions/patients) per-class offsets score {objective} {cross_fitted['correction+offsets']:.4f} "
            f"against {cross_fitted['correction']:.4f} for the correction alone, a paired gain of {gain:+.4f} "
            f"(standard error {error:.4f}) that {verdict} {OFFSETS_MARGIN_ERRORS:g} standard errors; refitted "
            f"on the validation cases of fold "
            f"{', '.join(map(str, folds))} ({n_images} images), each predicted by the model that did not "
            f"train on it")


def _write_rule(folds: dict, calibration: Calibration) -> None:
    """The chosen rule into every fold's plan.json: what predict and evaluate decide with."""
    for fold_dir in folds.values():
        spec = RunSpec.load(fold_dir / "plan.json")
        imbalance = dict(spec.configuration.imbalance or {})
        imbalance.update(posterior_correction=calibration.posterior_correction,
                         class_log_offsets=calibration.class_log_offsets,
                         decision_reason=f"autoplan calibrate ({calibration.objective}): {calibration.reason}")
        spec.configuration.imbalance = imbalance
        spec.save(fold_dir / "plan.json")


def find_run_folder(dataset_results: Path, configuration: str, run: str | None) -> Path:
    """RESULTS/NAME/CFG/RUN; without ``run`` the configuration's only run folder."""
    configuration_dir = Path(dataset_results) / configuration
    if run is not None:
        if not (configuration_dir / run).is_dir():
            raise InputError(configuration_dir / run, "no such run folder")
        return configuration_dir / run
    runs = sorted(p for p in configuration_dir.glob("*") if p.is_dir() and not p.name.startswith("."))
    if len(runs) != 1:
        found = ", ".join(p.name for p in runs) or "none"
        raise InputError(configuration_dir, f"name the run to calibrate with --run (run folders: {found})")
    return runs[0]


def calibrate_run(dataset, folders, configuration: str = "classifier", run: str | None = None,
                  objective: str = "mean", tta: bool = True, device="cpu", n_jobs=None) -> Calibration:
    """Choose a run's decision rule on its folds' out-of-fold predictions (see the module
    docstring); write it into every fold's plan.json and RUN/calibration.json."""
    from autoplan.inference.predict import torch_threads
    from autoplan.jsonio import read_json
    from autoplan.paths import splits_file

    if dataset.task_type != "classification":
        raise InputError(folders.dataset_results(dataset.name), "calibrate chooses a classifier's decision rule; "
                         f"this dataset is {dataset.task_type} (segmentation's post-processing is find-best's)")
    if objective not in OBJECTIVES:
        raise InputError(None, f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    run_dir = find_run_folder(folders.dataset_results(dataset.name), configuration, run)
    folds = run_folds(run_dir)
    splits = read_json(splits_file(folders.results, dataset.name))
    spec = RunSpec.load(next(iter(folds.values())) / "plan.json")
    with torch_threads(n_jobs):
        probabilities, y_true, cases = out_of_fold_probabilities(dataset, splits, folds, tta, device)
    calibration = choose_rule(np.log(np.clip(probabilities, 1e-12, None)), y_true, spec,
                              [dataset.case(case_id).group or case_id for case_id in cases], objective)
    calibration = replace(calibration, dataset=dataset.name, run=str(run_dir), folds=list(folds), tta=tta,
                          reason=_reason(calibration, objective, list(folds), len(y_true)))
    _write_rule(folds, calibration)
    calibration.save(run_dir / CALIBRATION_FILE)
    return calibration


def choose_rule(log_p, y_true, spec: RunSpec, groups: list, objective: str) -> Calibration:
    """The rule with the best cross-fitted objective, refitted on every image (a Calibration
    without its run's identity, which ``calibrate_run`` fills in)."""
    log_w = _training_log_weights(spec)
    per_split = cross_fitted_scores(log_p, y_true, log_w, groups, objective)
    cross_fitted = {rule: float(np.mean(values)) for rule, values in per_split.items()}
    gain, error = offsets_gain(per_split)
    rule = "correction+offsets" if gain > OFFSETS_MARGIN_ERRORS * error and gain > 0 else "correction"
    correction, offsets = fit_rule(rule, log_p, y_true, log_w, objective)
    imbalance = spec.configuration.imbalance or {}
    earlier = decision_scores(log_p, log_w, float(imbalance.get("posterior_correction", 0.0)),
                              imbalance.get("class_log_offsets"))
    n_classes = log_p.shape[1]
    return Calibration(
        dataset=spec.dataset, run="", folds=[], n_images=len(y_true), objective=objective, rule=rule,
        posterior_correction=correction, class_log_offsets=[round(float(b), 3) for b in offsets],
        cross_fitted=cross_fitted, offsets_gain=[round(gain, 5), round(error, 5)],
        before=rule_metrics(y_true, earlier, n_classes),
        after=rule_metrics(y_true, decision_scores(log_p, log_w, correction, offsets), n_classes), reason="",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        classes=list(spec.classes or []))


def describe_calibration(calibration: Calibration) -> str:
    """What was chosen, and the out-of-fold figures before and after (the latter fitted on them)."""
    def line(name, metrics):
        recall = ", ".join(f"{c} {r:.2f}" for c, r in zip(calibration.classes, metrics["recall"]))
        return (f"  {name}: accuracy {metrics['accuracy']:.4f}, balanced accuracy "
                f"{metrics['balanced_accuracy']:.4f}; recall {recall}")
    offsets = ", ".join(f"{c} {b:+.2f}" for c, b in zip(calibration.classes, calibration.class_log_offsets))
    return "\n".join([
        f"calibrated {calibration.run}: {calibration.rule}, posterior correction "
        f"{calibration.posterior_correction:g}" + (f", log offsets {offsets}" if any(calibration.class_log_offsets)
                                                  else ""),
        f"  why: {calibration.reason}",
        line("out-of-fold before", calibration.before),
        line("out-of-fold after (fitted on these images: optimistic)", calibration.after),
        f"  written to every fold's plan.json and {Path(calibration.run) / CALIBRATION_FILE}; "
        f"`autoplan evaluate --split test` says what it is worth"])
