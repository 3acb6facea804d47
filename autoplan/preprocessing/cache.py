"""The preprocessed cache of a segmentation dataset, one configuration at a time::

    PRE/NAME/CFG/CASE.b2nd       float32 (C, [Z,] Y, X)  blosc2, lossless (Zstandard after byte shuffle)
    PRE/NAME/CFG/CASE_seg.b2nd   uint8   (1, [Z,] Y, X)  blosc2 (int16 when a label id exceeds 255)
    PRE/NAME/CFG/CASE.json       CaseProperties (written last; holds the cache stamp)

Both arrays are blosc2 NDArrays cut into chunks of at most the configuration's patch, so the
loader decompresses the region it samples, not the whole volume (:func:`open_case_arrays`).
A case whose three files exist with a matching stamp is not redone, so an interrupted run
resumes where it stopped. Version 1 stored ``CASE.npy`` (float32) and ``CASE_seg.npy``
(int16), 6x the disk on CT; such a case carries an older stamp, so it is redone and its
``.npy`` files are removed.

A cascade configuration (``previous_stage`` set) caches the image as its previous stage's
fullres grid does, and ``CASE_seg.b2nd`` gets a second channel: the previous stage's
out-of-fold label map (``CASE.npz`` files, :func:`save_label_map`) cropped and resampled as
the labels are. The loader turns it into one-hot channels after augmentation; the stamp
includes those files, so another previous-stage run redoes the cache.
"""

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from autoplan.io import read_case_images, read_case_labels
from dataclasses import replace

from autoplan.errors import InputError
from autoplan.jsonio import atomic_write_with, read_json, to_jsonable
from autoplan.parallel import parallel_map
from autoplan.preprocessing.case import field_of_view, preprocess_case
from autoplan.preprocessing.resampling import coarse_axis, resample_labels

# Bump when the cached arrays would change for the same inputs and configuration.
# 2: blosc2 files and uint8 masks instead of float32 / int16 .npy.
CACHE_VERSION = 2
IMAGE_SUFFIX, SEG_SUFFIX = ".b2nd", "_seg.b2nd"
LEGACY_SUFFIXES = (".npy", "_seg.npy")          # version 1, still readable by open_case_arrays
# Zstandard level 3 after byte shuffling: on six synthetic 120 x 320 x 320 CTs it compressed
# a case's 49 MB of float32 to 8.4 MB, as small as levels 1 and 5 (level 8, nnU-Net's, 10.0 MB)
# and 7x faster to write than level 8 (0.22 s against 1.5 s a case).
CODEC_LEVEL = 3
# A block is blosc2's unit of decompression inside a chunk: a patch's edge then decompresses
# little it does not need, while blocks stay large enough to compress well.
BLOCK_BYTES = 64 * 1024


def preprocessing_stamp(configuration, source_files) -> str:
    """Hash of everything the cached arrays depend on."""
    relevant = {
        "version": CACHE_VERSION,
        "dim": configuration.dim,
        "spacing": configuration.spacing,
        "normalization": configuration.normalization,
        "patch_size": configuration.patch_size if configuration.is_classifier else None,
        "n_input_channels": configuration.n_input_channels,
        "sources": [_file_signature(path) for path in source_files],
    }
    if field_of_view(configuration):   # only when set, so caches of mm plans stay valid
        relevant["field_of_view"] = field_of_view(configuration)
    text = json.dumps(to_jsonable(relevant), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _file_signature(path) -> list:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return [path.name, None, None]
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _case_sources(case) -> list:
    return list(case.images) + ([case.label] if case.label is not None else [])


def case_files(out_dir, case_id) -> dict:
    """The paths of a cached case: ``image``, ``seg`` (blosc2) and ``properties`` (JSON)."""
    out_dir = Path(out_dir)
    return {"image": out_dir / f"{case_id}{IMAGE_SUFFIX}", "seg": out_dir / f"{case_id}{SEG_SUFFIX}",
            "properties": out_dir / f"{case_id}.json"}


def mask_dtype(seg) -> np.dtype:
    """The smallest type that holds the label ids: uint8 below 256 (never negative here:
    cropping cuts the outside away instead of marking it), else int16."""
    low, high = (int(seg.min()), int(seg.max())) if seg.size else (0, 0)
    return np.dtype(np.uint8) if 0 <= low and high < 256 else np.dtype(np.int16)


def storage_layout(shape, itemsize, patch_size) -> tuple:
    """(chunks, blocks) of a cached (C, *spatial) array.

    A chunk is one channel and at most one patch along each axis (a 2D patch over a volume:
    one slice), so a sampled patch touches a few chunks; blocks halve a chunk's longest axis
    until they hold BLOCK_BYTES at most.
    """
    spatial = [int(n) for n in shape[1:]]
    patch = [int(p) for p in (patch_size or spatial)][-len(spatial):]
    patch = [1] * (len(spatial) - len(patch)) + patch
    chunks = [1] + [max(1, min(n, p)) for n, p in zip(spatial, patch)]
    blocks = list(chunks)
    while int(np.prod(blocks)) * itemsize > BLOCK_BYTES:
        axis = int(np.argmax(blocks))
        blocks[axis] = (blocks[axis] + 1) // 2
    return tuple(chunks), tuple(blocks)


def _atomic_save_blosc2(path: Path, array: np.ndarray, patch_size) -> None:
    """A blosc2 file written under a temporary name and renamed: never half a file."""
    import blosc2

    chunks, blocks = storage_layout(array.shape, array.itemsize, patch_size)
    atomic_write_with(path, lambda tmp: blosc2.asarray(
        np.ascontiguousarray(array), urlpath=tmp, mode="w", chunks=chunks, blocks=blocks,
        cparams={"codec": blosc2.Codec.ZSTD, "clevel": CODEC_LEVEL, "nthreads": 1,
                 "filters": [blosc2.Filter.SHUFFLE], "filters_meta": [0]}), suffix=IMAGE_SUFFIX)


def save_case_arrays(out_dir, case_id, data, seg, patch_size) -> None:
    """Write a case's image and mask (blosc2, atomically) and remove version-1 files of it."""
    files = case_files(out_dir, case_id)
    _atomic_save_blosc2(files["image"], data, patch_size)
    _atomic_save_blosc2(files["seg"], seg.astype(mask_dtype(seg), copy=False), patch_size)
    for suffix in LEGACY_SUFFIXES:
        (Path(out_dir) / f"{case_id}{suffix}").unlink(missing_ok=True)


def open_case_arrays(out_dir, case_id) -> tuple:
    """(image (C, ...), seg (1, ...)) of a cached case, read lazily: numpy-style slicing of
    either returns an ndarray of just that region, decompressing only the chunks it touches.

    Version-1 files (``.npy``) are memory-mapped instead. One decompression thread: the
    loader's workers already use every core.
    """
    files = case_files(out_dir, case_id)
    if not files["image"].is_file() and (Path(out_dir) / f"{case_id}{LEGACY_SUFFIXES[0]}").is_file():
        return tuple(np.load(Path(out_dir) / f"{case_id}{suffix}", mmap_mode="r") for suffix in LEGACY_SUFFIXES)
    import blosc2

    return tuple(blosc2.open(str(files[key]), mode="r", dparams={"nthreads": 1}) for key in ("image", "seg"))


def _case_up_to_date(case, configuration, out_dir, previous_stage=None) -> bool:
    files = case_files(out_dir, case.id)
    if not all(f.is_file() for f in files.values()):
        return False
    sources = _case_sources(case) + ([previous_stage[case.id]] if previous_stage is not None else [])
    return _stored_stamp(files["properties"]) == preprocessing_stamp(configuration, sources)


_STAMP_PATTERN = re.compile(r'^  "stamp": "([0-9a-f]*)",?$', re.MULTILINE)


def _stored_stamp(path):
    """The stamp of a CASE.json; read from the file's head (the location lists can be MBs)."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096)
        found = _STAMP_PATTERN.search(head)
        if found:
            return found.group(1)
        return read_json(path).get("stamp")
    except (OSError, ValueError, AttributeError):
        return None


def save_label_map(path, labels) -> None:
    """A label map (original grid) as a compressed ``.npz``, written atomically: the previous
    stage's out-of-fold predictions a cascade trains on."""
    labels = np.asarray(labels)
    stored = labels.astype(mask_dtype(labels), copy=False)
    atomic_write_with(path, lambda tmp: np.savez_compressed(tmp, labels=stored), suffix=".npz")


def load_label_map(path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return np.asarray(stored["labels"])
    except (OSError, ValueError, KeyError) as error:
        raise InputError(path, f"is not a readable label map ({type(error).__name__}: {error})") from None


def image_configuration(configuration):
    """The configuration the image itself is preprocessed with: a cascade's without its
    previous-stage channels (their 'none' normalisation and channel count)."""
    n_previous = configuration.n_previous_stage_channels
    if not n_previous:
        return configuration
    return replace(configuration, normalization=list(configuration.normalization)[:-n_previous],
                   n_input_channels=configuration.n_image_channels, previous_stage="", previous_stage_run="")


def _previous_stage_on_grid(previous_file, properties, image_shape):
    """The previous stage's label map, cut by the case's crop box and resampled to its grid as
    the labels were (one-hot linear interpolation, then the most likely label)."""
    previous = load_label_map(previous_file)
    if list(previous.shape) != list(image_shape):
        raise InputError(previous_file, f"label map of shape {list(previous.shape)} does not match the image "
                                        f"{list(image_shape)} (a prediction of another dataset or version?)")
    window = tuple(slice(lo, hi) for lo, hi in properties.crop_bbox)
    axis = coarse_axis(properties.original_spacing, properties.spacing_after_resampling)
    return resample_labels(previous[window], properties.shape_after_resampling, coarse=axis)


def _preprocess_and_save(case, configuration, out_dir, label_ids, previous_stage=None):
    image = read_case_images(case)
    labels = read_case_labels(case, image, label_ids)
    data, seg, properties = preprocess_case(image, labels, image_configuration(configuration), case.id)
    sources = _case_sources(case)
    if previous_stage is not None:
        previous = _previous_stage_on_grid(previous_stage[case.id], properties, image.array.shape[1:])
        seg = np.concatenate([seg, previous[None].astype(seg.dtype)])
        sources.append(previous_stage[case.id])
    properties.stamp = preprocessing_stamp(configuration, sources)
    # Remove the old properties first: arrays and properties of different runs never pair up.
    (out_dir / f"{case.id}.json").unlink(missing_ok=True)
    save_case_arrays(out_dir, case.id, data, seg, configuration.patch_size)
    properties.save(out_dir / f"{case.id}.json")
    return case.id


def preprocess_segmentation(dataset, configuration, out_dir: Path, n_jobs=None, previous_stage=None) -> Path:
    """Every case not up to date in ``out_dir`` preprocessed and saved; returns ``out_dir``.

    ``previous_stage`` ({case id: label map file}) is required by a cascade configuration.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if bool(configuration.previous_stage) != (previous_stage is not None):
        raise InputError(out_dir, f"{configuration.name}: the previous stage's predictions are needed exactly "
                                  "when the configuration has a previous stage")
    label_ids = sorted(set(int(v) for v in dataset.labels.values()) | {0})
    todo = [case for case in dataset.cases
            if not _case_up_to_date(case, configuration, out_dir, previous_stage)]
    worker = functools.partial(_preprocess_and_save, configuration=configuration,
                               out_dir=out_dir, label_ids=label_ids, previous_stage=previous_stage)
    parallel_map(worker, todo, n_jobs=n_jobs, desc=f"preprocess {configuration.name}")
    return out_dir
