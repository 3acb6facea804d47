"""Dice of a trained 2D segmentation model on images from "other sources", built from its own
validation fold (autoplan.robustness: upscaled, gamma, burned-in text, crops, noise). Prints one table.

    python benchmarks/robustness.py --model WORK/results/TaskXRay/2d/RUN/fold_0
    python benchmarks/robustness.py --model RUN/fold_0 --cases 10 --no-tta

Each variant is written as PNG files into a folder and predicted with ``autoplan predict``'s
own function (reading, preprocessing, sliding window, resampling back, writing), so the
seconds per case are what a user gets; Dice is computed per label against the variant's mask,
averaged over the cases, and compared with the original images.
"""

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, fmt, markdown_table  # noqa: E402

from autoplan.datasets import load_dataset  # noqa: E402
from autoplan.inference import predict_folder  # noqa: E402
from autoplan.io import read_image  # noqa: E402
from autoplan.jsonio import read_json  # noqa: E402
from autoplan.robustness import make_variants, variant_names  # noqa: E402
from autoplan.runs import RunSpec  # noqa: E402


def validation_cases(model: Path, spec: RunSpec, raw: Path) -> list:
    """(case id, image path, mask path) of the run's validation fold."""
    dataset = load_dataset(raw / spec.dataset)
    splits = read_json(model.parents[2] / "splits.json")     # RESULTS/NAME/CFG/RUN/fold_K
    return [(c, dataset.case(c).images[0], dataset.case(c).label) for c in splits[spec.fold]["val"]]


def write_variants(cases: list, out: Path) -> None:
    """out/VARIANT/images/CASE.png and out/VARIANT/masks/CASE.png for every variant."""
    for case_id, image_path, mask_path in cases:
        pixels = read_image(image_path).array[0]
        mask = read_image(mask_path).array[0]
        for name, (image, labels) in make_variants(pixels.astype(np.uint8), mask).items():
            for kind, array in (("images", image), ("masks", labels)):
                folder = out / name / kind
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / f"{case_id}.png")


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, label_ids) -> dict:
    scores = {}
    for label in label_ids:
        predicted, wanted = prediction == label, reference == label
        total = int(predicted.sum()) + int(wanted.sum())
        scores[label] = 1.0 if total == 0 else 2.0 * int((predicted & wanted).sum()) / total
    return scores


def score_variant(model: Path, folder: Path, label_ids, tta: bool, n_jobs) -> tuple:
    """(mean Dice per label, seconds per case, image size) of one variant folder."""
    output = folder / "predictions"
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    summary = predict_folder(model, folder / "images", output, tta=tta, n_jobs=n_jobs)
    seconds = (time.perf_counter() - started) / max(1, summary["n_predicted"])
    scores = {label: [] for label in label_ids}
    sizes = set()
    for mask_path in sorted((folder / "masks").glob("*.png")):
        reference = np.asarray(Image.open(mask_path))
        prediction = np.asarray(Image.open(output / mask_path.name))
        sizes.add(reference.shape)
        for label, value in dice_per_label(prediction, reference, label_ids).items():
            scores[label].append(value)
    size = "x".join(map(str, sorted(sizes)[0])) + ("+" if len(sizes) > 1 else "")
    return {label: float(np.mean(values)) for label, values in scores.items()}, seconds, size, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, type=Path, help="a fold_K folder of a 2D segmentation run")
    parser.add_argument("--raw", type=Path, default=WORK / "raw", help="where the run's dataset was imported")
    parser.add_argument("--cases", type=int, default=0, help="first N validation cases (0: all)")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--n-jobs", type=int, default=None, help="torch threads")
    parser.add_argument("--work", type=Path, default=None, help="where variant folders go")
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all; original first)")
    args = parser.parse_args()

    spec = RunSpec.load(args.model / "plan.json")
    cases = validation_cases(args.model, spec, args.raw)
    cases = cases[: args.cases] if args.cases else cases
    work = args.work or WORK / "robustness" / f"{spec.dataset}-fold{spec.fold}-{len(cases)}"
    if not (work / "noise" / "masks").is_dir():
        write_variants(cases, work)
    label_ids = sorted(v for v in spec.labels.values() if v != 0)
    names = {v: k for k, v in spec.labels.items()}
    rows, baseline = [], None
    chosen = ["original"] + [v for v in args.variants.split(",") if v and v != "original"] if args.variants \
        else variant_names()
    for variant in chosen:
        scores, seconds, size, summary = score_variant(args.model, work / variant, label_ids,
                                                        not args.no_tta, args.n_jobs)
        baseline = baseline or scores
        worst = min(scores[label] - baseline[label] for label in label_ids)
        rows.append([variant, size, *(fmt(scores[label]) for label in label_ids),
                     fmt(float(np.mean(list(scores.values())))), f"{worst:+.3f}", f"{seconds:.2f}",
                     summary.get("n_flagged", "n/a")])
    print(f"\nrobustness of {args.model} on {len(cases)} validation cases, TTA {'off' if args.no_tta else 'on'} "
          f"({platform.processor() or platform.machine()}, torch threads {args.n_jobs or 'default'})\n")
    print(markdown_table(["variant", "size", *(f"Dice {names[label]}" for label in label_ids), "mean",
                          "worst change", "s/case", "flagged"], rows))


if __name__ == "__main__":
    main()
