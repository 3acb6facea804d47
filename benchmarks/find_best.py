"""find-best on real volumes: does the choice made on out-of-fold predictions hold on cases
it never saw?

MSD hippocampus is split once by case name: every fifth case is an untouched test set, the
rest is the dataset ``plan-and-train --find-best --time-budget MINUTES`` trains 2d and
3d_fullres on (the budget split across configurations and folds) and find-best chooses
from. Every candidate find-best scored (each run and the pair) then predicts the test set
with its own post-processing. Prints one table: out-of-fold score, test Dice per label,
which one was chosen.

    AUTOPLAN_BENCH_DIR=/work/bench python benchmarks/find_best.py --time-budget 20
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import SHARED, WORK, autoplan, folders_args, fmt, markdown_table  # noqa: E402

NAME, TEST = "TaskHippocampusFB", "TaskHippocampusFBTest"


def _split_sources(work: Path) -> dict:
    """{dataset name: (images, masks)} folders of links: every fifth case is the test set."""
    source = SHARED / "hippocampus"
    names = sorted(p.name for p in (source / "imagesTr").glob("*.nii.gz"))
    folders = {}
    for dataset, chosen in ((NAME, [n for i, n in enumerate(names) if i % 5]),
                            (TEST, [n for i, n in enumerate(names) if i % 5 == 0])):
        images, masks = work / "sources" / dataset / "images", work / "sources" / dataset / "masks"
        for folder in (images, masks):
            folder.mkdir(parents=True, exist_ok=True)
        for name in chosen:
            for folder, kind in ((images, "imagesTr"), (masks, "labelsTr")):
                if not (folder / name).exists():
                    (folder / name).symlink_to(source / kind / name)
        folders[dataset] = (images, masks)
    return folders


def _test_dice(candidate, results: Path, test_dataset) -> list:
    """Mean Dice per foreground label of ``candidate`` (a CandidateScore) on the test cases."""
    from autoplan.evaluation import dice, nanmean
    from autoplan.inference.models import load_ensemble
    from autoplan.inference.predictor import Predictor
    from autoplan.io import read_case_images, read_case_labels

    predictor = Predictor([load_ensemble(m.folder(results)) for m in candidate.members], tta=True,
                          postprocessing=candidate.postprocessing)
    label_ids = sorted(int(v) for v in test_dataset.labels.values())
    scores = {label: [] for label in label_ids if label}
    for case in test_dataset.cases:
        image = read_case_images(case)
        labels, _ = predictor.segment(image, case.id)
        reference = read_case_labels(case, image, label_ids)
        for label in scores:
            scores[label].append(dice(labels == label, reference == label))
    return [nanmean(values) for values in scores.values()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-budget", type=float, default=20.0, help="minutes for plan-and-train --find-best")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"real datasets not found at {SHARED}: see ../shared/datasets/README.md")
    from autoplan.artifacts import BestChoice
    from autoplan.datasets import load_dataset

    for dataset, (images, masks) in _split_sources(WORK).items():
        if not (WORK / "raw" / dataset / "dataset.json").is_file():
            autoplan("import", dataset, "--images", images, "--masks", masks, "--label-map", "1=anterior,2=posterior",
                     "--raw", WORK / "raw")
    seconds = autoplan("plan-and-train", NAME, "--find-best", "--time-budget", args.time_budget, "--device", "cpu",
                       *folders_args())
    results = WORK / "results" / NAME
    choice = BestChoice.load(results / "best.json")
    test_dataset = load_dataset(WORK / "raw" / TEST)
    rows = []
    for candidate in choice.candidates:
        test = _test_dice(candidate, results, test_dataset)
        rows.append([candidate.label + (" (chosen)" if candidate.label == choice.chosen.label else ""),
                     fmt(candidate.score), fmt(candidate.score_postprocessed), *map(fmt, test),
                     fmt(float(np.mean(test)))])
    print(f"\nplan-and-train --find-best --time-budget {args.time_budget:g}: {seconds / 60:.1f} min wall; "
          f"out-of-fold: {choice.n_cases} cases of folds {choice.folds}; test: {len(test_dataset.cases)} cases\n")
    print(markdown_table(["candidate", "out-of-fold Dice", "out-of-fold, post-processed", "test anterior",
                          "test posterior", "test mean"], rows))


if __name__ == "__main__":
    main()
