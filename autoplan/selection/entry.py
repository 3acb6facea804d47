"""``find_best``: compare, choose, write ``RESULTS/NAME/best.json``; and the table it prints."""

import numpy as np

from autoplan.artifacts import BEST_FILE, BestChoice
from autoplan.errors import InputError
from autoplan.paths import splits_file
from autoplan.selection.candidates import complete_candidates, discover_candidates, train_missing_folds
from autoplan.selection.scoring import classification_scores, segmentation_scores

METRICS = {"segmentation": "mean_foreground_dice", "classification": "balanced_accuracy"}


def _folds(splits: list, folds) -> list:
    if folds is None:
        return list(range(len(splits)))
    bad = [fold for fold in folds if not 0 <= int(fold) < len(splits)]
    if bad:
        raise InputError(None, f"--folds {bad[0]}: the dataset has folds 0 to {len(splits) - 1}")
    return sorted({int(fold) for fold in folds})


def _reason(ranked: list, metric: str, folds: list, n_cases: int, label_names: dict) -> str:
    chosen = ranked[0]
    text = (f"{chosen.label} has the highest {metric} ({chosen.score:.4f}) on the out-of-fold predictions "
            f"of fold {', '.join(map(str, folds))} ({n_cases} cases)")
    if len(ranked) > 1:
        text += f"; next is {ranked[1].label} ({ranked[1].score:.4f})"
    kept = [label_names.get(int(label), label) for label, keep in chosen.postprocessing.items() if keep]
    if chosen.score_postprocessed is not None:
        text += (f"; keeping the largest component of {', '.join(kept)} raises it to "
                 f"{chosen.score_postprocessed:.4f}" if kept else "; no post-processing raises it")
    return text


def find_best(dataset, folders, folds=None, tta: bool = True, device="cpu", train_missing: bool = False,
              time_budget_minutes=None, n_jobs=None) -> BestChoice:
    """Score every trained run of ``dataset`` that has all of ``folds`` (default: every fold
    of splits.json) and every pair's ensemble on the same out-of-fold predictions; choose the
    highest mean foreground Dice (classification: balanced accuracy; ties go to fewer
    members), with the post-processing those predictions support; write best.json.

    ``train_missing`` first trains the folds that runs lack (``time_budget_minutes`` each);
    ``n_jobs`` is the torch threads of the predictions (as in predict)."""
    from autoplan.inference.predict import torch_threads
    from autoplan.jsonio import read_json

    results = folders.dataset_results(dataset.name)
    if not splits_file(folders.results, dataset.name).is_file():
        raise InputError(results, "no splits.json: nothing trained yet (autoplan train NAME --fold all)")
    splits = read_json(splits_file(folders.results, dataset.name))
    folds = _folds(splits, folds)
    if train_missing:
        train_missing_folds(dataset, folders, discover_candidates(results), folds, time_budget_minutes)
    candidates, excluded = complete_candidates(discover_candidates(results), folds)
    if not candidates:
        raise InputError(results, f"no run has finished fold {', '.join(map(str, folds))}: train with "
                                  "--fold all, or add --train-missing")
    scoring = segmentation_scores if dataset.task_type != "classification" else classification_scores
    with torch_threads(n_jobs):
        scores = scoring(dataset, splits, folds, candidates, tta=tta, device=device)
    ranked = sorted(scores.values(), key=lambda s: (-np.nan_to_num(s.score, nan=-1.0), len(s.members)))
    n_cases = sum(len(splits[fold]["val"]) for fold in folds)
    metric = METRICS.get(dataset.task_type, METRICS["segmentation"])
    choice = BestChoice(dataset=dataset.name, task_type=dataset.task_type, metric=metric, folds=folds,
                        n_cases=n_cases, tta=tta, candidates=ranked, chosen=ranked[0], excluded=excluded,
                        reason=_reason(ranked, metric, folds, n_cases, {v: k for k, v in dataset.labels.items()}))
    choice.save(results / BEST_FILE)
    return choice


def format_best_table(choice: BestChoice) -> str:
    """The candidates as a Markdown table (best first), the choice and why, what was left out."""
    names = list(choice.candidates[0].per_label)
    header = ["candidate", choice.metric, *names]
    post = choice.task_type != "classification"
    if post:
        header.append("post-processed")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for candidate in choice.candidates:
        cells = [candidate.label, f"{candidate.score:.4f}", *(f"{candidate.per_label[n]:.4f}" for n in names)]
        if post:
            cells.append(f"{candidate.score_postprocessed:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"chosen: {choice.chosen.label}: {choice.reason}")
    lines += [f"not compared: {label}: {why}" for label, why in choice.excluded.items()]
    return "\n".join(lines)
