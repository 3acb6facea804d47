"""The stages chained: what the CLI commands call (the CLI itself holds no logic)."""

import itertools
from dataclasses import replace
from pathlib import Path

from autoplan.datasets import Dataset, load_dataset
from autoplan.errors import InputError
from autoplan.paths import Folders
from autoplan.planning import Plan
from autoplan.runs import TrainOptions


def open_dataset(name: str, folders: Folders) -> Dataset:
    root = folders.dataset_raw(name)
    if not root.is_dir():
        raise InputError(root, f"no dataset {name!r} here (run `autoplan import {name} ...` first)")
    return load_dataset(root)


def fingerprint(dataset: Dataset, folders: Folders, force=False, n_jobs=None):
    from autoplan.fingerprint import fingerprint_dataset

    return fingerprint_dataset(dataset, folders.results, force=force, n_jobs=n_jobs)


def plans_path(dataset: Dataset, folders: Folders) -> Path:
    return folders.dataset_results(dataset.name) / "plans.json"


def plan(dataset: Dataset, folders: Folders, device=None, gpu_memory_gb=None,
         time_budget_minutes=None, base_features=None, n_jobs=None, field_of_view="auto") -> Plan:
    """Fingerprint (cached) then plan; writes RESULTS/NAME/plans.json.

    ``device=None`` plans for the device training will pick: the GPU when there is one.
    """
    from autoplan.planning import cuda_available, plan_dataset

    device = device or ("cuda" if cuda_available() else "cpu")
    dataset_fingerprint = fingerprint(dataset, folders, n_jobs=n_jobs)
    result = plan_dataset(dataset, dataset_fingerprint, device=device, gpu_memory_gb=gpu_memory_gb,
                          time_budget_minutes=time_budget_minutes, base_features=base_features or 32,
                          results_dir=folders.results, field_of_view=field_of_view)
    result.save(plans_path(dataset, folders))
    return result


def load_plan(dataset: Dataset, folders: Folders) -> Plan:
    path = plans_path(dataset, folders)
    if not path.is_file():
        raise InputError(path, f"no plans.json (run `autoplan plan {dataset.name}` first)")
    return Plan.load(path)


def train(dataset: Dataset, folders: Folders, options: TrainOptions, plan_result: Plan | None = None) -> list:
    from autoplan.training import train as train_stage

    return train_stage(dataset, plan_result or load_plan(dataset, folders), options, folders)


def plan_and_train(dataset: Dataset, folders: Folders, options: TrainOptions, device=None,
                   gpu_memory_gb=None, field_of_view="auto") -> list:
    planned = plan(dataset, folders, device=device, gpu_memory_gb=gpu_memory_gb,
                   time_budget_minutes=options.time_budget_minutes,
                   base_features=options.base_features, n_jobs=options.n_jobs, field_of_view=field_of_view)
    return train(dataset, folders, options, planned)


SWEEPABLE = {"loss": str, "dropout": float, "base_features": int, "norm": str, "augment": str,
             "optimizer": str, "lr": float, "batch_size": int, "label_smoothing": float}


def sweep_grid(values: dict) -> list:
    """{'loss': 'ce,dice', 'dropout': '0,0.2'} -> every combination as a dict of typed values."""
    axes = {name: [SWEEPABLE[name](v) for v in str(text).split(",") if v != ""]
            for name, text in values.items() if text is not None}
    names = list(axes)
    return [dict(zip(names, combination)) for combination in itertools.product(*axes.values())]


def sweep(dataset: Dataset, folders: Folders, options: TrainOptions, grid: list, output: Path | None = None):
    """Train every combination (one preprocessing, shared), then the compare table and curves."""
    from autoplan.report import compare_runs, plot_compare_curves

    planned = load_plan(dataset, folders) if plans_path(dataset, folders).is_file() else plan(
        dataset, folders, time_budget_minutes=options.time_budget_minutes, n_jobs=options.n_jobs)
    run_dirs = []
    for combination in grid:
        runs = train(dataset, folders, replace(options, run_name=None, **combination), planned)
        run_dirs += [Path(run.run_dir) for run in runs]
    table = compare_runs(run_dirs)
    output = Path(output) if output else folders.dataset_results(dataset.name) / "sweep"
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.md").write_text(table)
    plot_compare_curves(run_dirs, output / "curves.png")
    return table, output
