"""Built-in synthetic datasets and the whole pipeline run on them (``autoplan demo``).

Two small datasets, generated deterministically, in their publishers' layouts so the
demo also exercises ``import``:
- ``DemoXRay``: chest-X-ray-like 2D phantoms (grey PNG) with lung and heart masks
  (mask grey values 128 = lung, 255 = heart, mapped by ``--label-map``);
- ``DemoDerm``: a 3-class RGB classification set (JPEG + CSV, two images per "patient").
"""

import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image

from autoplan import pipeline
from autoplan.datasets import import_dataset
from autoplan.fingerprint import format_fingerprint_summary
from autoplan.inference import predict_folder
from autoplan.paths import Folders, fingerprint_file
from autoplan.runs import TrainOptions

XRAY_SIZE = 128
DERM_SIZE = 64
DERM_CLASSES = ("blob", "ring", "speckle")


def _ellipse(shape, centre, radii, angle=0.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    return ((c * x + s * y) / radii[1]) ** 2 + ((-s * x + c * y) / radii[0]) ** 2 <= 1.0


def xray_phantom(rng: np.random.Generator, size=XRAY_SIZE):
    """(image uint8, mask uint8 with 0 / 128 lung / 255 heart)."""
    n = size
    scale = rng.uniform(0.9, 1.1)
    body = _ellipse((n, n), (n * 0.52, n * 0.5), (n * 0.46 * scale, n * 0.42 * scale))
    left = _ellipse((n, n), (n * 0.47, n * 0.32), (n * 0.27 * scale, n * 0.12 * scale), rng.uniform(-0.15, 0.05))
    right = _ellipse((n, n), (n * 0.47, n * 0.68), (n * 0.27 * scale, n * 0.12 * scale), rng.uniform(-0.05, 0.15))
    heart = _ellipse((n, n), (n * 0.62, n * rng.uniform(0.52, 0.58)), (n * 0.13, n * 0.15), rng.uniform(-0.4, 0.4))
    yy = np.arange(n, dtype=np.float32)[:, None]
    ribs = 0.5 + 0.5 * np.sin(yy / n * 2 * np.pi * rng.uniform(7, 9) + rng.uniform(0, 6.28))
    image = np.full((n, n), 20.0)
    image[body] = 170
    lungs = left | right
    image[lungs] = 70 + 35 * ribs[np.nonzero(lungs)[0], 0]
    image[heart] = 185
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15)
    image += rng.normal(0, 12, image.shape)
    mask = np.zeros((n, n), np.uint8)
    mask[lungs] = 128
    mask[heart] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def derm_image(rng: np.random.Generator, class_index: int, size=DERM_SIZE):
    n = size
    skin = np.array([200, 160, 140]) * rng.uniform(0.85, 1.1)
    image = np.ones((n, n, 3)) * skin + rng.normal(0, 8, (n, n, 3))
    centre = (n / 2 + rng.uniform(-8, 8), n / 2 + rng.uniform(-8, 8))
    radius = rng.uniform(0.2, 0.33) * n
    lesion = _ellipse((n, n), centre, (radius, radius * rng.uniform(0.7, 1.0)), rng.uniform(0, 3.14))
    colour = np.array([110, 60, 40]) * rng.uniform(0.8, 1.2)
    if class_index == 0:       # uniform dark blob
        image[lesion] = colour
    elif class_index == 1:     # ring: dark rim, pale centre
        inner = _ellipse((n, n), centre, (radius * 0.55, radius * 0.5))
        image[lesion & ~inner] = colour
        image[inner] = colour * 1.6
    else:                      # speckled lesion
        dots = rng.random((n, n)) < 0.35
        image[lesion & dots] = colour * 0.6
        image[lesion & ~dots] = colour * 1.3
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_demo_sources(folder: Path, n_xray=40, n_derm_per_class=40, seed=0) -> dict:
    """Publisher-style folders: xray/images, xray/masks, derm/images + derm/labels.csv, new images."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    for sub in ("xray/images", "xray/masks", "xray_new", "derm/images", "derm_new"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_xray):
        image, mask = xray_phantom(rng)
        Image.fromarray(image).save(folder / f"xray/images/chest_{i:03d}.png")
        Image.fromarray(mask).save(folder / f"xray/masks/chest_{i:03d}.png")
    for i in range(3):
        Image.fromarray(xray_phantom(rng)[0]).save(folder / f"xray_new/new_chest_{i}.png")
    rows = []
    for c, name in enumerate(DERM_CLASSES):
        for i in range(n_derm_per_class):
            case = f"lesion_{name}_{i:03d}"
            Image.fromarray(derm_image(rng, c)).save(folder / f"derm/images/{case}.jpg", quality=95)
            rows.append({"image_id": case, "dx": name, "patient": f"patient_{name}_{i // 2:03d}"})
    with open(folder / "derm/labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_id", "dx", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    for c in range(len(DERM_CLASSES)):
        Image.fromarray(derm_image(rng, c)).save(folder / f"derm_new/new_lesion_{c}.jpg", quality=95)
    return {"xray_images": folder / "xray/images", "xray_masks": folder / "xray/masks",
            "xray_new": folder / "xray_new", "derm_images": folder / "derm/images",
            "derm_labels": folder / "derm/labels.csv", "derm_new": folder / "derm_new"}


def _show(*command) -> None:
    """Print the command line that does the next step, so the demo teaches the commands."""
    print(f"\n$ autoplan {' '.join(str(part) for part in command)}")


def _import_demo_datasets(sources: dict, folders: Folders) -> dict:
    _show("import", "DemoXRay", "--images", sources["xray_images"], "--masks", sources["xray_masks"],
          "--label-map", "128=lung,255=heart", "--overwrite", "--raw", folders.raw)
    xray = import_dataset("DemoXRay", sources["xray_images"], folders.raw, masks_dir=sources["xray_masks"],
                          label_map="128=lung,255=heart", overwrite=True)
    print(pipeline.describe_import(xray))
    _show("import", "DemoDerm", "--images", sources["derm_images"], "--labels", sources["derm_labels"],
          "--id-column", "image_id", "--label-column", "dx", "--group-column", "patient", "--overwrite",
          "--raw", folders.raw)
    derm = import_dataset("DemoDerm", sources["derm_images"], folders.raw, labels_csv=sources["derm_labels"],
                          id_column="image_id", label_column="dx", group_column="patient", overwrite=True)
    print(pipeline.describe_import(derm))
    return {"xray": xray, "derm": derm}


def _plan_and_train_demo(dataset, folders: Folders, time_budget_minutes: float) -> Path:
    """plan-and-train with the demo's run name; returns the fold folder."""
    _show("plan-and-train", dataset.name, "--time-budget", time_budget_minutes, "--run-name", "demo",
          "--overwrite", "--raw", folders.raw, "--results", folders.results,
          "--preprocessed", folders.preprocessed)
    options = TrainOptions(time_budget_minutes=time_budget_minutes, run_name="demo", overwrite=True)
    runs = pipeline.plan_and_train(dataset, folders, options)
    print(pipeline.describe_runs(runs))
    return Path(runs[0].run_dir)


def run_demo(workdir: Path, time_budget_minutes: float = 1.0) -> dict:
    """Import → fingerprint → plan → preprocess → train → validate/report → predict, for both demos."""
    workdir = Path(workdir).resolve()
    started = time.monotonic()
    sources = write_demo_sources(workdir / "sources")
    folders = Folders(raw=workdir / "raw", preprocessed=workdir / "preprocessed", results=workdir / "results")
    datasets = _import_demo_datasets(sources, folders)
    _show("fingerprint", "DemoXRay", "--raw", folders.raw, "--results", folders.results)
    print(format_fingerprint_summary(pipeline.fingerprint(datasets["xray"], folders)))
    print(f"wrote {fingerprint_file(folders.results, 'DemoXRay')}")
    xray_run = _plan_and_train_demo(datasets["xray"], folders, time_budget_minutes)
    derm_run = _plan_and_train_demo(datasets["derm"], folders, time_budget_minutes)
    for model, new, out in ((xray_run, sources["xray_new"], workdir / "predictions/xray"),
                            (derm_run, sources["derm_new"], workdir / "predictions/derm")):
        _show("predict", "--model", model, "--input", new, "--output", out)
        print(pipeline.describe_prediction(predict_folder(model, new, out), out))
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"reports: {xray_run / 'report.html'}\n         {derm_run / 'report.html'}")
    return {"xray_run": xray_run, "derm_run": derm_run, "workdir": workdir}
