"""Data augmentation presets: batchgenerators pipelines for segmentation, numpy/PIL for classification.

Segmentation presets (``segmentation_transforms``) work on batchgenerators dicts
``{"data": (B, C, ...), "seg": (B, 1, ...)}`` sampled at ``sampling_patch_size(...)``
(larger than the patch, so rotations and zooms do not pull in empty borders); the
spatial transform crops the centre back to the patch, and the last step renames
``seg`` to ``target`` (int16).

- ``default`` follows nnU-Net v2's ``get_training_transforms``: rotation and scaling
  (0.7-1.4, each with p=0.2 per sample), Gaussian noise (p=0.1), Gaussian blur (p=0.2),
  multiplicative brightness (p=0.15), contrast (p=0.15), simulated low resolution
  (p=0.25), inverted gamma (p=0.1), gamma (p=0.3), mirroring along every axis;
  elastic deformation off. Rotation range, as nnU-Net: 2D patches ±180°, or ±15° when
  the patch is elongated (longest/shortest side > 1.5, where a full turn would rotate
  the long axis out of the patch); 3D ±30° about each axis, or — when the patch is
  much thinner along z than in-plane (ratio > 3) — slices are augmented as 2D images
  (±180° in-plane) and the coarse axis is left alone.
- ``light`` is the classic Keras recipe: rotation ±10°, shifts ±10 % of the patch,
  zoom 0.8-1.2, horizontal flip only.
- ``none``: the patch as sampled.
- A cascade (``previous_stage_labels``) appends the previous stage's labels as one-hot data
  channels after all of these, perturbed as nnU-Net v2 does (random ball morphology, p=0.4;
  one random small connected component removed, p=0.2) except with ``none``.

The classification preset (``classification_transforms``) applies one affine per image
(random resized crop of 70-100 % of the area, horizontal and vertical flips — dermoscopy
and similar photos have no canonical orientation —, rotation ±30°) through Pillow on
uint8, then brightness/contrast/saturation/hue jitter in numpy on the float batch.
"""

import itertools

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from PIL import Image

from autoplan.cascade_transforms import cascade_transforms
from autoplan.preprocessing.classification import LUMA_WEIGHTS

PRESETS = ("default", "light", "none")
ANISOTROPIC_PATCH_RATIO = 3.0
ELONGATED_2D_PATCH_RATIO = 1.5
DEFAULT_SCALE = (0.7, 1.4)
# nnU-Net sizes the sampled patch for this zoom range, not the full 0.7-1.4: rare strong
# zoom-outs then show some constant border instead of every patch being oversized.
SAMPLING_SCALE = (0.85, 1.25)
DEFAULT_SCALE_PROBABILITY = 0.2     # nnU-Net's p_scale_per_sample
# Plans that resize whole images to a working size (images without a pixel size) meet
# other sites' collimation and cropping as a zoom of the anatomy: a 10 % border crop is a
# 1.25x zoom. On JSRT, such crops cost 0.11-0.14 Dice at p=0.2 (benchmarks/robustness.py).
FIELD_OF_VIEW_SCALE_PROBABILITY = 0.5
# ... and as a shift: training windows of such plans move by up to this fraction of the patch.
FIELD_OF_VIEW_SHIFT = 0.1
LIGHT_ROTATION_DEG = 10.0
LIGHT_SHIFT = 0.1
LIGHT_SCALE = (0.8, 1.2)


def _check_preset(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r} (known: {', '.join(PRESETS)})")


def _radians(degrees):
    return (-np.deg2rad(degrees), np.deg2rad(degrees))


def uses_slice_augmentation(patch_size, dim) -> bool:
    """3D patches much thinner along z than in-plane are augmented slice by slice (nnU-Net's dummy 2D)."""
    return dim == 3 and max(patch_size) / patch_size[0] > ANISOTROPIC_PATCH_RATIO


def rotation_ranges(preset, patch_size, dim, max_rotation_degrees=None) -> dict:
    """Rotation interval (radians) about each axis for ``preset``, capped at ``max_rotation_degrees``."""
    ranges = _preset_rotation_ranges(preset, patch_size, dim)
    if max_rotation_degrees is None:
        return ranges
    cap = np.radians(max_rotation_degrees)
    return {axis: (max(low, -cap), min(high, cap)) for axis, (low, high) in ranges.items()}


def _preset_rotation_ranges(preset, patch_size, dim) -> dict:
    zero = (0.0, 0.0)
    if preset == "light":
        return {"x": _radians(LIGHT_ROTATION_DEG), "y": zero if dim == 2 else _radians(LIGHT_ROTATION_DEG),
                "z": zero if dim == 2 else _radians(LIGHT_ROTATION_DEG)}
    if preset != "default":
        return {"x": zero, "y": zero, "z": zero}
    if dim == 2:
        elongated = max(patch_size) / min(patch_size) > ELONGATED_2D_PATCH_RATIO
        return {"x": _radians(15.0 if elongated else 180.0), "y": zero, "z": zero}
    if uses_slice_augmentation(patch_size, dim):
        return {"x": _radians(180.0), "y": zero, "z": zero}
    return {"x": _radians(30.0), "y": _radians(30.0), "z": _radians(30.0)}


def _rotated_extent(patch_size, ranges) -> np.ndarray:
    """Largest extent per axis of the patch box over rotations sampled in ``ranges``."""
    dim = len(patch_size)
    half = np.asarray(patch_size, dtype=float) / 2
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))

    def angles(interval):
        low, high = interval
        if low == high:
            return [low]
        return np.unique(np.concatenate([np.linspace(low, high, 13), [0.0]]))

    extent = np.asarray(patch_size, dtype=float)
    if dim == 2:
        for a in angles(ranges["x"]):
            c, s = np.cos(a), np.sin(a)
            rotated = corners @ np.array([[c, -s], [s, c]]).T
            extent = np.maximum(extent, 2 * np.abs(rotated).max(axis=0))
        return extent
    for ax, ay, az in itertools.product(angles(ranges["x"]), angles(ranges["y"]), angles(ranges["z"])):
        rotation = _rotation_3d(ax, ay, az)
        extent = np.maximum(extent, 2 * np.abs(corners @ rotation.T).max(axis=0))
    return extent


def _rotation_3d(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sampling_patch_size(preset, patch_size, dim, max_rotation_degrees=None) -> list:
    """Size of the patch the loader must cut so that augmentation never samples outside it."""
    _check_preset(preset)
    patch_size = [int(p) for p in patch_size]
    if preset == "none":
        return patch_size
    ranges = rotation_ranges(preset, patch_size, dim, max_rotation_degrees)
    if preset == "default":
        if uses_slice_augmentation(patch_size, dim):
            inplane = _rotated_extent(patch_size[1:], ranges) / SAMPLING_SCALE[0]
            return [patch_size[0]] + [int(np.ceil(v)) for v in inplane]
        return [int(np.ceil(v)) for v in _rotated_extent(patch_size, ranges) / SAMPLING_SCALE[0]]
    extent = _rotated_extent(patch_size, ranges) / LIGHT_SCALE[0]
    shift = 2 * np.ceil(LIGHT_SHIFT * np.asarray(patch_size))
    return [int(np.ceil(v)) for v in extent + shift]


# ----------------------------------------------------------------------------- segmentation


class FoldSlicesIntoChannels(AbstractTransform):
    """(B, C, Z, Y, X) -> (B, C*Z, Y, X) so 2D transforms treat every slice alike."""

    def __call__(self, **data_dict):
        for key in ("data", "seg"):
            array = data_dict.get(key)
            if array is not None:
                data_dict[f"_{key}_channels_depth"] = array.shape[1:3]
                data_dict[key] = array.reshape(array.shape[0], -1, *array.shape[3:])
        return data_dict


class UnfoldSlicesFromChannels(AbstractTransform):
    """Inverse of FoldSlicesIntoChannels (the in-plane size may have changed meanwhile)."""

    def __call__(self, **data_dict):
        for key in ("data", "seg"):
            array = data_dict.get(key)
            if array is not None:
                channels, depth = data_dict.pop(f"_{key}_channels_depth")
                data_dict[key] = array.reshape(array.shape[0], channels, depth, *array.shape[2:])
        return data_dict


class SegToTarget(AbstractTransform):
    """Final step: float32 contiguous data, int16 ``target`` in place of batchgenerators' ``seg``."""

    def __call__(self, **data_dict):
        data_dict["data"] = np.ascontiguousarray(data_dict["data"], dtype=np.float32)
        seg = data_dict.pop("seg", None)
        if seg is not None:
            data_dict["target"] = np.ascontiguousarray(np.rint(seg).astype(np.int16))
        return data_dict


def segmentation_transforms(preset, patch_size, dim, mirror_axes=None, max_rotation_degrees=None,
                            scale_probability=DEFAULT_SCALE_PROBABILITY, previous_stage_labels=None) -> Compose:
    """batchgenerators pipeline for ``preset`` ('default' | 'light' | 'none').

    ``mirror_axes`` (None: every axis) and ``max_rotation_degrees`` come from the plan: a
    dataset whose labels name a side (left/right) must not be mirrored across it.
    ``scale_probability``: how often the default preset zooms a sample (0.7-1.4).
    ``previous_stage_labels`` (a cascade): ``seg`` carries the previous stage's label map as its
    second channel; it moves through the spatial transforms as a label map, then becomes one
    one-hot data channel per listed label (:func:`cascade_transforms`).
    """
    _check_preset(preset)
    patch_size = [int(p) for p in patch_size]
    mirror_axes = tuple(range(dim)) if mirror_axes is None else tuple(int(a) for a in mirror_axes)
    if preset == "none":
        transforms = []
    elif preset == "light":
        transforms = _light_transforms(patch_size, dim, mirror_axes, max_rotation_degrees)
    else:
        transforms = _default_transforms(patch_size, dim, mirror_axes, max_rotation_degrees, scale_probability)
    if previous_stage_labels:
        transforms += cascade_transforms(previous_stage_labels, augment=preset != "none")
    return Compose(transforms + [SegToTarget()])


def _mirror(axes) -> list:
    return [MirrorTransform(tuple(axes))] if axes else []


def _default_transforms(patch_size, dim, mirror_axes, max_rotation_degrees, scale_probability) -> list:
    ranges = rotation_ranges("default", patch_size, dim, max_rotation_degrees)
    slices = uses_slice_augmentation(patch_size, dim)
    spatial = SpatialTransform(
        patch_size[1:] if slices else patch_size,
        patch_center_dist_from_border=None,
        do_elastic_deform=False, alpha=(0, 0), sigma=(0, 0),
        do_rotation=True, angle_x=ranges["x"], angle_y=ranges["y"], angle_z=ranges["z"],
        p_rot_per_axis=1,
        do_scale=True, scale=DEFAULT_SCALE,
        border_mode_data="constant", border_cval_data=0, order_data=3,
        border_mode_seg="constant", border_cval_seg=0, order_seg=1,
        random_crop=False,  # the loader already placed the patch
        p_el_per_sample=0, p_scale_per_sample=scale_probability, p_rot_per_sample=0.2,
        independent_scale_for_each_axis=False,
    )
    transforms = [FoldSlicesIntoChannels(), spatial, UnfoldSlicesFromChannels()] if slices else [spatial]
    transforms += [
        GaussianNoiseTransform(p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2,
                              p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5,
                                       order_downsample=0, order_upsample=3, p_per_sample=0.25,
                                       ignore_axes=(0,) if slices else None),
        GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=0.1),
        GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True,
                       p_per_sample=0.3),
    ] + _mirror(mirror_axes)
    return transforms


def _light_transforms(patch_size, dim, mirror_axes, max_rotation_degrees) -> list:
    sampled = np.asarray(sampling_patch_size("light", patch_size, dim, max_rotation_degrees), dtype=float)
    shift = np.ceil(LIGHT_SHIFT * np.asarray(patch_size))
    ranges = rotation_ranges("light", patch_size, dim, max_rotation_degrees)
    spatial = SpatialTransform(
        patch_size,
        # The centre moves uniformly within ±shift of the sampled patch's centre.
        patch_center_dist_from_border=list(sampled / 2 - shift),
        do_elastic_deform=False,
        do_rotation=True, angle_x=ranges["x"], angle_y=ranges["y"], angle_z=ranges["z"],
        do_scale=True, scale=LIGHT_SCALE,
        border_mode_data="constant", border_cval_data=0, order_data=1,
        border_mode_seg="constant", border_cval_seg=0, order_seg=1,
        random_crop=True, p_el_per_sample=0, p_scale_per_sample=1, p_rot_per_sample=1,
    )
    return [spatial] + _mirror([dim - 1] if dim - 1 in mirror_axes else [])


# ----------------------------------------------------------------------------- classification


class ClassificationAugmenter:
    """Augments a uint8 batch (B, H, W, C); returns float32 (B, H, W, C) in 0..1.

    ``__call__(images, rng)`` takes a ``numpy.random.Generator`` so workers stay reproducible.
    """

    def __init__(self, preset, input_size, crop_scale=(0.7, 1.0), aspect=(3 / 4, 4 / 3),
                 rotation_deg=30.0, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05,
                 vertical_flip=True):
        if preset not in ("default", "none"):
            raise ValueError(f"unknown classification augmentation preset {preset!r} "
                             "(known: default, none)")
        self.preset = preset
        self.input_size = [int(n) for n in input_size]
        self.crop_scale = crop_scale
        self.aspect = aspect
        self.rotation_deg = rotation_deg
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.vertical_flip = vertical_flip

    def __call__(self, images, rng=None):
        images = np.asarray(images)
        if self.preset == "none":
            return images.astype(np.float32) / 255.0
        rng = rng if rng is not None else np.random.default_rng()
        warped = np.stack([self._warp(image, rng) for image in images])
        return self._jitter(warped.astype(np.float32) / 255.0, rng)

    def affine(self, source_hw, rng):
        """PIL affine coefficients mapping output pixels to a random crop of the source."""
        height, width = source_hw
        out_h, out_w = self.input_size
        area = rng.uniform(*self.crop_scale)
        ratio = np.exp(rng.uniform(np.log(self.aspect[0]), np.log(self.aspect[1])))
        crop_w = min(1.0, np.sqrt(area * ratio)) * width
        crop_h = min(1.0, np.sqrt(area / ratio)) * height
        centre_x = rng.uniform(crop_w / 2, width - crop_w / 2)
        centre_y = rng.uniform(crop_h / 2, height - crop_h / 2)
        flip_x = -1.0 if rng.random() < 0.5 else 1.0
        flip_y = -1.0 if self.vertical_flip and rng.random() < 0.5 else 1.0
        angle = np.deg2rad(rng.uniform(-self.rotation_deg, self.rotation_deg))
        cos, sin = np.cos(angle), np.sin(angle)
        # input = centre + R @ diag(flip * crop / out) @ (output - out_centre)
        scale = np.diag([flip_x * crop_w / out_w, flip_y * crop_h / out_h])
        matrix = np.array([[cos, -sin], [sin, cos]]) @ scale
        offset = np.array([centre_x, centre_y]) - matrix @ np.array([out_w / 2, out_h / 2])
        return (matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1])

    def _warp(self, image, rng):
        out_h, out_w = self.input_size
        coefficients = self.affine(image.shape[:2], rng)
        channels = [Image.fromarray(np.ascontiguousarray(image[..., c])) for c in range(image.shape[-1])]
        if len(channels) == 3:
            warped = Image.merge("RGB", channels).transform(
                (out_w, out_h), Image.AFFINE, coefficients, resample=Image.BILINEAR)
            return np.asarray(warped)
        return np.stack([np.asarray(c.transform((out_w, out_h), Image.AFFINE, coefficients,
                                                resample=Image.BILINEAR)) for c in channels], axis=-1)

    def _jitter(self, batch, rng):
        n = batch.shape[0]

        def factors(amount):
            return rng.uniform(1 - amount, 1 + amount, size=n).astype(np.float32)

        brightness = factors(self.brightness)
        # Contrast pivots on each image's mean grey after the brightness change.
        mean_grey = brightness * _grey(batch).mean(axis=(1, 2, 3))
        contrast = factors(self.contrast)
        if batch.shape[-1] != 3:
            batch = batch * (brightness * contrast)[:, None, None, None] \
                + (mean_grey * (1 - contrast))[:, None, None, None]
            return np.clip(batch, 0.0, 1.0, out=batch)
        saturation = factors(self.saturation)
        angles = rng.uniform(-self.hue, self.hue, size=n) * 2 * np.pi
        # All four changes are linear in the pixel values, so they compose into one 3x3 matrix
        # and offset per image: one batched product instead of four passes over the batch
        # (the jitter was three quarters of a worker's time on 2 cores).
        mixing = _saturation_matrices(saturation) @ _hue_matrices(angles).transpose(0, 2, 1)
        scale = (brightness * contrast)[:, None, None] * mixing
        offset = (mean_grey * (1 - contrast))[:, None] * mixing.sum(axis=1)
        pixels = np.matmul(batch.reshape(n, -1, 3), scale.astype(np.float32))
        batch = pixels.reshape(batch.shape) + offset.astype(np.float32)[:, None, None, :]
        return np.clip(batch, 0.0, 1.0, out=batch)


_GREY_WEIGHTS = np.array(LUMA_WEIGHTS)


def _grey(batch):
    if batch.shape[-1] != 3:
        return batch.mean(axis=-1, keepdims=True)
    return (batch @ _GREY_WEIGHTS.astype(np.float32))[..., None]


_RGB_TO_YIQ = np.array([LUMA_WEIGHTS, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _saturation_matrices(factors):
    """Per-image matrices (pixels as row vectors) blending each pixel with its grey by ``factors``."""
    grey_rows = np.outer(_GREY_WEIGHTS, np.ones(3))
    return np.stack([f * np.eye(3) + (1 - f) * grey_rows for f in factors])


def _hue_matrices(angles):
    """Per-image RGB matrices rotating the chroma (I, Q) plane by ``angles``: a hue shift."""
    matrices = []
    for angle in angles:
        c, s = np.cos(angle), np.sin(angle)
        rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
        matrices.append(_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ)
    return np.asarray(matrices, dtype=np.float32)


def classification_transforms(preset, input_size) -> ClassificationAugmenter:
    """Callable ``(uint8 (B, H, W, C), rng) -> float32 (B, H, W, C)`` in 0..1.

    Presets: 'default' (see module docstring), 'light' (crop 80-100 %, ±10°, horizontal
    flip, no colour jitter), 'none' (just scaling to 0..1).
    """
    if preset == "light":
        # Keras-like: mild crop and rotation, horizontal flip only, no colour change.
        return ClassificationAugmenter("default", input_size, crop_scale=(0.8, 1.0), rotation_deg=LIGHT_ROTATION_DEG,
                                       brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                                       vertical_flip=False)
    return ClassificationAugmenter(preset, input_size)
