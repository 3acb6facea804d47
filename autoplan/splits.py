"""Cross-validation folds: 5 by default, grouped by patient/lesion, stratified by class.

A group (``Case.group``) never appears on both sides of a split: several images of
one lesion in train and validation inflate the validation scores.

The untouched test split (``autoplan split``, RESULTS/NAME/test_split.json) is never part of
a fold: ``make_splits`` leaves its cases out, and a saved splits.json that names one of them
(written before the test split by hand, or copied from elsewhere; ``autoplan split`` itself
deletes splits.json) is refused rather than silently used or rebuilt, because runs trained on
its folds have seen test cases.
"""

from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from autoplan.datasets import Dataset
from autoplan.errors import InputError
from autoplan.jsonio import read_json, write_json
from autoplan.paths import splits_file
from autoplan.test_split import held_out_cases, held_out_file

SPLIT_SEED = 12345


def make_splits(dataset: Dataset, n_folds: int = 5, seed: int = SPLIT_SEED, test_cases=frozenset()) -> list:
    """[{"train": [case ids], "val": [case ids]}, ...], deterministic for a given seed; the
    ``test_cases`` (ids of the untouched test split) are in no fold."""
    cases = [case for case in dataset.cases if case.id not in test_cases]
    case_ids = np.array([case.id for case in cases])
    n_folds = max(2, min(n_folds, len(case_ids)))
    groups = [case.group for case in cases]
    has_groups = any(g is not None for g in groups)
    # a case without a group is its own group
    groups = np.array([g if g is not None else f"__case__{c}" for g, c in zip(groups, case_ids)])
    if dataset.task_type == "classification":
        classes = np.array([case.class_name for case in cases])
        n_folds = min(n_folds, int(np.unique(classes, return_counts=True)[1].max()))
        if has_groups:
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            folds = splitter.split(case_ids, classes, groups)
        else:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            folds = splitter.split(case_ids, classes)
    elif has_groups:
        # GroupKFold has no shuffle: permute the cases first so folds do not follow file order
        order = np.random.default_rng(seed).permutation(len(case_ids))
        folds = ((order[t], order[v]) for t, v in GroupKFold(n_splits=n_folds).split(order, groups=groups[order]))
    else:
        folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(case_ids)
    return [{"train": sorted(case_ids[t].tolist()), "val": sorted(case_ids[v].tolist())} for t, v in folds]


def load_or_create_splits(dataset: Dataset, results_dir: Path) -> list:
    """The dataset's saved splits (RESULTS/NAME/splits.json), created on first use without
    the test split's cases; a saved one that names a test case is refused (InputError)."""
    path = splits_file(results_dir, dataset.name)
    test_cases = held_out_cases(results_dir, dataset.name)
    known = {case.id for case in dataset.cases} - test_cases
    if path.is_file():
        splits = read_json(path)
        leaked = sorted({c for fold in splits for c in fold["train"] + fold["val"]} & test_cases)
        if leaked:
            raise InputError(path, f"puts {len(leaked)} case(s) of the untouched test split "
                                   f"({held_out_file(results_dir, dataset.name).name}) in its folds, e.g. "
                                   f"{leaked[0]}: delete it (new folds leave the test cases out) and train "
                                   "again the runs made on it, which have seen them")
        saved = {c for fold in splits for c in fold["val"]}
        if saved == known:
            return splits
    splits = make_splits(dataset, test_cases=test_cases)
    write_json(path, splits)
    return splits
