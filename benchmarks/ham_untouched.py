"""HAM10000 from scratch on the CPU, scored on an untouched test split (issue 28). Prints one table.

    AUTOPLAN_BENCH_DIR=/work/bench3 python benchmarks/ham_untouched.py --loss ce,ce_focal --time-budget 30

For each loss: `autoplan split` (15 % of the lesions, once, kept fixed), `plan-and-train --fold 0`
(skipped when the run exists: run it alone on the machine, it is a timed budget), `evaluate
--split test` with the plan's default decision rule, `calibrate` (the rule chosen on fold 0's
out-of-fold predictions, i.e. its validation images), `evaluate --split test` again. Rows:
fold 0's validation images (the rule was chosen on them after calibration: optimistic) and the
untouched test images, each with 95 % bootstrap intervals over lesions for the test rows.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, autoplan, ensure_imported, folders_args, markdown_table  # noqa: E402

NAME = "TaskDerm"


def _interval(ci: dict | None, key: str, cls: str | None = None) -> str:
    if not ci:
        return ""
    bounds = ci["recall"].get(cls) if cls else ci.get(key)
    return f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""


def _row(loss: str, split: str, rule: str, metrics: dict) -> list:
    ci = metrics.get("ci95")
    mel = metrics["per_class"]["mel"]["recall"] if "per_class" in metrics else metrics["recall_mel"]
    return [loss, split, rule, f"{metrics['accuracy']:.3f}{_interval(ci, 'accuracy')}",
            f"{metrics['balanced_accuracy']:.3f}{_interval(ci, 'balanced_accuracy')}",
            f"{mel:.3f}{_interval(ci, 'recall', 'mel')}"]


def _evaluate(model: Path, output: Path) -> dict:
    if not (output / "metrics.json").is_file():
        autoplan("evaluate", "--model", model, "--dataset", NAME, "--split", "test", "--output", output,
                 "--raw", WORK / "raw", "--results", WORK / "results")
    return json.loads((output / "metrics.json").read_text())


def train(loss: str, minutes: float, imbalance: str | None) -> str:
    """The run folder's name; trains it unless it is there already."""
    run = f"untouched-{minutes:g}min-{loss}" + (f"-{imbalance}" if imbalance else "")
    if not (WORK / "results" / NAME / "classifier" / run / "fold_0" / "metrics.json").is_file():
        autoplan("plan-and-train", NAME, "--time-budget", minutes, "--device", "cpu", "--fold", "0",
                 "--loss", loss, *(["--imbalance", imbalance] if imbalance else []), "--run-name", run,
                 "--overwrite", *folders_args())
    return run


def _plan_summary(run_dir: Path) -> str:
    spec = json.loads((run_dir / "fold_0" / "plan.json").read_text())
    run = json.loads((run_dir / "fold_0" / "run.json").read_text())
    size = "x".join(map(str, spec["configuration"]["patch_size"]))
    strategy = (spec["configuration"].get("imbalance") or {}).get("strategy", "none")
    leaning = {"weighted_loss": "", "logit_adjusted": " logit-adjusted"}.get(strategy, f" {strategy}")
    loss = spec['options'].get('loss') or spec['configuration']['loss']
    return f"{loss}{leaning}, {size}, {run['epochs_completed']} ep"


def _default_rule(run_dir: Path) -> str:
    """The planner's default rule for the run's strategy (calibrate rewrites plan.json's)."""
    from autoplan.planning.classification import DEFAULT_CORRECTIONS

    spec = json.loads((run_dir / "fold_0" / "plan.json").read_text())
    strategy = (spec["configuration"].get("imbalance") or {}).get("strategy")
    return f"plan default (correction {DEFAULT_CORRECTIONS.get(strategy, 0):g})"


def score_run(run: str) -> list:
    run_dir = WORK / "results" / NAME / "classifier" / run
    loss = _plan_summary(run_dir)
    fold0 = json.loads((run_dir / "fold_0" / "metrics.json").read_text())
    rule = _default_rule(run_dir)
    test_before = _evaluate(run_dir / "fold_0", run_dir / "test_default_rule")
    if not (run_dir / "calibration.json").is_file():
        autoplan("calibrate", NAME, "--run", run, *folders_args())
    calibration = json.loads((run_dir / "calibration.json").read_text())
    test_after = _evaluate(run_dir / "fold_0", run_dir / "test_calibrated")
    classes = calibration["classes"]
    fold0_after = {"accuracy": calibration["after"]["accuracy"],
                   "balanced_accuracy": calibration["after"]["balanced_accuracy"],
                   "recall_mel": calibration["after"]["recall"][classes.index("mel")]}
    cross_fitted = calibration["cross_fitted"][calibration["rule"]]
    chosen = (f"calibrated ({calibration['rule']}, c={calibration['posterior_correction']:g}; "
              f"cross-fitted {calibration['objective']} {cross_fitted:.3f})")
    return [_row(loss, "fold 0 validation", rule, fold0), _row(loss, "untouched test", rule, test_before),
            _row(loss, "fold 0 validation (rule fitted here)", chosen, fold0_after),
            _row(loss, "untouched test", chosen, test_after)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loss", default="ce,ce_focal")
    parser.add_argument("--time-budget", type=float, default=30.0)
    parser.add_argument("--imbalance", default=None, choices=["weighted_loss", "logit_adjusted"],
                        help="train --imbalance (default: the plan's)")
    parser.add_argument("--runs", default="", help="score these existing run folders instead of training per loss")
    args = parser.parse_args()
    ensure_imported(NAME)
    if not (WORK / "results" / NAME / "test_split.json").is_file():
        autoplan("split", NAME, "--test-fraction", 0.15, "--raw", WORK / "raw", "--results", WORK / "results")
    runs = args.runs.split(",") if args.runs else [train(loss, args.time_budget, args.imbalance)
                                                          for loss in args.loss.split(",")]
    rows = [row for run in runs for row in score_run(run)]
    print(f"\nHAM10000, {args.time_budget:g} min from scratch on the CPU, fold 0 vs the untouched test split\n")
    print(markdown_table(["run (loss, input, epochs)", "images", "decision rule", "accuracy", "balanced accuracy", "melanoma recall"],
                         rows))


if __name__ == "__main__":
    main()
