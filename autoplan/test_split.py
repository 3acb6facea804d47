"""The untouched test split: cases set aside once, which nothing that chooses anything sees.

Entry function: ``create_test_split(dataset, results_dir, fraction, seed, overwrite)`` ->
``RESULTS/NAME/test_split.json`` (``TestSplit``), the ``autoplan split`` command.

Why: every recipe choice made by its fold-0 score (class weights, thresholds, input size)
tunes to fold 0, so fold 0 flatters. A test set that no choice has looked at says how a
model does on lesions/patients it has never seen.

What sees the test cases: nothing that chooses anything. Once test_split.json exists,
``development_dataset`` leaves them out of the dataset the fingerprint, the plan, the
preprocessing, the cross-validation folds (``splits.make_splits``), training, find-best and
sweep get; only ``autoplan evaluate --split test`` (``evaluation_cases``) reads them.

How the cases are chosen: whole groups (``Case.group``, lesion or patient; a case without
a group is its own group), visited in a seeded random order; a group joins the test set
when that brings the per-class counts (classification; segmentation has one stratum)
closer to ``fraction`` of each class's total. The result is within about one group's size
of the fraction for every class, and the same for the same cases and seed.

Making or changing a test split deletes what was derived from the cases it takes away
(splits.json, plans.json, fingerprint.json, best.json: the next command rebuilds them
without the test cases). It is refused while trained runs exist, whose weights have seen
the cases, unless ``--overwrite``.
"""

import datetime
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autoplan.datasets import Dataset
from autoplan.errors import InputError
from autoplan.jsonio import JsonDataclass
from autoplan.paths import fingerprint_file, plans_file, splits_file, test_split_file

TEST_SPLIT_SEED = 12345


@dataclass
class TestSplit(JsonDataclass):
    """RESULTS/NAME/test_split.json: the cases no choice may see."""

    __test__ = False          # not a pytest test class, despite the name

    dataset: str
    cases: list                # case ids, sorted
    fraction: float            # asked for
    seed: int
    grouped_by: str            # e.g. "Case.group (lesion/patient): 212 of 1480 groups"
    stratified_by: str         # "class" or "none (segmentation)"
    n_cases_total: int
    achieved_fraction: float
    per_class: dict = field(default_factory=dict)   # {class: [test cases, all cases]}
    created: str = ""          # ISO time, UTC

    def created_timestamp(self) -> float:
        return datetime.datetime.fromisoformat(self.created).timestamp() if self.created else 0.0


def held_out_file(results_dir, name: str) -> Path:
    """RESULTS/NAME/test_split.json (beside splits.json)."""
    return test_split_file(results_dir, name)


def load_test_split(results_dir, name: str) -> TestSplit | None:
    path = held_out_file(results_dir, name)
    return TestSplit.load(path) if path.is_file() else None


def held_out_cases(results_dir, name: str) -> set:
    """The ids of the dataset's test cases; empty when it has no test split."""
    split = load_test_split(results_dir, name)
    return set(split.cases) if split else set()


def development_dataset(dataset: Dataset, results_dir) -> Dataset:
    """The dataset without its test cases: what fingerprint, plan, training and find-best get."""
    held_out = held_out_cases(results_dir, dataset.name)
    if not held_out:
        return dataset
    return replace(dataset, cases=[case for case in dataset.cases if case.id not in held_out])


def split_label(kind: str, n_cases: int | None = None, fold=None, dataset: str | None = None) -> str:
    """Which cases a figure comes from, in the words metrics.json and the reports use: ``kind``
    "test" (the untouched test split, ``n_cases``), "validation" (cross-validation ``fold``) or
    "all" (every case of ``dataset``)."""
    if kind == "test":
        return f"untouched test split ({n_cases} cases)"
    if kind == "validation":
        return f"validation fold {fold}"
    return f"all cases of {dataset}"


@dataclass
class EvaluationCases:
    """The cases ``evaluate`` scores and the words that say which they are."""

    dataset: Dataset
    label: str
    test_split: TestSplit | None = None


def evaluation_cases(dataset: Dataset, results_dir, split: str = "all") -> EvaluationCases:
    """``split`` "all": every case of ``dataset``; "test": exactly its untouched test split."""
    if split == "all":
        return EvaluationCases(dataset, split_label("all", dataset=dataset.name))
    if split != "test":
        raise InputError(None, f"--split {split!r}: choose 'all' or 'test'")
    test_split = load_test_split(results_dir, dataset.name)
    if test_split is None:
        raise InputError(held_out_file(results_dir, dataset.name),
                         f"no test split (run `autoplan split {dataset.name} --test-fraction 0.15` "
                         "before training)")
    known = {case.id for case in dataset.cases}
    missing = sorted(set(test_split.cases) - known)
    if missing:
        raise InputError(held_out_file(results_dir, dataset.name),
                         f"names {len(missing)} case(s) the dataset no longer has, e.g. {missing[0]}")
    held_out = set(test_split.cases)
    cases = [case for case in dataset.cases if case.id in held_out]
    return EvaluationCases(replace(dataset, cases=cases), split_label("test", n_cases=len(cases)), test_split)


# ---------------------------------------------------------------- choosing the cases


def _strata_and_groups(dataset: Dataset):
    """(group names sorted, stratum names sorted, counts (groups x strata), group of each case)."""
    group_of = {case.id: case.group if case.group is not None else f"__case__{case.id}" for case in dataset.cases}
    classification = dataset.task_type == "classification"
    stratum_of = {case.id: (case.class_name if classification else "all") for case in dataset.cases}
    groups, strata = sorted(set(group_of.values())), sorted(set(stratum_of.values()))
    group_index, stratum_index = {g: i for i, g in enumerate(groups)}, {s: i for i, s in enumerate(strata)}
    counts = np.zeros((len(groups), len(strata)))
    for case in dataset.cases:
        counts[group_index[group_of[case.id]], stratum_index[stratum_of[case.id]]] += 1
    return groups, strata, counts, group_of


def make_test_split(dataset: Dataset, fraction: float, seed: int = TEST_SPLIT_SEED) -> TestSplit:
    """Choose about ``fraction`` of the cases, whole groups, per class (module docstring)."""
    if not 0 < fraction < 1:
        raise InputError(None, f"--test-fraction {fraction}: give a fraction between 0 and 1, e.g. 0.15")
    groups, strata, counts, group_of = _strata_and_groups(dataset)
    target = fraction * counts.sum(axis=0)
    taken, chosen = np.zeros(len(strata)), set()
    for g in np.random.default_rng(seed).permutation(len(groups)):
        if np.abs(taken + counts[g] - target).sum() < np.abs(taken - target).sum():
            taken += counts[g]
            chosen.add(groups[g])
    cases = sorted(case.id for case in dataset.cases if group_of[case.id] in chosen)
    if not cases or len(cases) > len(dataset.cases) - 2:
        problem = "no test case" if not cases else "too few cases to train on"
        raise InputError(dataset.root, f"--test-fraction {fraction} of {len(dataset.cases)} cases in "
                                       f"{len(groups)} groups leaves {problem}")
    has_groups = any(case.group is not None for case in dataset.cases)
    classification = dataset.task_type == "classification"
    per_class = {name: [int(t), int(n)] for name, t, n in zip(strata, taken, counts.sum(axis=0))} \
        if classification else {}
    return TestSplit(
        dataset=dataset.name, cases=cases, fraction=fraction, seed=seed,
        grouped_by=(f"Case.group (lesion/patient): {len(chosen)} of {len(groups)} groups" if has_groups
                    else "none: the dataset has no groups, every case is its own"),
        stratified_by="class" if classification else "none (segmentation)",
        n_cases_total=len(dataset.cases), achieved_fraction=round(len(cases) / len(dataset.cases), 4),
        per_class=per_class)


# ---------------------------------------------------------------- the command


def existing_runs(results_dir, name: str) -> list:
    """Fold folders of trained (or training) runs of the dataset: RESULTS/NAME/CFG/RUN/fold_K."""
    root = Path(results_dir) / name
    return sorted(path.parent for path in root.glob("*/*/fold_*/plan.json"))


def create_test_split(dataset: Dataset, results_dir, fraction: float, seed: int = TEST_SPLIT_SEED,
                      overwrite: bool = False) -> tuple:
    """Write RESULTS/NAME/test_split.json; returns (the TestSplit, lines that say what happened).

    The same cases as the saved split: nothing changes. Another set while runs exist: refused
    unless ``overwrite`` (those runs stay, but have seen cases that are now test cases)."""
    path = held_out_file(results_dir, dataset.name)
    saved = load_test_split(results_dir, dataset.name)
    split = make_test_split(dataset, fraction, seed)
    if saved is not None and saved.cases == split.cases:
        return saved, [f"unchanged: {path} already holds these {len(saved.cases)} cases"]
    runs = existing_runs(results_dir, dataset.name)
    if runs and not overwrite:
        what = "another test split" if saved else "a test split"
        raise InputError(runs[0], f"is one of {len(runs)} trained run fold(s) of {dataset.name}: they have seen "
                                  f"the cases {what} would hold. Add --overwrite to make it anyway "
                                  "(then train those runs again before scoring the test split)")
    notes = [f"{len(runs)} run fold(s) trained before this split have seen its cases: train them again "
             "before `evaluate --split test`"] if runs else []
    for stale in (splits_file(results_dir, dataset.name), plans_file(results_dir, dataset.name),
                  fingerprint_file(results_dir, dataset.name), path.with_name("best.json")):
        if stale.is_file():
            stale.unlink()       # derived from cases that are now test cases; rebuilt without them
            notes.append(f"removed {stale} (made with the test cases; the next command rebuilds it without them)")
    split.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    split.save(path)
    return split, notes


def describe_test_split(split: TestSplit, results_dir) -> str:
    """What `autoplan split` prints: how many cases, groups and per class, and where."""
    lines = [f"test split of {split.dataset}: {len(split.cases)} of {split.n_cases_total} cases "
             f"({100 * split.achieved_fraction:.1f} %, asked {100 * split.fraction:g} %, seed {split.seed})",
             f"  grouped by {split.grouped_by}; stratified by {split.stratified_by}"]
    if split.per_class:
        lines.append("  per class (test/all): " + ", ".join(f"{name} {t}/{n}" for name, (t, n)
                                                              in split.per_class.items()))
    lines.append(f"  in {held_out_file(results_dir, split.dataset)}: cross-validation, planning and "
                 "every choice leave these cases out; `autoplan evaluate --split test` scores them")
    return "\n".join(lines)
