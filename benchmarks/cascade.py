"""The cascade against 3d_fullres alone, on synthetic CT-like volumes, at the same CPU time budget.

Prints one table: per configuration the budget, the runs it bought, the wall time, and Dice per
label (liver, kidney, spleen) and their mean on held-out synthetic cases that no run trained or
chose on. Rows:

- ``3d_cascade_fullres``: ``plan-and-train --config 3d_cascade_fullres --time-budget B``
  (``pipeline.plan_and_train``): 3d_lowres on all five folds (their out-of-fold predictions are
  the cascade's training input), then the cascade on fold 0; the budget shared equally by the six
  runs. Held-out cases go through ``inference.cascade.with_previous_stage`` (the five lowres folds
  ensembled, then the cascade's fold).
- ``3d_lowres (5 folds)``: the cascade's first stage alone, on the same cases (no extra cost).
- ``3d_fullres``: ``plan-and-train --config 3d_fullres --time-budget B`` on fold 0 alone.

The volumes are small enough for a CPU (default 32 x 96 x 96 at 2.5 x 0.8 x 0.8 mm), where
nnU-Net's rule (the 8 GB GPU patch covers under a quarter of the image) plans no 3d_lowres, so the
plan is made with ``lowres="always"`` (a lowres stage at twice the spacing). Test-time mirroring is
off unless ``--tta``. Each configuration gets its own results folder.

    .venv/bin/python benchmarks/cascade.py [--budget 20] [--cases 10] [--held-out 4]
        [--shape 32 96 96] [--spacing 2.5 0.8 0.8] [--work /tmp/autoplan_cascade_bench] [--tta]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoplan import pipeline  # noqa: E402
from autoplan.datasets import load_dataset  # noqa: E402
from autoplan.evaluation import dice  # noqa: E402
from autoplan.inference.cascade import append_previous_stage, previous_stage_labels  # noqa: E402
from autoplan.inference.models import load_ensemble  # noqa: E402
from autoplan.inference.segmentation import (apply_postprocessing, predict_case_probabilities,  # noqa: E402
                                             probabilities_to_labels)
from autoplan.io import read_case_images, read_case_labels  # noqa: E402
from autoplan.paths import resolve_folders  # noqa: E402
from autoplan.runs import TrainOptions  # noqa: E402
from benchmarks.common import fmt, markdown_table  # noqa: E402
from benchmarks.synthetic_ct import CT_LABELS, write_ct_dataset  # noqa: E402

NAME = "SyntheticCTCascade"
HELD_OUT_SEED = 1000        # the held-out cases' generator seeds start here (training: 0 ..)
LABELS = {name: value for name, value in CT_LABELS.items() if value}


def train(configuration: str, budget: float, work: Path, raw: Path) -> tuple:
    """(the runs, wall seconds) of plan-and-train for ``configuration`` in its own results folder."""
    folders = resolve_folders(raw, work / configuration / "preprocessed", work / configuration / "results")
    dataset = load_dataset(folders.dataset_raw(NAME))
    options = TrainOptions(configuration=configuration, fold="0", time_budget_minutes=budget, device="cpu",
                           run_name="bench", overwrite=True)
    started = time.monotonic()
    runs = pipeline.plan_and_train(dataset, folders, options, device="cpu", lowres="always")
    return runs, time.monotonic() - started


def scores(predict, cases, label_ids) -> dict:
    """{label name: mean Dice over ``cases``} of ``predict(image) -> label map``, and 'mean'."""
    per_label = {name: [] for name in LABELS}
    for case in cases:
        image = read_case_images(case)
        reference = read_case_labels(case, image, label_ids)
        prediction = predict(image)
        for name, value in LABELS.items():
            per_label[name].append(dice(prediction == value, reference == value))
    result = {name: float(np.nanmean(values)) for name, values in per_label.items()}
    result["mean"] = float(np.mean(list(result.values())))
    return result


def fullres_predictor(run_dir: Path, tta: bool):
    ensemble = load_ensemble(run_dir)

    def predict(image):
        probabilities, _ = predict_case_probabilities(ensemble.networks, ensemble.spec, image, tta)
        return apply_postprocessing(probabilities_to_labels(probabilities, ensemble.spec),
                                    ensemble.spec.postprocessing)
    return predict


def cascade_predictors(run_dir: Path, tta: bool) -> tuple:
    """(lowres alone, the cascade): the cascade's prediction reuses the lowres labels of the same image."""
    ensemble = load_ensemble(run_dir)
    previous = ensemble.previous
    memo = {}

    def lowres(image):
        key = str(image.path)
        if key not in memo:
            memo[key] = previous_stage_labels(image, previous, tta)
        return memo[key]

    def lowres_postprocessed(image):
        return apply_postprocessing(lowres(image), previous.spec.postprocessing)

    def cascade(image):
        stacked = append_previous_stage(image, lowres(image), ensemble.spec.configuration)
        probabilities, _ = predict_case_probabilities(ensemble.networks, ensemble.spec, stacked, tta)
        return apply_postprocessing(probabilities_to_labels(probabilities, ensemble.spec),
                                    ensemble.spec.postprocessing)
    return lowres_postprocessed, cascade


def main() -> None:
    """Long because it generates the data, trains both ways and scores three predictors in turn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=20.0, help="minutes for each of the two ways")
    parser.add_argument("--cases", type=int, default=10, help="training cases (five folds)")
    parser.add_argument("--held-out", type=int, default=4, help="cases only scored")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 96, 96])
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8])
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoplan_cascade_bench"))
    parser.add_argument("--tta", action="store_true", help="test-time mirroring (off: shorter)")
    args = parser.parse_args()
    raw = args.work / "raw"
    write_ct_dataset(raw / NAME, n_cases=args.cases, shape=tuple(args.shape), spacing=tuple(args.spacing), name=NAME)
    held_out = load_dataset(write_ct_dataset(raw / f"{NAME}HeldOut", n_cases=args.held_out, shape=tuple(args.shape),
                                             spacing=tuple(args.spacing), seed=HELD_OUT_SEED, name=f"{NAME}HeldOut"))
    label_ids = sorted(CT_LABELS.values())
    rows = []
    cascade_runs, cascade_seconds = train("3d_cascade_fullres", args.budget, args.work, raw)
    fullres_runs, fullres_seconds = train("3d_fullres", args.budget, args.work, raw)
    cascade_dir = Path(cascade_runs[-1].run_dir).parent
    lowres_predict, cascade_predict = cascade_predictors(cascade_dir, args.tta)
    iterations = {run.configuration: [] for run in cascade_runs + fullres_runs}
    for run in cascade_runs + fullres_runs:
        iterations[run.configuration].append(run.iterations)
    # the cascade first: its lowres labels are memoised per image, so lowres alone comes free after it
    cascade_scores = scores(cascade_predict, held_out.cases, label_ids)
    lowres_scores = scores(lowres_predict, held_out.cases, label_ids)
    fullres_scores = scores(fullres_predictor(Path(fullres_runs[0].run_dir).parent, args.tta), held_out.cases,
                            label_ids)
    share = args.budget / len(cascade_runs)
    rows.append(["3d_cascade_fullres (fold 0)", f"{args.budget:g}", f"5 lowres + 1 cascade runs of {share:.2f} min; "
                 f"iterations {iterations['3d_lowres']} + {iterations['3d_cascade_fullres']}",
                 f"{cascade_seconds / 60:.1f}", *[fmt(cascade_scores[k]) for k in [*LABELS, 'mean']]])
    rows.append(["3d_lowres alone (5 folds)", "(the cascade's)", "its first stage", "",
                 *[fmt(lowres_scores[k]) for k in [*LABELS, 'mean']]])
    rows.append(["3d_fullres (fold 0)", f"{args.budget:g}", f"1 run; iterations {iterations['3d_fullres']}",
                 f"{fullres_seconds / 60:.1f}", *[fmt(fullres_scores[k]) for k in [*LABELS, 'mean']]])
    print(f"\n{args.cases} training cases, {args.held_out} held-out cases, {'x'.join(map(str, args.shape))} voxels "
          f"at {args.spacing} mm, TTA {'on' if args.tta else 'off'}; Dice on the held-out cases\n")
    print(markdown_table(["configuration", "budget (min)", "runs", "wall (min)", *LABELS, "mean Dice"], rows))


if __name__ == "__main__":
    main()
