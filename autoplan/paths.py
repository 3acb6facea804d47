"""Where raw datasets, the preprocessed cache and results live (flag > env > default), and the
layout inside them. Every module builds these paths through the functions here:

    RAW/NAME/{dataset.json, imagesTr, labelsTr}
    PREPROCESSED/NAME/CONFIGURATION/                        (preprocessed cache)
    RESULTS/NAME/{fingerprint.json, plans.json, splits.json, throughput.json}
    RESULTS/NAME/CONFIGURATION/RUN/fold_K/                  (plan.json, checkpoints, report)
"""

import os
from dataclasses import dataclass
from pathlib import Path

from autoplan.errors import InputError


@dataclass(frozen=True)
class Folders:
    raw: Path
    preprocessed: Path
    results: Path

    def dataset_raw(self, name: str) -> Path:
        return self.raw / name

    def dataset_results(self, name: str) -> Path:
        return self.results / name


def resolve_folders(raw=None, preprocessed=None, results=None) -> Folders:
    def pick(flag, env, default):
        return Path(flag or os.environ.get(env) or default).expanduser()

    return Folders(
        raw=pick(raw, "AUTOPLAN_RAW", "./datasets_raw"),
        preprocessed=pick(preprocessed, "AUTOPLAN_PREPROCESSED", "./preprocessed"),
        results=pick(results, "AUTOPLAN_RESULTS", "./results"),
    )


def fingerprint_file(results_root, name: str) -> Path:
    return Path(results_root) / name / "fingerprint.json"


def plans_file(results_root, name: str) -> Path:
    return Path(results_root) / name / "plans.json"


def splits_file(results_root, name: str) -> Path:
    return Path(results_root) / name / "splits.json"


def test_split_file(results_root, name: str) -> Path:
    """RESULTS/NAME/test_split.json: the untouched test cases (``autoplan split``)."""
    return Path(results_root) / name / "test_split.json"


def throughput_file(results_root, name: str) -> Path:
    return Path(results_root) / name / "throughput.json"


def preprocessed_folder(preprocessed_root, name: str, configuration: str) -> Path:
    return Path(preprocessed_root) / name / configuration


def fold_folder(results_root, name: str, configuration: str, run_name: str, fold) -> Path:
    return Path(results_root) / name / configuration / run_name / f"fold_{fold}"


def _fold_order(path: Path):
    suffix = path.name.split("_", 1)[-1]
    return (0, int(suffix), "") if suffix.isdigit() else (1, 0, suffix)


def fold_folders(model_dir) -> list:
    """``[model_dir]`` for a fold folder, else every ``fold_*`` folder inside it that has a
    plan.json, in fold order (an ensemble or a cross-validated run). Raises InputError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(model_dir, "no such run folder")
    if (model_dir / "plan.json").is_file():
        return [model_dir]
    folds = sorted((p for p in model_dir.glob("fold_*") if (p / "plan.json").is_file()), key=_fold_order)
    if not folds:
        raise InputError(model_dir, "not a run folder: no plan.json and no fold_* folder with one")
    return folds
