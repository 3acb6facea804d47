"""Out-of-fold scores of every candidate and every pair's ensemble, from one pass over the
validation cases: each fold's networks predict each of that fold's validation cases once,
and the singles and pairs are scored from those probabilities (a pair averages its two
members' probabilities, as ``predict`` does for a chosen pair). One case's probabilities are
held at a time, so memory does not grow with the dataset."""

import itertools

import numpy as np
from tqdm.auto import tqdm

from autoplan.artifacts import CandidateScore
from autoplan.evaluation import nanmean
from autoplan.inference.classification import classify_pixels
from autoplan.inference.models import ensemble_identity
from autoplan.inference.segmentation import (component_dice, keeps_largest_component, predict_case_probabilities,
                                             probabilities_to_labels)
from autoplan.io import read_case_images, read_case_labels
from autoplan.parallel import progress_enabled
from autoplan.preprocessing import load_classification_image
from autoplan.runs import load_trained

CLASSIFICATION_CHUNK = 64


def entries(specs: list) -> list:
    """Index tuples to score: each candidate alone, then every pair that can be ensembled."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(specs)), 2)
             if ensemble_identity(specs[i]) == ensemble_identity(specs[j])]
    return [(i,) for i in range(len(specs))] + pairs


def _mean(probabilities: list, entry: tuple) -> np.ndarray:
    return probabilities[entry[0]] if len(entry) == 1 else np.mean([probabilities[i] for i in entry], axis=0)


def _fold_models(candidates: list, fold: int, device) -> list:
    return [load_trained(candidate.folds[fold], device=device) for candidate in candidates]


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=not progress_enabled())


# ============================================================================ segmentation


def segmentation_scores(dataset, splits, folds, candidates, tta=True, device="cpu") -> dict:
    """{entry: CandidateScore} with the mean foreground Dice before post-processing, and the
    keep-largest-component decision each entry would get from the same cases."""
    specs = [candidate.spec() for candidate in candidates]
    label_ids = sorted(int(v) for v in dataset.labels.values())
    foreground = [label for label in label_ids if label != 0]
    tallies = {entry: {label: ([], []) for label in foreground} for entry in entries(specs)}
    bar = _progress(sum(len(splits[fold]["val"]) for fold in folds), "find-best")
    for fold in folds:
        models = _fold_models(candidates, fold, device)
        for case_id in splits[fold]["val"]:
            case = dataset.case(case_id)
            image = read_case_images(case)
            reference = read_case_labels(case, image, label_ids)
            probabilities = [predict_case_probabilities([network], spec, image, tta, device, case_id)[0]
                             for spec, network in models]
            for entry, tally in tallies.items():
                labels = probabilities_to_labels(_mean(probabilities, entry), specs[entry[0]])
                for label in foreground:
                    before, after = component_dice(labels, reference, label)
                    tally[label][0].append(before)
                    tally[label][1].append(after)
            bar.update()
    bar.close()
    names = {int(v): k for k, v in dataset.labels.items()}
    return {entry: _segmentation_score([candidates[i].member for i in entry], tally, names)
            for entry, tally in tallies.items()}


def _segmentation_score(members: list, tally: dict, names: dict) -> CandidateScore:
    per_label = {names[label]: nanmean(before) for label, (before, _) in tally.items()}
    postprocessing = {str(label): keeps_largest_component(before, after) for label, (before, after) in tally.items()}
    after = [nanmean(tally[label][1] if postprocessing[str(label)] else tally[label][0]) for label in tally]
    return CandidateScore(members=members, score=nanmean(per_label.values()), per_label=per_label,
                          postprocessing=postprocessing, score_postprocessed=nanmean(after))


# ============================================================================ classification


def classification_scores(dataset, splits, folds, candidates, tta=True, device="cpu") -> dict:
    """{entry: CandidateScore} with the balanced accuracy and per-class recall of the
    decisions (the plan's imbalance correction applied, as ``predict`` decides)."""
    specs = [candidate.spec() for candidate in candidates]
    classes = list(dataset.classes)
    y_true, probabilities = [], [[] for _ in candidates]
    bar = _progress(sum(len(splits[fold]["val"]) for fold in folds), "find-best")
    for fold in folds:
        models = _fold_models(candidates, fold, device)
        val = list(splits[fold]["val"])
        for start in range(0, len(val), CLASSIFICATION_CHUNK):
            cases = [dataset.case(case_id) for case_id in val[start:start + CLASSIFICATION_CHUNK]]
            images = [read_case_images(case) for case in cases]
            y_true += [classes.index(case.class_name) for case in cases]
            for index, (spec, network) in enumerate(models):
                pixels = np.stack([load_classification_image(image, spec.configuration) for image in images])
                probabilities[index].append(classify_pixels([network], pixels, spec.configuration, tta, device))
            bar.update(len(cases))
    bar.close()
    probabilities = [np.concatenate(p) for p in probabilities]
    return {entry: _classification_score([candidates[i].member for i in entry], np.asarray(y_true),
                                         _mean(probabilities, entry), classes)
            for entry in entries(specs)}


def _classification_score(members: list, y_true, probabilities, classes: list) -> CandidateScore:
    from sklearn.metrics import balanced_accuracy_score, recall_score

    y_pred = probabilities.argmax(axis=1)
    recall = recall_score(y_true, y_pred, labels=list(range(len(classes))), average=None, zero_division=np.nan)
    return CandidateScore(members=members, score=float(balanced_accuracy_score(y_true, y_pred)),
                          per_label={name: float(r) for name, r in zip(classes, recall)})
