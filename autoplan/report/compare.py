"""Comparing runs: an ablation table of the options that differ and the headline metrics
(``compare_runs``), and the runs' learning curves in one figure (``plot_compare_curves``).
A run folder with several folds counts as the mean over its folds."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.evaluation import headline_metrics, nanmean
from autoplan.jsonio import read_json
from autoplan.paths import fold_folders
from autoplan.report.document import flatten, fmt, fmt_setting, markdown_table
from autoplan.report.figures import draw_curves, finish_curve_axes, new_figure, primary_metric, read_log, save_figure

# options that do not change what a run learns, and so never name a difference
IGNORED_OPTIONS = {"run_name", "fold", "resume", "n_jobs", "n_workers", "device"}
OPTION_ORDER = ["dataset", "configuration", "loss", "dropout", "base_features", "norm", "augment", "optimizer",
                "lr", "batch_size", "epochs", "pretrained"]


@dataclass
class RunSummary:
    """One row of the compare table: a run (one fold, or the mean over its folds)."""

    name: str
    folds: list
    options: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def _effective_options(plan: dict) -> dict:
    """The run's options with "plan's choice" (None) replaced by what the plan chose."""
    configuration = plan.get("configuration") or {}
    if not isinstance(configuration, dict):
        configuration = {"name": configuration}
    options = {k: v for k, v in flatten(plan.get("options") or {}).items() if k not in IGNORED_OPTIONS}
    for key, value in list(options.items()):
        if value is None:
            options[key] = plan.get(key, configuration.get(key))
    if options.get("base_features") is None and configuration.get("network", {}).get("features_per_stage"):
        options["base_features"] = configuration["network"]["features_per_stage"][0]
    if options.get("base_features") is None and configuration.get("network", {}).get("width"):
        options["base_features"] = configuration["network"]["width"]
    options["configuration"] = configuration.get("name", options.get("configuration"))
    options["patch_size"] = configuration.get("patch_size")
    options["dataset"] = plan.get("dataset")
    return options


# headline_metrics keys shown in the table, with their column titles (per-label Dice follows)
COMPARE_COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.", "macro_f1": "macro F1",
                   "macro_auc": "macro AUC", "foreground_dice": "Dice (fg mean)",
                   "foreground_hd95_mm": "HD95 {unit} (fg mean)"}


def _lower_is_better(name: str) -> bool:
    return any(word in name for word in ("loss", "hd95", "asd", "error"))


def _validation_columns(metrics: dict) -> dict:
    """The table's validation columns of one fold's metrics.json (``headline_metrics``, titled)."""
    headline = headline_metrics(metrics)
    unit = metrics.get("distance_unit", "mm")
    columns = {title.format(unit=unit): headline[key] for key, title in COMPARE_COLUMNS.items() if key in headline}
    columns.update({f"Dice {key[len('dice_'):]}": value for key, value in headline.items()
                    if key.startswith("dice_")})
    return columns


def _training_columns(log: dict) -> dict:
    """Final train loss, the best value of the primary validation metric, minutes and epochs of log.csv."""
    values = {}
    if "train_loss" in log and np.isfinite(log["train_loss"]).any():
        values["final train loss"] = log["train_loss"][np.isfinite(log["train_loss"])][-1]
    name = primary_metric(log)
    if name and np.isfinite(log[name]).any():
        values[f"best {name}"] = np.nanmin(log[name]) if _lower_is_better(name) else np.nanmax(log[name])
    if "seconds" in log:
        values["train min"] = np.nansum(log["seconds"]) / 60
    values["epochs run"] = len(next(iter(log.values()), []))
    return values


def _fold_metrics(fold: Path) -> dict:
    """Headline numbers of one fold: validation metrics.json, then final/best values from log.csv."""
    values = {}
    if (fold / "metrics.json").is_file():
        values.update(_validation_columns(read_json(fold / "metrics.json")))
    if (fold / "log.csv").is_file():
        values.update(_training_columns(read_log(fold / "log.csv")))
    return values


def summarize_run(run_dir) -> RunSummary:
    run_dir = Path(run_dir)
    folds = fold_folders(run_dir)
    is_fold = folds == [run_dir]
    name = f"{run_dir.parent.name}/{run_dir.name}" if is_fold else run_dir.name
    options = _effective_options(read_json(folds[0] / "plan.json"))
    per_fold = [_fold_metrics(fold) for fold in folds]
    columns = list(dict.fromkeys(k for values in per_fold for k in values))
    metrics = {k: nanmean(values.get(k) for values in per_fold) for k in columns}
    return RunSummary(name=name, folds=[f.name for f in folds], options=options, metrics=metrics)


def _differing_options(summaries: list) -> list:
    keys = list(dict.fromkeys(k for s in summaries for k in s.options))
    if len(summaries) > 1:
        keys = [k for k in keys if len({fmt_setting(s.options.get(k)) for s in summaries}) > 1]
    return sorted(keys, key=lambda k: (OPTION_ORDER.index(k) if k in OPTION_ORDER else len(OPTION_ORDER), k))


def _metric_digits(name: str) -> int:
    return 2 if any(word in name for word in ("HD95", "min")) else 0 if name == "epochs run" else 4


def compare_runs(run_dirs: list) -> str:
    """Markdown ablation table: one row per run, the options that differ, headline metrics."""
    if not run_dirs:
        raise InputError(None, "compare needs at least one run folder")
    summaries = [summarize_run(d) for d in run_dirs]
    options = _differing_options(summaries)
    metric_names = list(dict.fromkeys(k for s in summaries for k in s.metrics))
    header = ["run", "folds"] + options + metric_names
    rows = []
    for s in summaries:
        folds = s.folds[0] if len(s.folds) == 1 else f"{len(s.folds)} (mean)"
        rows.append([s.name, folds] + [fmt_setting(s.options.get(k)) for k in options] +
                    [fmt(s.metrics.get(k), _metric_digits(k)) for k in metric_names])
    notes = ("Options: only those that differ between the runs (all of them for a single run). "
             "Validation metrics from each fold's metrics.json, training columns from log.csv; "
             "a run folder with several folds shows the mean over its folds.")
    return markdown_table(header, rows) + "\n\n" + notes + "\n"


def _mean_log(folds: list) -> dict:
    """Per-epoch mean over the folds' logs (epochs aligned by number)."""
    logs = [read_log(f / "log.csv") for f in folds if (f / "log.csv").is_file()]
    logs = [log for log in logs if "epoch" in log and len(log["epoch"])]
    if not logs:
        return {}
    epochs = np.unique(np.concatenate([log["epoch"] for log in logs]))
    merged = {"epoch": epochs}
    for column in dict.fromkeys(c for log in logs for c in log if c != "epoch"):
        stacked = np.full((len(logs), len(epochs)), np.nan)
        for i, log in enumerate(logs):
            if column in log:
                stacked[i, np.searchsorted(epochs, log["epoch"])] = log[column]
        merged[column] = np.array([nanmean(col) for col in stacked.T])
    return merged


def plot_compare_curves(run_dirs: list, png) -> Path:
    """Learning curves of several runs in one figure (losses; the headline validation metric)."""
    figure = new_figure(10, 3.8)
    axes_loss, axes_metric = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(run_dirs))]
    metric_names = set()
    for run_dir, color in zip(run_dirs, colors):
        summary_name = summarize_run(run_dir).name
        log = _mean_log(fold_folders(run_dir))
        if log:
            metric_names.update(draw_curves(axes_loss, axes_metric, log, color=color, label_prefix=f"{summary_name}: "))
    finish_curve_axes(axes_loss, axes_metric, " / ".join(sorted(metric_names)) or "validation metric")
    save_figure(figure, Path(png))
    return Path(png)
