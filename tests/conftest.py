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
