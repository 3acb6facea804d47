"""Augmentation presets: shapes, image/mask agreement, rotation ranges, classification jitter."""

import numpy as np
import pytest
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

from autoplan.augmentation import (
    ClassificationAugmenter,
    FoldSlicesIntoChannels,
    SegToTarget,
    UnfoldSlicesFromChannels,
    classification_transforms,
    rotation_ranges,
    sampling_patch_size,
    segmentation_transforms,
    uses_slice_augmentation,
)


def blob_batch(size, batch=3, seed=0):
    """Binary masks of random boxes; the image equals its mask."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, 1, *size), dtype=np.int16)
    for b in range(batch):
        lo = [int(rng.integers(s // 5, s // 2)) for s in size]
        hi = [lo_ + int(rng.integers(s // 4, s // 2)) for lo_, s in zip(lo, size)]
        seg[(b, 0) + tuple(slice(a, z) for a, z in zip(lo, hi))] = 1
    return {"data": seg.astype(np.float32), "seg": seg.copy()}


@pytest.mark.parametrize("preset", ["default", "light", "none"])
@pytest.mark.parametrize("patch,dim", [([24, 32, 20], 3), ([48, 40], 2), ([6, 40, 40], 3)])
def test_presets_produce_patch_sized_int16_targets(preset, patch, dim):
    np.random.seed(0)
    batch = blob_batch(sampling_patch_size(preset, patch, dim))
    out = segmentation_transforms(preset, patch, dim)(**batch)
    assert set(out) == {"data", "target"}
    assert out["data"].shape == (3, 1, *patch) and out["data"].dtype == np.float32
    assert out["target"].shape == (3, 1, *patch) and out["target"].dtype == np.int16


def spatial_only(preset, patch, dim):
    """The preset's spatial steps, forced to rotate and zoom every sample."""
    steps = []
    for step in segmentation_transforms(preset, patch, dim).transforms:
        if isinstance(step, SpatialTransform):
            step.p_rot_per_sample = step.p_scale_per_sample = 1
        if isinstance(step, (SpatialTransform, MirrorTransform, FoldSlicesIntoChannels,
                             UnfoldSlicesFromChannels, SegToTarget)):
            steps.append(step)
    return Compose(steps)


@pytest.mark.parametrize("preset", ["default", "light"])
@pytest.mark.parametrize("patch,dim", [([24, 32, 20], 3), ([48, 40], 2), ([6, 40, 40], 3)])
def test_image_and_mask_get_the_same_spatial_transform(preset, patch, dim):
    np.random.seed(1)
    batch = blob_batch(sampling_patch_size(preset, patch, dim), batch=4)
    out = spatial_only(preset, patch, dim)(**batch)
    image_as_mask = np.rint(np.clip(out["data"], 0, 1)).astype(np.int16)
    target = out["target"]
    assert target.sum() > 0.02 * target.size          # the blobs are in view
    agreement = (image_as_mask == target).mean()
    # Only boundary voxels may differ (cubic interpolation of the image, linear of the mask).
    assert agreement > 0.98, agreement
    # A mask mirrored on its own would disagree far more: the check has teeth.
    assert (image_as_mask == target[..., ::-1]).mean() < agreement


def test_rotation_ranges_and_sampling_size():
    assert rotation_ranges("default", [224, 224], 2)["x"][1] == pytest.approx(np.pi)
    assert rotation_ranges("default", [512, 128], 2)["x"][1] == pytest.approx(np.deg2rad(15))
    assert rotation_ranges("default", [40, 56, 40], 3)["y"][1] == pytest.approx(np.deg2rad(30))
    assert uses_slice_augmentation([6, 40, 40], 3) and not uses_slice_augmentation([40, 56, 40], 3)
    assert rotation_ranges("default", [6, 40, 40], 3)["y"] == (0.0, 0.0)
    assert sampling_patch_size("none", [40, 56, 40], 3) == [40, 56, 40]
    size = sampling_patch_size("default", [224, 224], 2)
    assert size[0] >= int(224 * np.sqrt(2)) and size[0] == size[1]
    assert sampling_patch_size("default", [6, 40, 40], 3)[0] == 6
    with pytest.raises(ValueError):
        segmentation_transforms("heavy", [8, 8], 2)


def test_classification_identity_warp_and_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 20, 24, 3), dtype=np.uint8)
    plain = classification_transforms("none", (20, 24))(images)
    np.testing.assert_allclose(plain, images / 255.0, atol=1e-6)
    flips_only = ClassificationAugmenter("default", (20, 24), crop_scale=(1, 1), aspect=(1, 1), rotation_deg=0,
                                         brightness=0, contrast=0, saturation=0, hue=0)
    out = np.rint(flips_only(images, np.random.default_rng(3)) * 255).astype(np.uint8)
    seen = set()
    for original, warped in zip(images, out):
        candidates = {"same": original, "h": original[:, ::-1], "v": original[::-1], "hv": original[::-1, ::-1]}
        matches = [name for name, c in candidates.items() if np.array_equal(c, warped)]
        assert matches, "the warp is not a pure flip"
        seen.update(matches)
    assert len(seen) >= 2


def test_classification_default_is_reproducible_and_in_range():
    images = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    augment = classification_transforms("default", (28, 28))
    first = augment(images, np.random.default_rng(7))
    again = augment(images, np.random.default_rng(7))
    other = augment(images, np.random.default_rng(8))
    assert first.shape == (4, 28, 28, 3) and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    grey = classification_transforms("default", (16, 16))(images[..., :1], np.random.default_rng(0))
    assert grey.shape == (4, 16, 16, 1)


def _jitter_one_change_at_a_time(batch, rng, amount=0.2, hue=0.05):
    """Reference: brightness, contrast about the mean grey, saturation, hue rotation in turn."""
    from autoplan.augmentation import _grey, _hue_matrices

    n = batch.shape[0]

    def factors():
        return rng.uniform(1 - amount, 1 + amount, size=(n, 1, 1, 1)).astype(np.float32)

    batch = batch * factors()
    mean = _grey(batch).mean(axis=(1, 2, 3), keepdims=True)
    batch = (batch - mean) * factors() + mean
    grey = _grey(batch)
    batch = grey + (batch - grey) * factors()
    angles = rng.uniform(-hue, hue, size=n) * 2 * np.pi
    batch = np.einsum("bhwc,bdc->bhwd", batch, _hue_matrices(angles))
    return np.clip(batch, 0.0, 1.0)


def test_colour_jitter_as_one_matrix_equals_the_changes_in_turn():
    images = np.random.default_rng(4).random((5, 12, 16, 3), dtype=np.float32)
    augmenter = ClassificationAugmenter("default", (12, 16))
    composed = augmenter._jitter(images.copy(), np.random.default_rng(9))
    reference = _jitter_one_change_at_a_time(images.copy(), np.random.default_rng(9))
    np.testing.assert_allclose(composed, reference, atol=1e-5)
    assert not np.allclose(composed, images, atol=1e-2)     # it did change the colours

