"""Classification images resized once into ``PRE/NAME/classifier/images.npy`` (uint8,
N x H x W x C) plus ``index.json``, and the channel conversion that training, prediction and
the quality checks share."""

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from autoplan.errors import InputError
from autoplan.io import read_case_images
from autoplan.jsonio import JsonDataclass, read_json, write_json
from autoplan.parallel import parallel_map
from autoplan.preprocessing.cache import preprocessing_stamp

CLASSIFICATION_CHUNK = 512
# ITU-R 601 luma: grey from RGB, as PIL's "L" (also the colour jitter's grey, autoplan/augmentation.py).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def load_classification_image(image, configuration) -> np.ndarray:
    """uint8 (H, W, C) resized (bilinear, antialiased) to the configuration's input size."""
    height, width = [int(n) for n in configuration.patch_size]
    channels = int(configuration.n_input_channels)
    pixels = np.asarray(image.array)
    if pixels.ndim != 3:
        raise InputError(image.path, f"expected a 2D image, got {pixels.ndim - 1}D")
    pixels = convert_channels(_to_uint8(pixels), channels)
    if pixels.shape[0] != channels:
        raise InputError(image.path, f"image has {pixels.shape[0]} channels; the plan expects {channels}")
    resized = [np.asarray(Image.fromarray(c).resize((width, height), Image.BILINEAR)) for c in pixels]
    return np.stack(resized, axis=-1)


def convert_channels(pixels, n_channels: int):
    """Channel-first pixels as ``n_channels``: grey repeated to RGB, or RGB to grey (PIL's "L",
    ITU-R 601 luma; the same weights for deeper than 8 bits). Other counts are returned as
    they are (the caller refuses them)."""
    pixels = np.asarray(pixels)
    if pixels.shape[0] == 1 and n_channels == 3:
        return np.repeat(pixels, 3, axis=0)
    if pixels.shape[0] != 3 or n_channels != 1:
        return pixels
    if pixels.dtype == np.uint8:
        return np.asarray(Image.fromarray(np.moveaxis(pixels, 0, -1)).convert("L"))[None]
    luma = np.tensordot(np.asarray(LUMA_WEIGHTS), pixels.astype(np.float64), axes=1)
    return np.round(luma).astype(pixels.dtype)[None]


def _to_uint8(pixels):
    """8-bit images pass; deeper ones are stretched min..max to 0..255."""
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / max(high - low, 1e-8) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


@dataclass
class ClassificationIndex(JsonDataclass):
    cases: list
    labels: list                       # class index per case
    groups: list
    classes: list
    shape: list = field(default_factory=list)   # of images.npy
    stamp: str = ""


def preprocess_classification(dataset, configuration, out_dir, n_jobs=None) -> Path:
    """images.npy uint8 (N, H, W, C) + index.json, rebuilt only when inputs or plan changed."""
    out_dir = Path(out_dir)
    classes = list(dataset.classes or sorted({c.class_name for c in dataset.cases}))
    sources = [path for case in dataset.cases for path in case.images]
    stamp = preprocessing_stamp(configuration, sources)
    index_path, images_path = out_dir / "index.json", out_dir / "images.npy"
    if index_path.is_file() and images_path.is_file():
        try:
            if read_json(index_path).get("stamp") == stamp:
                return out_dir
        except (OSError, ValueError):
            pass
    labels = []
    for case in dataset.cases:
        if case.class_name not in classes:
            raise InputError(dataset.root / "dataset.json",
                             f"case {case.id!r} has class {case.class_name!r}, not in {classes}")
        labels.append(classes.index(case.class_name))
    height, width = [int(n) for n in configuration.patch_size]
    shape = (len(dataset.cases), height, width, int(configuration.n_input_channels))
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)
    temporary = out_dir / f".images.{os.getpid()}.npy"
    try:
        images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
        worker = functools.partial(_classification_pixels, configuration=configuration)
        # Chunks bound the memory held by results in flight (HAM10000 at 224 px is 1.3 GB).
        for start in range(0, len(dataset.cases), CLASSIFICATION_CHUNK):
            chunk = dataset.cases[start:start + CLASSIFICATION_CHUNK]
            pixels = parallel_map(worker, chunk, n_jobs=n_jobs,
                                  desc=f"resize {start + len(chunk)}/{len(dataset.cases)}")
            images[start:start + len(chunk)] = np.stack(pixels)
        images.flush()
        del images
        os.replace(temporary, images_path)
    finally:
        temporary.unlink(missing_ok=True)
    write_json(out_dir / "configuration.json", configuration)
    ClassificationIndex(
        cases=[c.id for c in dataset.cases], labels=labels, groups=[c.group for c in dataset.cases],
        classes=classes, shape=list(shape), stamp=stamp,
    ).save(index_path)
    return out_dir


def _classification_pixels(case, configuration):
    return load_classification_image(read_case_images(case), configuration)
