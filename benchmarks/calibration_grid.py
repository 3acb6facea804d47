"""calibrate's correction grid, out of sample: 0..1 against -3..1 on trained HAM10000 runs. Prints one table.

    AUTOPLAN_BENCH_DIR=/work/bench3 python benchmarks/calibration_grid.py --runs untouched-30min-ce-passes50,...

For each run: fold 0's validation images predicted by the fold-0 model (TTA, no decision rule),
halved by lesion 5 times (calibrate's own halvings); the correction is fitted on one half on each
grid and scored on the other, both ways, for the `mean` and `balanced_accuracy` objectives. The
paired gain of the wider grid, with its standard error, is what decided calibrate's grids
(autoplan/calibration.py, CORRECTION_GRIDS). The untouched test split is not read.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, markdown_table  # noqa: E402

from autoplan import calibration  # noqa: E402
from autoplan.datasets import load_dataset  # noqa: E402
from autoplan.jsonio import read_json  # noqa: E402
from autoplan.paths import resolve_folders, splits_file  # noqa: E402
from autoplan.runs import RunSpec  # noqa: E402

NAME = "TaskDerm"
GRIDS = {"0..1": calibration.CORRECTION_GRIDS["mean"], "-3..1": calibration.CORRECTION_GRIDS["balanced_accuracy"]}


def cross_fitted(log_p, y, log_w, groups, objective, grid) -> tuple:
    """(per-split scores of the correction fitted on the other half, correction fitted on all)."""
    saved = dict(calibration.CORRECTION_GRIDS)
    calibration.CORRECTION_GRIDS[objective] = grid
    try:
        per_split = calibration.cross_fitted_scores(log_p, y, log_w, groups, objective)["correction"]
        return np.asarray(per_split), calibration.fit_correction(log_p, y, log_w, objective)
    finally:
        calibration.CORRECTION_GRIDS.update(saved)


def run_rows(run: str, dataset, splits) -> list:
    folds = calibration.run_folds(WORK / "results" / NAME / "classifier" / run)
    spec = RunSpec.load(next(iter(folds.values())) / "plan.json")
    probabilities, y, cases = calibration.out_of_fold_probabilities(dataset, splits, folds, True, "cpu")
    log_p = np.log(np.clip(probabilities, 1e-12, None))
    log_w = calibration._training_log_weights(spec)
    groups = [dataset.case(case).group or case for case in cases]
    rows = []
    for objective in ("mean", "balanced_accuracy"):
        (narrow, c_narrow), (wide, c_wide) = (cross_fitted(log_p, y, log_w, groups, objective, grid)
                                              for grid in GRIDS.values())
        gain = wide - narrow
        rows.append([run, objective, f"{narrow.mean():.4f} (c={c_narrow:g})", f"{wide.mean():.4f} (c={c_wide:g})",
                     f"{gain.mean():+.4f} ({gain.std(ddof=1) / np.sqrt(len(gain)):.4f})"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", required=True, help="comma-separated run folders of RESULTS/TaskDerm/classifier")
    args = parser.parse_args()
    folders = resolve_folders(WORK / "raw", WORK / "preprocessed", WORK / "results")
    dataset = load_dataset(folders.dataset_raw(NAME))
    splits = read_json(splits_file(folders.results, NAME))
    rows = [row for run in args.runs.split(",") for row in run_rows(run, dataset, splits)]
    print(markdown_table(["run", "objective", "grid 0..1", "grid -3..1", "paired gain (SE)"], rows))


if __name__ == "__main__":
    main()
