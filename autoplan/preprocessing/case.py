"""One case through preprocessing: crop to the nonzero region, normalise, resample to the plan's
spacing (:func:`preprocess_case`, shared by training and inference), and back onto the original
grid (:func:`revert_to_original`).

Order of operations follows nnU-Net v2: crop, then normalise (so the nonzero mask
still fits the image exactly), then resample.
"""

import json
from dataclasses import dataclass, field

import numpy as np

from autoplan.errors import InputError
from autoplan.fingerprint.geometry import bounding_box
from autoplan.io.cases import distinct_values
from autoplan.jsonio import JsonDataclass, atomic_write_text, to_jsonable
from autoplan.preprocessing.normalization import normalize
from autoplan.preprocessing.resampling import SlabResampler, can_stream, coarse_axis, resample, resample_labels

# Foreground locations kept per label for oversampling (nnU-Net: 10000, at least 1 %).
N_CLASS_LOCATIONS = 10000
MIN_LOCATION_COVERAGE = 0.01
LOCATION_SEED = 1234


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


def preprocess_case(image, seg, configuration, case_id=""):
    """(data float32 (C, ...), seg int16 (1, ...) or None, CaseProperties) for one case.

    ``image`` is an ``ImageData``; ``seg`` a label array ``([1,] ...)`` on the same grid.
    """
    data = np.asarray(image.array)
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
    # Cropped first, then one float32 copy that normalisation and resampling may overwrite: a
    # 512 x 512 x 400 int16 CT then costs one 400 MB float32 array, not several, and the
    # caller's array is never changed.
    data = np.array(data, dtype=np.float32)
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
    box = bounding_box(np.any(data != 0, axis=0))
    window = (slice(None), *box)
    data = data[window]
    if seg is not None:
        seg = seg[window]
    return data, seg, [[s.start, s.stop] for s in box]


def sample_class_locations(labels) -> dict:
    """Up to N_CLASS_LOCATIONS voxel indices per foreground label, sampled with a fixed seed."""
    rng = np.random.RandomState(LOCATION_SEED)
    locations = {}
    for label in distinct_values(labels):
        if label == 0:
            continue
        found = np.argwhere(labels == label)
        n = min(N_CLASS_LOCATIONS, len(found))
        n = max(n, int(np.ceil(len(found) * MIN_LOCATION_COVERAGE)))
        chosen = found[np.sort(rng.choice(len(found), n, replace=False))]
        locations[str(int(label))] = chosen.tolist()
    return locations


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


class OriginalGrid:
    """Probabilities of one case's working grid, arriving in slabs along the first spatial axis
    (``(K, rows, ...)``, as the sliding window finishes them), handed out in the original grid a
    few rows at a time (``rows(n)``): resampled as ``revert_to_original`` resamples (linear,
    nearest along a coarse axis) and uncropped (background outside the crop box).

    Only a few rows of either grid are held at once, so reverting costs memory of the order of
    (K x a few rows), not (K x the volume). Grids ``SlabResampler`` cannot stream (2D images,
    a coarse axis other than the first) are collected and reverted whole, exactly as before.
    """

    def __init__(self, slabs, properties: CaseProperties, configuration, n_classes: int):
        self.n_classes = int(n_classes)
        self.shape = [int(n) for n in properties.original_shape]
        self.position = 0
        self._box = [tuple(int(v) for v in pair) for pair in properties.crop_bbox]
        spacing = properties.original_spacing
        target = properties.spacing_after_resampling or (
            target_spacing_for(spacing, configuration) if configuration is not None else spacing)
        axis = coarse_axis(spacing, target)
        if can_stream(len(self.shape), axis):
            self._source = SlabResampler((slab for _, slab in slabs), properties.shape_after_resampling,
                                         properties.shape_after_crop, axis)
        else:
            whole = np.empty((self.n_classes, *properties.shape_after_resampling), dtype=np.float32)
            for first, slab in slabs:
                whole[:, first:first + slab.shape[1]] = slab
            self._whole = revert_to_original(whole, properties, configuration)
            self._source = None

    def rows(self, n: int) -> np.ndarray:
        """The next ``n`` rows (fewer at the end) of the original grid, ``(K, rows, ...)`` float32."""
        stop = min(self.position + int(n), self.shape[0])
        if stop <= self.position:
            raise ValueError("no rows left")
        first, self.position = self.position, stop
        if self._source is None:
            return self._whole[:, first:stop]
        out = np.zeros((self.n_classes, stop - first, *self.shape[1:]), dtype=np.float32)
        out[0] = 1.0                      # background outside the crop box
        (lo, hi), plane = self._box[0], tuple(slice(a, b) for a, b in self._box[1:])
        inside = range(max(first, lo), min(stop, hi))
        if inside:
            out[(slice(None), slice(inside[0] - first, inside[-1] + 1 - first)) + plane] = \
                self._source.take(len(inside))
        return out
