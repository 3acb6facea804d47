"""The files of one case: nnU-Net's channel file names, and the one reader of a case's channels
and of its mask.

Import, fingerprint, preprocessing, evaluation and prediction read cases through these
functions, so a case is refused for the same reasons wherever it is read. A case is anything
with ``images`` (its channel files) and, for a mask, ``label`` (``datasets.Case``, or
prediction's input cases).
"""

import re
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.io.images import ImageData, read_image

# nnU-Net's channel files: CASE_0000.ext, CASE_0001.ext, ... (the stem, without the ending).
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
FIRST_CHANNEL_SUFFIX = "_0000"
# The files of one case lie on one grid within these tolerances.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def channel_file_name(case_id: str, channel: int, ending: str) -> str:
    """``CASE_0000.ext``: the file of channel ``channel`` of a case."""
    return f"{case_id}_{channel:04d}{ending}"


def geometry_difference(image: ImageData, other: ImageData, whole: bool = True) -> str | None:
    """None when ``other`` lies on ``image``'s grid, else what differs: the size, and with
    ``whole`` also the spacing, origin and direction (within the tolerances above)."""
    if image.spatial_shape != other.spatial_shape:
        return f"size {other.spatial_shape} differs from {image.path.name}'s {image.spatial_shape}"
    if not whole:
        return None
    if not np.allclose(image.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {other.spacing} differs from {image.path.name}'s {image.spacing}"
    if len(image.origin) == len(other.origin) and not np.allclose(
        image.origin, other.origin, rtol=0, atol=ORIGIN_ATOL_MM
    ):
        return f"origin {other.origin} differs from {image.path.name}'s {image.origin}"
    if len(image.direction) == len(other.direction) and not np.allclose(
        image.direction, other.direction, rtol=0, atol=DIRECTION_ATOL
    ):
        return f"direction {other.direction} differs from {image.path.name}'s {image.direction}"
    return None


def read_channel_files(paths, whole_geometry: bool = False) -> list:
    """Each channel file of a case, read and checked against the first one: its size always
    (the channels are stacked), with ``whole_geometry`` also its spacing, origin and direction
    (import refuses such a case; later stages read what import wrote)."""
    images = []
    for path in paths:
        image = read_image(path)
        problem = geometry_difference(images[0], image, whole_geometry) if images else None
        if problem is not None:
            raise InputError(path, problem)
        images.append(image)
    return images


def read_case_images(case) -> ImageData:
    """One ImageData with the channels of all of ``case.images`` stacked, on the first file's grid."""
    images = read_channel_files(case.images)
    first = images[0]
    if len(images) > 1:
        first.array = np.concatenate([image.array for image in images], axis=0)
    return first


def read_mask(path) -> ImageData:
    """A label map as one channel: palette PNGs keep their indices, colour masks whose three
    channels are equal become grey; any other colour mask is an InputError."""
    mask = read_image(path)
    if mask.meta.get("mode") in ("P", "PA"):
        from PIL import Image

        with Image.open(path) as pil:
            mask.array = np.asarray(pil)[None]
    elif mask.n_channels == 3 and (mask.array == mask.array[:1]).all():
        mask.array = mask.array[:1]
    if mask.n_channels != 1:
        raise InputError(path, f"mask has {mask.n_channels} channels; a mask holds one label "
                               "value per pixel")
    return mask


# Values counted at a time by integer_counts (a 32 MB int64 temporary).
COUNT_CHUNK_VALUES = 2 ** 22


def integer_counts(array, low: int, high: int) -> np.ndarray:
    """How often each integer ``low..high`` occurs in ``array`` (all its values in that range),
    counted a chunk at a time: ``np.bincount`` of a whole 512 x 512 x 400 int16 CT would first
    make 840 MB of int64 copies of it."""
    flat, counts = np.ravel(array), np.zeros(int(high) - int(low) + 1, dtype=np.int64)
    for first in range(0, flat.size, COUNT_CHUNK_VALUES):
        chunk = flat[first:first + COUNT_CHUNK_VALUES].astype(np.int64)
        counts += np.bincount(chunk - low if low else chunk, minlength=len(counts))
    return counts


def distinct_values(array) -> np.ndarray:
    """Sorted distinct values of ``array``. Integer arrays of a small range (label maps) are
    counted (``integer_counts``): ``np.unique`` takes about 0.7 s on a 512 x 512 x 400 mask and
    copies it, and preprocessing asks three times per case."""
    array = np.asarray(array)
    if array.dtype.kind not in "iub" or array.size < COUNT_CHUNK_VALUES:
        return np.unique(array)
    low, high = int(array.min()), int(array.max())
    if high - low > 2 ** 16:
        return np.unique(array)
    return (np.flatnonzero(integer_counts(array, low, high)) + low).astype(array.dtype)


def mask_values(path, array: np.ndarray) -> list:
    """The distinct values of a mask as integers; fractional values are an InputError."""
    unique = distinct_values(array)
    if np.issubdtype(unique.dtype, np.floating) and not np.array_equal(unique, np.round(unique)):
        raise InputError(path, "mask holds fractional values; masks hold whole label values")
    return [int(v) for v in unique]


def read_case_labels(case, image: ImageData, label_ids) -> np.ndarray:
    """The case's label map (int16, spatial) on ``image``'s grid, holding only ``label_ids``
    (background 0 is always allowed). Raises InputError naming the mask."""
    if case.label is None or not Path(case.label).exists():
        raise InputError(case.label or image.path, "segmentation mask not found")
    mask = read_mask(case.label)
    if mask.spatial_shape != image.spatial_shape:
        raise InputError(case.label, f"mask shape {list(mask.spatial_shape)} does not match image "
                                     f"shape {list(image.spatial_shape)} ({Path(image.path).name})")
    declared = sorted(set(int(i) for i in label_ids) | {0})
    unknown = [v for v in mask_values(case.label, mask.array) if v not in declared]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:10])
        raise InputError(case.label, f"mask holds values {shown} not declared in dataset.json's "
                                     f"labels (declared: {declared})")
    return mask.array[0].astype(np.int16)
