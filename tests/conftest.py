"""Shared test fixtures: where the real datasets are, and small thread counts."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_dataset(name: str) -> Path:
    """The shared real dataset folder, or skip the test with a clear message."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {path} (see ../shared/datasets/README.md)")
    return path


@pytest.fixture
def folders(tmp_path):
    from autoplan.paths import resolve_folders

    return resolve_folders(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")


def jsrt_subset(tmp_path: Path, n: int = 40) -> tuple:
    """(images, masks) folders linking the first ``n`` JSRT images and masks (skips without the data)."""
    root = shared_dataset("jsrt_lungs")
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for path in sorted((root / "images").glob("*.png"))[:n]:
        (images / path.name).symlink_to(path)
        (masks / path.name).symlink_to(root / "masks" / path.name)
    return images, masks


def write_png_pairs(folder: Path, n: int = 6, size: int = 32) -> tuple:
    """(images, masks) folders of ``n`` random grey PNGs ``c0.png``... with one square label
    (grey 255) each, shifted a pixel per case: the smallest segmentation dataset to import."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"c{i}.png")
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:size * 5 // 8, size // 4 + i:size * 5 // 8 + i] = 255
        Image.fromarray(mask).save(masks / f"c{i}.png")
    return images, masks


@pytest.fixture(scope="session")
def jsrt_trained(tmp_path_factory) -> dict:
    """40 real chest X-rays (both lungs one label, and the heart), planned and trained for
    90 s of CPU once per session: the training test checks the run, the robustness test
    predicts with it. Adam converges faster than the nnU-Net defaults in so short a run;
    the default augmentation (zoom, shift) is what the robustness test's variants need."""
    from autoplan import pipeline
    from autoplan.datasets import import_dataset
    from autoplan.paths import resolve_folders
    from autoplan.runs import TrainOptions

    root = tmp_path_factory.mktemp("jsrt_trained")
    images, masks = jsrt_subset(root, 40)
    folders = resolve_folders(root / "raw", root / "pre", root / "results")
    dataset = import_dataset("TaskXRay", images, folders.raw, masks_dir=masks,
                             label_map="150=lung,200=lung,250=heart", quiet=True)
    pipeline.plan(dataset, folders, time_budget_minutes=1.5)
    runs = pipeline.train(dataset, folders, TrainOptions(time_budget_minutes=1.5, device="cpu",
                                                         optimizer="adam", augment="default"))
    return {"dataset": dataset, "folders": folders, "run_dir": Path(runs[0].run_dir)}


@pytest.fixture(scope="session")
def ham10000_imported(tmp_path_factory) -> dict:
    """The full shared HAM10000 imported once per session (25-45 s on 2 cores), with its import time:
    the import-time test checks that time, the golden-plan test plans the dataset."""
    import time

    from autoplan.datasets import import_dataset

    root = shared_dataset("ham10000")
    raw = tmp_path_factory.mktemp("ham10000_raw")
    started = time.perf_counter()
    dataset = import_dataset("TaskDerm", root / "images", raw, labels_csv=root / "HAM10000_metadata.csv",
                             id_column="image_id", label_column="dx", group_column="lesion_id",
                             n_jobs=min(2, os.cpu_count() or 1), quiet=True)
    return {"dataset": dataset, "seconds": time.perf_counter() - started}
