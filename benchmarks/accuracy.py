"""Accuracy on the three real datasets, fold 0, within a CPU time budget. Prints one table.

    python benchmarks/accuracy.py                 # JSRT 10 min, hippocampus 20 min, HAM10000 30 min
    python benchmarks/accuracy.py --quick         # 3 / 5 / 5 minutes
    python benchmarks/accuracy.py --only TaskXRay --loss ce,ce_focal
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, autoplan, ensure_imported, fmt, folders_args, markdown_table  # noqa: E402

BUDGETS = {"TaskXRay": 10, "TaskHippocampus": 20, "TaskDerm": 30}
QUICK = {"TaskXRay": 3, "TaskHippocampus": 5, "TaskDerm": 5}
CONFIG = {"TaskXRay": "2d", "TaskHippocampus": "3d_fullres", "TaskDerm": "classifier"}


def run_one(name, minutes, loss=None):
    ensure_imported(name)
    run_name = f"bench-{minutes:g}min" + (f"-{loss}" if loss else "")
    extra = ["--loss", loss] if loss else []
    seconds = autoplan("plan-and-train", name, "--time-budget", minutes, "--device", "cpu", "--fold", "0",
                       "--run-name", run_name, "--overwrite", *extra, *folders_args())
    run_dir = WORK / "results" / name / CONFIG[name] / run_name / "fold_0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    return metrics, run, seconds


def rows_for(name, minutes, metrics, run, seconds, loss):
    device = f"cpu x{os.cpu_count()}"
    common = [name, loss or "default", f"{minutes:g}", f"{seconds / 60:.1f}", run["epochs_completed"],
              run["iterations"], device]
    if metrics["task_type"] == "classification":
        return [common + ["accuracy", fmt(metrics["accuracy"])],
                common + ["balanced accuracy", fmt(metrics["balanced_accuracy"])],
                common + ["macro F1", fmt(metrics["macro_avg"]["f1"])]]
    rows = []
    for label, values in metrics["mean"].items():
        label_name = metrics["labels"][label]
        for key in ("dice", "asd_mm", "hd95_mm"):
            rows.append(common + [f"{label_name} {key}", fmt(values.get(key))])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(BUDGETS))
    parser.add_argument("--loss", default="", help="comma-separated losses to compare (default: the plan's)")
    args = parser.parse_args()
    budgets = QUICK if args.quick else BUDGETS
    rows = []
    for name in args.only.split(","):
        for loss in (args.loss.split(",") if args.loss else [None]):
            metrics, run, seconds = run_one(name, budgets[name], loss)
            rows += rows_for(name, budgets[name], metrics, run, seconds, loss)
    print(f"\nautoplan accuracy, fold 0 validation ({platform.processor() or platform.machine()})\n")
    print(markdown_table(["dataset", "loss", "budget min", "wall min", "epochs", "iterations", "device",
                          "metric", "value"], rows))


if __name__ == "__main__":
    main()
