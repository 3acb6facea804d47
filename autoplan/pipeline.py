"""The stages chained: what the commands and the demo call.

Each function takes a dataset and the folders and returns the stage's artifact. The CLI parses,
calls one of these (or a stage's own entry function) and prints the summary lines at the end of
this module; the demo calls the same functions and prints the same lines.
"""

import itertools
from dataclasses import replace
from pathlib import Path

from autoplan.artifacts import Plan
from autoplan.datasets import Dataset, load_dataset
from autoplan.errors import InputError
from autoplan.jsonio import atomic_write_text
from autoplan.paths import Folders, plans_file
from autoplan.runs import TrainOptions

# Options `autoplan sweep` takes as comma-separated lists, and the type of one value. The names
# are TrainOptions fields; the CLI derives its sweep flags from this table.
SWEEPABLE = {"loss": str, "dropout": float, "base_features": int, "norm": str, "augment": str,
             "optimizer": str, "lr": float, "batch_size": int, "label_smoothing": float, "imbalance": str}


def open_dataset(name: str, folders: Folders) -> Dataset:
    root = folders.dataset_raw(name)
    if not root.is_dir():
        raise InputError(root, f"no dataset {name!r} here (run `autoplan import {name} ...` first)")
    return load_dataset(root)


def fingerprint(dataset: Dataset, folders: Folders, force=False, n_jobs=None):
    from autoplan.fingerprint import fingerprint_dataset

    return fingerprint_dataset(dataset, folders.results, force=force, n_jobs=n_jobs)


def plan(dataset: Dataset, folders: Folders, device=None, gpu_memory_gb=None,
         time_budget_minutes=None, base_features=None, n_jobs=None, field_of_view="auto", plan_from=None,
         lowres="auto") -> Plan:
    """Fingerprint (cached) then plan; writes RESULTS/NAME/plans.json.

    ``device=None`` plans for the device training will pick: the GPU when there is one.
    ``plan_from`` (a run) makes that run's configuration the default one (fine-tuning).
    ``lowres='always'`` plans a 3d_lowres stage and its cascade also where nnU-Net's rule would not.
    """
    from autoplan.planning import cuda_available, plan_dataset

    device = device or ("cuda" if cuda_available() else "cpu")
    dataset_fingerprint = fingerprint(dataset, folders, n_jobs=n_jobs)
    widths = {"base_features": base_features} if base_features else {}     # else the planner's default
    result = plan_dataset(dataset, dataset_fingerprint, device=device, gpu_memory_gb=gpu_memory_gb,
                          time_budget_minutes=time_budget_minutes, results_dir=folders.results,
                          field_of_view=field_of_view, lowres=lowres, **widths)
    if plan_from:
        from autoplan.finetune import plan_from_source

        result = plan_from_source(result, plan_from)
    result.save(plans_file(folders.results, dataset.name))
    return result


def load_plan(dataset: Dataset, folders: Folders) -> Plan:
    path = plans_file(folders.results, dataset.name)
    if not path.is_file():
        raise InputError(path, f"no plans.json (run `autoplan plan {dataset.name}` first)")
    return Plan.load(path)


def train(dataset: Dataset, folders: Folders, options: TrainOptions, plan_result: Plan | None = None) -> list:
    from autoplan.training import train as train_stage

    return train_stage(dataset, plan_result or load_plan(dataset, folders), options, folders)


def plan_and_train(dataset: Dataset, folders: Folders, options: TrainOptions, device=None,
                   gpu_memory_gb=None, field_of_view="auto", plan_from=None, lowres="auto") -> list:
    """Plan, then train ``options.configuration`` (default: the plan's); a cascade trains its
    first stage's missing folds first (:func:`train_cascade`)."""
    planning = dict(device=device, gpu_memory_gb=gpu_memory_gb, base_features=options.base_features,
                    n_jobs=options.n_jobs, field_of_view=field_of_view, plan_from=plan_from, lowres=lowres)
    planned = plan(dataset, folders, time_budget_minutes=options.time_budget_minutes, **planning)
    chosen = planned.configurations.get(options.configuration or planned.default_configuration)
    if chosen is not None and chosen.previous_stage:
        return train_cascade(dataset, folders, options, planned, planning)
    return train(dataset, folders, options, planned)


def train_cascade(dataset: Dataset, folders: Folders, options: TrainOptions, planned: Plan, planning: dict) -> list:
    """Both stages of a cascade: the first stage (same options) on every fold whose out-of-fold
    prediction is missing, then the cascade on ``options.fold``. A time budget is shared equally
    by those runs (``selection.budget.cascade_budget``), the plan re-made for one run's share."""
    from autoplan.selection.budget import cascade_budget
    from autoplan.splits import load_or_create_splits
    from autoplan.training import folds_to_train

    options = replace(options, configuration=options.configuration or planned.default_configuration)
    cascade = planned.configurations[options.configuration]
    splits = load_or_create_splits(dataset, folders.results)
    cascade_folds = folds_to_train(options.fold, len(splits))
    first = replace(options, configuration=cascade.previous_stage)
    minutes, reason = cascade_budget(options.time_budget_minutes, _first_stage_folds(dataset, folders, planned,
                                                                                       first, splits), cascade_folds)
    print(f"cascade: {reason}")
    if minutes:
        planned = plan(dataset, folders, time_budget_minutes=minutes, **planning)
    runs = []
    # again with the plan for the share: its width (and so the run's name) may differ
    for fold in _first_stage_folds(dataset, folders, planned, first, splits):
        runs += train(dataset, folders, replace(first, fold=str(fold), time_budget_minutes=minutes), planned)
    return runs + train(dataset, folders, replace(options, time_budget_minutes=minutes or options.time_budget_minutes),
                        planned)


def _first_stage_folds(dataset: Dataset, folders: Folders, planned: Plan, first: TrainOptions, splits: list) -> list:
    """The first-stage folds to train: none when a run of it already covers every case, else the
    folds its run under ``first``'s options lacks."""
    from autoplan.inference.cascade import out_of_fold_predictions
    from autoplan.training import effective_configuration, run_folder

    stage_dir = folders.dataset_results(dataset.name) / first.configuration
    if any(not out_of_fold_predictions(run, splits)[1] for run in stage_dir.glob("*") if run.is_dir()):
        return []
    configuration = effective_configuration(planned.configurations[first.configuration], first)
    return out_of_fold_predictions(run_folder(dataset, configuration, first, folders, 0).parent, splits)[1]


def _prediction_device(options: TrainOptions) -> str:
    import torch

    return "cuda" if options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available()) else "cpu"


def find_best(dataset: Dataset, folders: Folders, folds=None, tta: bool = True, device="cpu",
              train_missing: bool = False, time_budget_minutes=None, n_jobs=None):
    """Compare the trained runs and pairs on out-of-fold predictions -> RESULTS/NAME/best.json."""
    from autoplan.selection import find_best as find_best_stage

    return find_best_stage(dataset, folders, folds=folds, tta=tta, device=device, train_missing=train_missing,
                           time_budget_minutes=time_budget_minutes, n_jobs=n_jobs)


def plan_train_and_find_best(dataset: Dataset, folders: Folders, options: TrainOptions, device=None,
                             gpu_memory_gb=None, field_of_view="auto") -> tuple:
    """``plan-and-train --find-best``: split the budget across the plan's configurations and
    folds (``selection.split_budget``), plan each run for its share, train them, find-best.

    Returns (the BudgetSplit, the Runs, the BestChoice)."""
    from autoplan.selection import split_budget
    from autoplan.splits import load_or_create_splits

    if options.configuration or options.fold not in ("0", "all"):
        raise InputError(None, "--find-best trains every configuration on the folds its budget allows: "
                               "leave out --config and --fold")
    planning = dict(device=device, gpu_memory_gb=gpu_memory_gb, base_features=options.base_features,
                    n_jobs=options.n_jobs, field_of_view=field_of_view)
    planned = plan(dataset, folders, time_budget_minutes=options.time_budget_minutes, **planning)
    fold_sizes = [len(fold["val"]) for fold in load_or_create_splits(dataset, folders.results)]
    split = split_budget(planned, options.time_budget_minutes, fold_sizes)
    if split.minutes_per_run:
        planned = plan(dataset, folders, time_budget_minutes=split.minutes_per_run, **planning)
    runs = []
    for name in split.configurations:
        for fold in split.folds:
            runs += train(dataset, folders, replace(options, configuration=name, fold=str(fold),
                                                    time_budget_minutes=split.minutes_per_run), planned)
    choice = find_best(dataset, folders, folds=split.folds, device=_prediction_device(options), n_jobs=options.n_jobs)
    return split, runs, choice


def compare(run_dirs: list, output: Path | None = None) -> str:
    """The Markdown table of runs side by side; also written to ``output`` when given."""
    from autoplan.report import compare_runs

    table = compare_runs(run_dirs)
    if output:
        atomic_write_text(output, table)
    return table


def sweep_grid(values: dict) -> list:
    """{'loss': 'ce,dice', 'dropout': '0,0.2'} -> every combination as a dict of typed values.

    Options given as None are left out (they keep the TrainOptions value)."""
    axes = {name: [SWEEPABLE[name](v) for v in str(text).split(",") if v != ""]
            for name, text in values.items() if text is not None}
    names = list(axes)
    return [dict(zip(names, combination)) for combination in itertools.product(*axes.values())]


def sweep(dataset: Dataset, folders: Folders, options: TrainOptions, grid: list, output: Path | None = None):
    """Train every combination (one plan, one preprocessing), then compare.md and curves.png.

    Returns (the compare table, the folder it was written to: ``output`` or RESULTS/NAME/sweep)."""
    from autoplan.report import plot_compare_curves

    planned = load_plan(dataset, folders) if plans_file(folders.results, dataset.name).is_file() else plan(
        dataset, folders, time_budget_minutes=options.time_budget_minutes, n_jobs=options.n_jobs)
    run_dirs = []
    for combination in grid:
        runs = train(dataset, folders, replace(options, run_name=None, **combination), planned)
        run_dirs += [Path(run.run_dir) for run in runs]
    output = Path(output) if output else folders.dataset_results(dataset.name) / "sweep"
    table = compare(run_dirs, output / "compare.md")
    plot_compare_curves(run_dirs, output / "curves.png")
    return table, output


# --------------------------------------------------------------------------------------
# the lines the commands (and the demo) print about each stage's result

def describe_import(dataset: Dataset) -> str:
    kinds = f"classes {', '.join(dataset.classes)}" if dataset.classes else \
        f"labels {', '.join(f'{v}={k}' for k, v in dataset.labels.items())}"
    return f"imported {dataset.name}: {len(dataset.cases)} cases, {kinds} -> {dataset.root}"


def describe_headline(headline: dict) -> str:
    """``dice_lung 0.9712, dice_heart 0.9400``: the float metrics of a headline dict."""
    return ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if isinstance(v, float))


def describe_runs(runs: list) -> str:
    lines = []
    for run in runs:
        lines.append(f"{run.run_dir}: {run.epochs_completed} epochs ({run.stopped_by}), "
                     f"{describe_headline(run.headline)}")
        lines.append(f"  report: {Path(run.run_dir) / 'report.html'} (also report.md, metrics.json)")
    return "\n".join(lines)


def describe_prediction(summary: dict, output: Path) -> str:
    line = f"predicted {summary.get('n_cases', '?')} cases -> {output}"
    if summary.get("qc"):
        line += f"; {summary['n_flagged']} of {summary['n_predicted']} cases flagged, see {summary['qc']}"
    return line


def describe_choice(choice, folders: Folders) -> str:
    """find-best's table, the choice and why, and where best.json went."""
    from autoplan.artifacts import BEST_FILE
    from autoplan.selection import format_best_table

    results = folders.dataset_results(choice.dataset)
    return (f"{format_best_table(choice)}\nwrote {results / BEST_FILE} "
            f"(autoplan predict --model {results} ...)")


def describe_package(manifest: dict, output: Path) -> str:
    if manifest.get("members"):        # a find-best choice
        return (f"wrote {output}: {manifest['dataset']}, find-best's choice {manifest['configuration']} "
                f"({sum(len(f) for f in manifest['folds'].values())} folds), {manifest['weights']} weights")
    return (f"wrote {output}: {manifest['dataset']} {manifest['configuration']} {manifest['run']}, "
            f"{len(manifest['folds'])} fold(s), {manifest['weights']} weights")
