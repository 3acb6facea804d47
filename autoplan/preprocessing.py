"""Preprocessing: crop to the nonzero region, normalise, resample to the plan's spacing.

One case goes through :func:`preprocess_case` (training and inference share it);
:func:`revert_to_original` maps predicted probabilities back onto the original
grid. :func:`preprocess_dataset` writes the cache the loaders read::

    PRE/NAME/CFG/CASE.npy       float32 (C, [Z,] Y, X)
    PRE/NAME/CFG/CASE_seg.npy   int16   (1, [Z,] Y, X)
    PRE/NAME/CFG/CASE.json      CaseProperties (written last; holds the cache stamp)

Classification datasets are resized once into ``PRE/NAME/classifier/images.npy``
(uint8, N x H x W x C) plus ``index.json``.

Order of operations follows nnU-Net v2: crop, then normalise (so the nonzero mask
still fits the image exactly), then resample.
"""

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from autoplan.errors import InputError
from autoplan.jsonio import (
    JsonDataclass,
    atomic_save_npy,
    atomic_write_text,
    read_json,
    to_jsonable,
    write_json,
)
from autoplan.parallel import parallel_map

# Spacing ratio above which a volume is resampled in-plane first and then along the
# coarse axis with nearest neighbour (nnU-Net's ANISO_THRESHOLD): cubic interpolation
# across thick slices invents structure.
ANISOTROPY_THRESHOLD = 3.0
# Foreground locations kept per label for oversampling (nnU-Net: 10000, at least 1 %).
N_CLASS_LOCATIONS = 10000
MIN_LOCATION_COVERAGE = 0.01
LOCATION_SEED = 1234
# Bump when the cached arrays would change for the same inputs and configuration.
CACHE_VERSION = 1
CLASSIFICATION_CHUNK = 512


@dataclass
class CaseProperties(JsonDataclass):
    case_id: str
    original_shape: list                  # spatial, array axis order
    original_spacing: list
    crop_bbox: list                       # [[lo, hi] per axis], hi exclusive, in the original grid
    shape_after_crop: list
    shape_after_resampling: list
    spacing_after_resampling: list = field(default_factory=list)
    class_locations: dict = field(default_factory=dict)  # label id (str) -> [[i, j, (k)], ...]
    stamp: str = ""                       # cache key: configuration fields + source files

    def save(self, path) -> None:
        """Readable JSON, one line per field and per label's location list.

        The generic indented writer spends most of preprocessing's time on these lists.
        """
        head = to_jsonable({k: v for k, v in vars(self).items() if k != "class_locations"})
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
        locations = [f"    {json.dumps(str(label))}: {json.dumps(np.asarray(coords).tolist(), separators=(',', ':'))}"
                     for label, coords in self.class_locations.items()]
        body = ",\n".join(locations)
        lines.append('  "class_locations": {' + (f"\n{body}\n  " if locations else "") + "}")
        atomic_write_text(path, "{\n" + "\n".join(lines) + "\n}\n")


# ----------------------------------------------------------------------------- one case


def preprocess_case(image, seg, configuration, case_id=""):
    """(data float32 (C, ...), seg int16 (1, ...) or None, CaseProperties) for one case.

    ``image`` is an ``ImageData``; ``seg`` a label array ``([1,] ...)`` on the same grid.
    """
    data = np.asarray(image.array, dtype=np.float32)
    spacing = [float(s) for s in image.spacing]
    if seg is not None:
        seg = np.asarray(seg)
        if seg.ndim == data.ndim - 1:
            seg = seg[None]
        if seg.shape[1:] != data.shape[1:]:
            raise InputError(image.path, f"mask shape {list(seg.shape[1:])} does not match "
                                         f"image shape {list(data.shape[1:])}")
    fits_field_of_view = bool(field_of_view(configuration))
    spacing = working_spacing(data.shape[1:], spacing, configuration)
    data, seg, bbox = crop_to_nonzero(data, seg)
    shape_after_crop = list(data.shape[1:])
    data = normalize(data, configuration.normalization, image.path)

    target_spacing = target_spacing_for(spacing, configuration)
    new_shape = compute_new_shape(shape_after_crop, spacing, target_spacing)
    axis = coarse_axis(spacing, target_spacing)
    data = resample(data, new_shape, order=3, coarse=axis, antialias=fits_field_of_view)
    if seg is not None:
        seg = resample_labels(seg[0], new_shape, coarse=axis)[None]

    properties = CaseProperties(
        case_id=case_id,
        original_shape=list(image.array.shape[1:]),
        original_spacing=spacing,
        crop_bbox=bbox,
        shape_after_crop=shape_after_crop,
        shape_after_resampling=list(data.shape[1:]),
        spacing_after_resampling=list(target_spacing),
        class_locations=sample_class_locations(seg[0]) if seg is not None else {},
    )
    if seg is not None:
        seg = seg.astype(np.int16, copy=False)
    return data.astype(np.float32, copy=False), seg, properties


def field_of_view(configuration) -> dict:
    """The plan's field-of-view normalisation (``{}`` when images are resampled by their spacing)."""
    return getattr(configuration, "field_of_view", None) or {}


def working_spacing(spatial_shape, spacing, configuration) -> list:
    """The spacing a case is resampled from.

    With the plan's field-of-view normalisation (images without a pixel size) every image,
    whatever its size, gets the virtual pixel size that fits it whole into the working size
    with its aspect kept, so a 1024-px radiograph is resampled to the 224 px the network
    learnt at. A volume given to such a 2D model keeps its slice spacing. Otherwise the
    image's own spacing (mm).
    """
    fov = field_of_view(configuration)
    if fov.get("mode") != "fit":
        return [float(s) for s in spacing]
    working = fov["working_size"]
    target = [float(t) for t in configuration.spacing[-len(working):]]
    scale = fit_scale(spatial_shape[-len(working):], working)
    return [float(s) for s in spacing[:len(spacing) - len(working)]] + [scale * t for t in target]


def fit_scale(shape, working_size) -> float:
    """The zoom that fits an image of ``shape`` whole into ``working_size``, aspect kept."""
    return min(float(w) / int(n) for w, n in zip(working_size, shape))


def target_spacing_for(spacing, configuration) -> list:
    """The plan's spacing; a 2D configuration on volumes keeps the slice spacing."""
    target = [float(s) for s in (configuration.spacing or spacing)]
    if len(target) < len(spacing):
        target = list(spacing[: len(spacing) - len(target)]) + target
    return target


def compute_new_shape(shape, spacing, target_spacing) -> list:
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)]


def crop_to_nonzero(data, seg=None):
    """Crop all channels (and seg) to the bounding box of voxels nonzero in any channel.

    Returns (data, seg, bbox) with bbox [[lo, hi] per axis] (hi exclusive). An all-zero
    image is kept whole.
    """
    nonzero = np.any(data != 0, axis=0)
    bbox = []
    for axis in range(nonzero.ndim):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        present = np.flatnonzero(nonzero.any(axis=other)) if other else np.flatnonzero(nonzero)
        if present.size == 0:
            bbox = [[0, n] for n in nonzero.shape]
            break
        bbox.append([int(present[0]), int(present[-1]) + 1])
    window = (slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)
    data = data[window]
    if seg is not None:
        seg = seg[window]
    return data, seg, bbox


# ----------------------------------------------------------------------------- normalisation


def normalize(data, schemes, path=None):
    """Normalise each channel in place by its scheme (see docs/architecture.md)."""
    schemes = list(schemes or [])
    if len(schemes) == 1 and data.shape[0] > 1:
        schemes = schemes * data.shape[0]     # one scheme given for a multi-channel image
    if len(schemes) != data.shape[0]:
        raise InputError(path, f"image has {data.shape[0]} channel(s) but the plan expects "
                               f"{len(schemes)}")
    for channel, scheme in enumerate(schemes):
        data[channel] = normalize_channel(data[channel], scheme)
    return data


def normalize_channel(values, scheme: dict):
    name = scheme.get("scheme", "zscore")
    values = values.astype(np.float32, copy=False)
    if name == "zscore":
        return (values - values.mean()) / max(float(values.std()), 1e-8)
    if name == "zscore_nonzero":
        mask = ndimage.binary_fill_holes(values != 0)
        if not mask.any():
            return np.zeros_like(values)
        inside = values[mask]
        result = (values - inside.mean()) / max(float(inside.std()), 1e-8)
        result[~mask] = 0
        return result
    if name == "ct":
        low, high = scheme["clip"]
        values = np.clip(values, low, high)
        return (values - scheme["mean"]) / max(float(scheme["std"]), 1e-8)
    if name == "rgb":
        values = values / float(scheme.get("scale", 255.0))
        return (values - scheme.get("mean", 0.0)) / max(float(scheme.get("std", 1.0)), 1e-8)
    if name == "none":
        return values
    raise ValueError(f"unknown normalization scheme {name!r}")


# ----------------------------------------------------------------------------- resampling


def coarse_axis(spacing, target_spacing):
    """Index of the single coarse axis when either grid is anisotropic, else None."""
    for grid in (spacing, target_spacing):
        grid = np.asarray(grid, dtype=float)
        if len(grid) == 3 and grid.max() / grid.min() > ANISOTROPY_THRESHOLD:
            coarse = np.flatnonzero(grid == grid.max())
            # Two coarse axes (e.g. 0.24, 1.25, 1.25) are resampled jointly, as nnU-Net does.
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def resample(data, new_shape, order=3, coarse=None, antialias=False):
    """Resample (C, ...) to new_shape with spline ``order``; along ``coarse`` nearest only.

    ``antialias`` low-passes axes that shrink more than ``ANTIALIAS_BELOW`` first (a Gaussian
    of sigma (1/factor - 1) / 2, as skimage.transform.resize): a 2048-px radiograph brought
    to 224 px would otherwise alias its noise and fine texture into the small image.
    Linear resampling without a coarse axis runs through torch's interpolate (same values
    as ``ndimage.zoom(grid_mode=True)``, several times faster on large outputs).
    """
    new_shape = [int(n) for n in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    if antialias:
        data = _low_pass_for(data, new_shape)
    if order == 1 and coarse is None and data.ndim in (3, 4):
        return _interpolate_linear(data, new_shape)
    return np.stack([_resample_channel(c, new_shape, order, coarse) for c in data])


# Below this zoom factor an axis is low-passed before resampling (milder shrinking aliases little).
ANTIALIAS_BELOW = 0.75


def _low_pass_for(data, new_shape):
    factors = [n / o for n, o in zip(new_shape, data.shape[1:])]
    sigmas = [max(0.0, (1.0 / f - 1.0) / 2.0) if f < ANTIALIAS_BELOW else 0.0 for f in factors]
    if not any(sigmas):
        return data
    return np.stack([ndimage.gaussian_filter(c.astype(np.float32, copy=False), sigmas, mode="nearest")
                     for c in data])


def _interpolate_linear(data, new_shape):
    import torch

    mode = "bilinear" if data.ndim == 3 else "trilinear"
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    with torch.inference_mode():
        result = torch.nn.functional.interpolate(tensor, size=new_shape, mode=mode, align_corners=False)
    return result[0].numpy()


def _zoom(values, new_shape, order):
    factors = [n / o for n, o in zip(new_shape, values.shape)]
    if all(f == 1 for f in factors):
        return values
    # grid_mode maps pixel edges onto pixel edges, like skimage.transform.resize.
    return ndimage.zoom(values, factors, order=order, mode="nearest", grid_mode=True)


def _resample_channel(values, new_shape, order, coarse):
    values = values.astype(np.float32, copy=False)
    if coarse is None:
        return _zoom(values, new_shape, order)
    planes = np.moveaxis(values, coarse, 0)
    plane_shape = [n for a, n in enumerate(new_shape) if a != coarse]
    planes = np.stack([_zoom(plane, plane_shape, order) for plane in planes])
    planes = np.moveaxis(planes, 0, coarse)
    return _zoom(planes, new_shape, 0)


def resample_labels(labels, new_shape, coarse=None):
    """Label map resampled by linear interpolation of each label's one-hot, then argmax.

    Interpolating one-hot masks (nnU-Net's resize_segmentation) keeps thin structures
    and never invents label ids between neighbours, unlike interpolating the ids.
    """
    new_shape = [int(n) for n in new_shape]
    if list(labels.shape) == new_shape:
        return labels.astype(np.int16, copy=False)
    best = np.full(new_shape, -1.0, dtype=np.float32)
    result = np.zeros(new_shape, dtype=np.int16)
    for label in np.unique(labels):
        score = _resample_channel((labels == label).astype(np.float32), new_shape, 1, coarse)
        better = score > best
        result[better] = label
        best[better] = score[better]
    return result


def sample_class_locations(labels) -> dict:
    """Up to N_CLASS_LOCATIONS voxel indices per foreground label, sampled with a fixed seed."""
    rng = np.random.RandomState(LOCATION_SEED)
    locations = {}
    for label in np.unique(labels):
        if label == 0:
            continue
        found = np.argwhere(labels == label)
        n = min(N_CLASS_LOCATIONS, len(found))
        n = max(n, int(np.ceil(len(found) * MIN_LOCATION_COVERAGE)))
        chosen = found[np.sort(rng.choice(len(found), n, replace=False))]
        locations[str(int(label))] = chosen.tolist()
    return locations


# ----------------------------------------------------------------------------- back to original


def revert_to_original(probabilities, properties: CaseProperties, configuration=None):
    """(K, *original_shape) float32: undo resampling (linear) and cropping.

    Outside the crop box the background (channel 0) gets probability 1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    spacing = properties.original_spacing
    target = properties.spacing_after_resampling or (
        target_spacing_for(spacing, configuration) if configuration is not None else spacing)
    axis = coarse_axis(spacing, target)
    cropped = resample(probabilities, properties.shape_after_crop, order=1, coarse=axis)
    result = np.zeros((probabilities.shape[0], *properties.original_shape), dtype=np.float32)
    result[0] = 1.0
    window = (slice(None),) + tuple(slice(lo, hi) for lo, hi in properties.crop_bbox)
    result[window] = cropped
    return result


# ----------------------------------------------------------------------------- dataset


def preprocessing_stamp(configuration, source_files) -> str:
    """Hash of everything the cached arrays depend on."""
    relevant = {
        "version": CACHE_VERSION,
        "dim": configuration.dim,
        "spacing": configuration.spacing,
        "normalization": configuration.normalization,
        "patch_size": configuration.patch_size if configuration.name == "classifier" else None,
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


def preprocess_dataset(dataset, plan, configuration_name, preprocessed_root, n_jobs=None) -> Path:
    """Write the preprocessed cache for one configuration; returns its folder.

    Cases whose three files exist with a matching stamp are skipped, so an interrupted
    run resumes where it stopped.
    """
    if configuration_name not in plan.configurations:
        raise InputError(None, f"configuration {configuration_name!r} is not in the plan "
                               f"(available: {', '.join(plan.configurations)})")
    configuration = plan.configurations[configuration_name]
    out_dir = Path(preprocessed_root) / dataset.name / configuration_name
    if configuration.name == "classifier" or dataset.task_type == "classification":
        return preprocess_classification(dataset, configuration, out_dir, n_jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_ids = sorted(set(int(v) for v in dataset.labels.values()) | {0})
    todo = [case for case in dataset.cases if not _case_up_to_date(case, configuration, out_dir)]
    worker = functools.partial(_preprocess_and_save, configuration=configuration,
                               out_dir=out_dir, label_ids=label_ids)
    parallel_map(worker, todo, n_jobs=n_jobs, desc=f"preprocess {configuration_name}")
    return out_dir


def _case_sources(case) -> list:
    return list(case.images) + ([case.label] if case.label is not None else [])


def _case_up_to_date(case, configuration, out_dir) -> bool:
    files = [out_dir / f"{case.id}.npy", out_dir / f"{case.id}_seg.npy", out_dir / f"{case.id}.json"]
    if not all(f.is_file() for f in files):
        return False
    return _stored_stamp(files[2]) == preprocessing_stamp(configuration, _case_sources(case))


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


def read_case_images(case):
    """One ImageData holding all channel files of a case (checked to share one grid)."""
    from autoplan.io.images import read_image

    images = [read_image(path) for path in case.images]
    first = images[0]
    for other in images[1:]:
        if other.spatial_shape != first.spatial_shape:
            raise InputError(other.path, f"channel shape {list(other.spatial_shape)} differs from "
                                         f"{first.path.name} {list(first.spatial_shape)}")
    if len(images) > 1:
        first.array = np.concatenate([im.array for im in images], axis=0)
    return first


def read_case_labels(case, image, label_ids):
    """The case's label map (spatial), checked against the image and the dataset's labels."""
    from autoplan.io.images import read_image

    if case.label is None or not Path(case.label).exists():
        raise InputError(case.label or image.path, "segmentation mask not found")
    mask = read_image(case.label)
    if mask.n_channels != 1:
        raise InputError(case.label, f"mask has {mask.n_channels} channels; expected one label map")
    if mask.spatial_shape != image.spatial_shape:
        raise InputError(case.label, f"mask shape {list(mask.spatial_shape)} does not match image "
                                     f"shape {list(image.spatial_shape)} ({Path(image.path).name})")
    labels = mask.array[0]
    if np.issubdtype(labels.dtype, np.floating) and not np.array_equal(labels, np.round(labels)):
        raise InputError(case.label, "mask holds fractional values; expected integer label ids")
    unknown = sorted(set(np.unique(labels).astype(int).tolist()) - set(label_ids))
    if unknown:
        raise InputError(case.label, f"mask holds label values {unknown[:10]} not declared in "
                                     f"dataset.json (declared: {label_ids})")
    return labels.astype(np.int16)


def _preprocess_and_save(case, configuration, out_dir, label_ids):
    image = read_case_images(case)
    labels = read_case_labels(case, image, label_ids)
    data, seg, properties = preprocess_case(image, labels, configuration, case.id)
    properties.stamp = preprocessing_stamp(configuration, _case_sources(case))
    # Remove the old properties first: arrays and properties of different runs never pair up.
    (out_dir / f"{case.id}.json").unlink(missing_ok=True)
    atomic_save_npy(out_dir / f"{case.id}.npy", data)
    atomic_save_npy(out_dir / f"{case.id}_seg.npy", seg.astype(np.int16))
    properties.save(out_dir / f"{case.id}.json")
    return case.id


# ----------------------------------------------------------------------------- classification


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
    luma = np.tensordot(np.asarray([0.299, 0.587, 0.114]), pixels.astype(np.float64), axes=1)
    return np.round(luma).astype(pixels.dtype)[None]


def _to_uint8(pixels):
    """8-bit images pass; deeper ones are stretched min..max to 0..255."""
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / max(high - low, 1e-8) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def normalize_classification_batch(batch, configuration) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), normalised by the plan's per-channel mean/std."""
    return normalize_unit_batch(np.asarray(batch, dtype=np.float32) / 255.0, configuration)


def normalize_unit_batch(batch, configuration) -> np.ndarray:
    """float (B, H, W, C) in 0..1 -> float32 (B, C, H, W) normalised."""
    batch = np.asarray(batch, dtype=np.float32)
    schemes = list(configuration.normalization or [{"scheme": "rgb", "mean": 0.0, "std": 1.0}])
    if len(schemes) == 1:
        schemes = schemes * batch.shape[-1]
    out = np.empty((batch.shape[0], batch.shape[-1], *batch.shape[1:3]), dtype=np.float32)
    for c, scheme in enumerate(schemes[: batch.shape[-1]]):
        channel = batch[..., c]
        if scheme.get("scheme", "rgb") == "zscore":
            mean = channel.mean(axis=(1, 2), keepdims=True)
            std = np.maximum(channel.std(axis=(1, 2), keepdims=True), 1e-8)
            out[:, c] = (channel - mean) / std
        else:
            out[:, c] = (channel - scheme.get("mean", 0.0)) / max(float(scheme.get("std", 1.0)), 1e-8)
    return out


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
