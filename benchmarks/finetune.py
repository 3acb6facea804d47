"""Fine-tuning a JSRT model to another site, against training from scratch for the same time.

The "other site" is JSRT images the source model never trained on (its fold's validation
cases), each turned into what another hospital sends (autoplan.robustness: gamma 1.6, then
the off-centre crop). The first ``--n-train`` of them form the new dataset, the rest are the
untouched test set. Three models are scored on the test set (``autoplan evaluate``):
the source as it is, the source fine-tuned (``--init-from``, ``--epochs``), and the same
network trained from scratch for as many epochs and iterations (the same training time).
Prints one table.

    AUTOPLAN_BENCH_DIR=/work/bench python benchmarks/finetune.py --model RESULTS/TaskXRay/2d/RUN/fold_0
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JSRT = ROOT.parent / "shared" / "datasets" / "jsrt_lungs"
LABEL_MAP = "150=right_lung,200=left_lung,250=heart"

from autoplan.robustness import apply_gamma, crop_corner  # noqa: E402
from autoplan.runs import RunSpec  # noqa: E402


def _cli(*args, env) -> None:
    subprocess.run([sys.executable, "-m", "autoplan", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def other_site(names: list, folder: Path) -> None:
    """The images and masks of ``names`` as the other site sends them."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for name in names:
        pixels = np.asarray(Image.open(JSRT / "images" / f"{name}.png").convert("L"))
        mask = np.asarray(Image.open(JSRT / "masks" / f"{name}.png"))
        image, mask = crop_corner(apply_gamma(pixels, 1.6), mask, 0.8)
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"{name}.png")


def unseen_cases(model: Path) -> list:
    """The source fold's validation cases: images the source model never trained on."""
    spec = RunSpec.load(model / "plan.json")
    splits = json.loads((model.parents[2] / "splits.json").read_text())
    return sorted(splits[spec.fold]["val"])


def train_and_evaluate(name: str, run: str, extra: list, env, work: Path) -> dict:
    _cli("train", "SiteB", "--run-name", run, "--fold", "0", "--device", "cpu", *extra, env=env)
    fold = work / "results" / "SiteB" / "2d" / run / "fold_0"
    _cli("evaluate", "--model", str(fold), "--dataset", "SiteBTest", "--output", str(work / f"eval_{run}"), env=env)
    metrics = json.loads((work / f"eval_{run}" / "metrics.json").read_text())
    return {"run": json.loads((fold / "run.json").read_text()), "metrics": metrics}


def dice_row(metrics: dict) -> str:
    mean = metrics["mean"]
    return " / ".join(f"{mean[k]['dice']:.3f}" for k in sorted(mean, key=int))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the source JSRT fold_K folder")
    parser.add_argument("--n-train", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not JSRT.is_dir():
        sys.exit(f"JSRT not found at {JSRT} (see ../shared/datasets/README.md)")
    work = Path(tempfile.mkdtemp(prefix="finetune-", dir=os.environ.get("AUTOPLAN_BENCH_DIR")))
    env = dict(os.environ, AUTOPLAN_RAW=str(work / "raw"), AUTOPLAN_PREPROCESSED=str(work / "pre"),
               AUTOPLAN_RESULTS=str(work / "results"))
    cases = unseen_cases(args.model)
    other_site(cases[:args.n_train], work / "train_source")
    other_site(cases[args.n_train:], work / "test_source")
    for name, source in (("SiteB", "train_source"), ("SiteBTest", "test_source")):
        _cli("import", name, "--images", str(work / source / "images"), "--masks", str(work / source / "masks"),
             "--label-map", LABEL_MAP, env=env)
    _cli("plan", "SiteB", "--device", "cpu", "--plan-from", str(args.model), env=env)
    _cli("evaluate", "--model", str(args.model), "--dataset", "SiteBTest", "--output", str(work / "eval_source"),
         env=env)
    source = json.loads((work / "eval_source" / "metrics.json").read_text())
    tuned = train_and_evaluate("SiteB", "finetuned", ["--init-from", str(args.model), "--epochs", str(args.epochs)],
                               env, work)
    # the same network, epochs and iterations from a fresh initialisation: the same training time
    scratch = train_and_evaluate("SiteB", "scratch", ["--epochs", str(args.epochs)], env, work)
    n_test = len(cases) - args.n_train
    print(f"| model ({n_test} unseen other-site test images) | training | Dice right lung / left lung / heart |")
    print("|---|---|---|")
    print(f"| source as it is | none | {dice_row(source)} |")
    for label, result in (("fine-tuned from the source", tuned), ("same network from scratch", scratch)):
        run = result["run"]
        print(f"| {label} | {run['epochs_completed']} epochs, {run['iterations']} its, {run['train_seconds']:.0f} s "
              f"| {dice_row(result['metrics'])} |")


if __name__ == "__main__":
    main()
