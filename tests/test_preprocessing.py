"""Preprocessing: crop, normalise, resample, revert, the resumable cache, classification images."""

import json
import os
import time

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_dataset

from autoplan.datasets import load_dataset
from autoplan.errors import InputError
from autoplan.io.images import ImageData
from autoplan.planning import Configuration, Plan
from autoplan.preprocessing import (
    CaseProperties,
    crop_to_nonzero,
    load_classification_image,
    normalize_classification_batch,
    preprocess_case,
    preprocess_dataset,
    revert_to_original,
)
from autoplan.preprocessing.cache import open_case_arrays

def make_configuration(name="3d_fullres", dim=3, spacing=(1.0, 1.0, 1.0), normalization=None,
                       patch_size=(16, 16, 16), n_channels=1, n_outputs=3):
    return Configuration(
        name=name, dim=dim, patch_size=list(patch_size), batch_size=2, spacing=list(spacing),
        network={}, normalization=normalization or [{"scheme": "zscore"}] * n_channels,
        estimated_memory_gb=0.1, epochs=1, iterations_per_epoch=1,
        n_input_channels=n_channels, n_outputs=n_outputs,
    )


def make_plan(name, configuration):
    return Plan(dataset=name, task_type="segmentation", device="cpu", gpu_memory_gb=None,
                time_budget_minutes=None, configurations={configuration.name: configuration},
                default_configuration=configuration.name)


def synthetic_case(shape=(20, 30, 28), seed=0):
    """Image with a zero border (to be cropped) and two labelled blobs inside."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    image[2:-3, 4:-2, 1:-5] = rng.normal(100, 20, size=(shape[0] - 5, shape[1] - 6, shape[2] - 6))
    seg = np.zeros(shape, dtype=np.int16)
    seg[5:10, 8:16, 6:14] = 1
    seg[10:14, 14:22, 10:18] = 2
    return image, seg


def one_hot(seg, n):
    return np.stack([(seg == k) for k in range(n)]).astype(np.float32)


# ----------------------------------------------------------------------------- single case


def test_crop_to_nonzero_box_and_all_zero_image():
    image, seg = synthetic_case()
    data, cropped_seg, bbox = crop_to_nonzero(image[None], seg[None])
    assert bbox == [[2, 17], [4, 28], [1, 23]]
    assert data.shape == (1, 15, 24, 22) and cropped_seg.shape == (1, 15, 24, 22)
    assert cropped_seg.sum() == seg.sum()
    data, _, bbox = crop_to_nonzero(np.zeros((1, 4, 5)))
    assert bbox == [[0, 4], [0, 5]] and data.shape == (1, 4, 5)


def test_preprocess_case_identity_spacing_roundtrips_exactly():
    image, seg = synthetic_case()
    configuration = make_configuration()
    data, pre_seg, properties = preprocess_case(
        ImageData(array=image[None], spacing=(1.0, 1.0, 1.0)), seg, configuration, "c1")
    assert data.dtype == np.float32 and pre_seg.dtype == np.int16
    assert data.shape == (1, 15, 24, 22) and pre_seg.shape == (1, 15, 24, 22)
    assert properties.original_shape == [20, 30, 28]
    assert properties.shape_after_resampling == properties.shape_after_crop == [15, 24, 22]
    assert abs(float(data.mean())) < 1e-4 and abs(float(data.std()) - 1) < 1e-3
    # foreground locations: real voxels of their label
    for label, coords in properties.class_locations.items():
        coords = np.asarray(coords)
        assert len(coords) == (seg == int(label)).sum()
        assert (pre_seg[0][tuple(coords.T)] == int(label)).all()
    back = revert_to_original(one_hot(pre_seg[0], 3), properties, configuration)
    assert back.shape == (3, 20, 30, 28) and back.dtype == np.float32
    np.testing.assert_array_equal(back.argmax(0), seg)
    # properties survive JSON
    assert CaseProperties.from_dict(json.loads(json.dumps(properties.to_dict()))) == properties


def test_resampling_anisotropic_and_back_is_close():
    image, seg = synthetic_case(shape=(20, 40, 40))
    configuration = make_configuration(spacing=(1.0, 1.0, 1.0))
    source = ImageData(array=image[None], spacing=(4.0, 1.0, 1.0))  # 4 mm slices: anisotropic
    data, pre_seg, properties = preprocess_case(source, seg, configuration)
    z, y, x = properties.shape_after_crop
    assert properties.shape_after_resampling == [4 * z, y, x]
    # along the coarse axis nearest neighbour: every slice is repeated 4 times
    np.testing.assert_array_equal(data[0, 0], data[0, 1])
    np.testing.assert_array_equal(pre_seg[0, 4], pre_seg[0, 5])
    assert set(np.unique(pre_seg)) == {0, 1, 2}
    back = revert_to_original(one_hot(pre_seg[0], 3), properties, configuration).argmax(0)
    for label in (1, 2):
        overlap = 2 * ((back == label) & (seg == label)).sum() / ((back == label).sum() + (seg == label).sum())
        assert overlap > 0.9


def test_resampling_isotropic_changes_grid_and_returns():
    image, seg = synthetic_case(shape=(20, 30, 28))
    configuration = make_configuration(spacing=(1.5, 1.5, 1.5))
    data, pre_seg, properties = preprocess_case(ImageData(array=image[None], spacing=(1.0, 1.0, 1.0)),
                                                seg, configuration)
    assert properties.shape_after_resampling == [10, 16, 15]
    assert data.shape[1:] == pre_seg.shape[1:] == (10, 16, 15)
    back = revert_to_original(one_hot(pre_seg[0], 3), properties, configuration).argmax(0)
    for label in (1, 2):
        overlap = 2 * ((back == label) & (seg == label)).sum() / ((back == label).sum() + (seg == label).sum())
        assert overlap > 0.8


def test_normalization_schemes():
    yy, xx = np.mgrid[:12, :12]
    disc = (yy - 6) ** 2 + (xx - 6) ** 2 < 20          # corners of its bounding box stay zero
    values = np.where(disc, yy * 3.0 + xx + 10, 0).astype(np.float32)[None]
    nonzero = make_configuration(dim=2, spacing=(1, 1), normalization=[{"scheme": "zscore_nonzero"}])
    data, _, properties = preprocess_case(ImageData(array=values, spacing=(1, 1)), None, nonzero)
    window = tuple(slice(lo, hi) for lo, hi in properties.crop_bbox)
    inside = disc[window]
    assert (~inside).any()
    assert abs(data[0][inside].mean()) < 1e-5 and abs(data[0][inside].std() - 1) < 1e-4
    assert (data[0][~inside] == 0).all()
    values = np.zeros((1, 10, 10), dtype=np.float32)
    values[0, 2:8, 2:8] = np.arange(36).reshape(6, 6) - 10     # -10..25, clipped to 0..20

    ct = make_configuration(dim=2, spacing=(1, 1),
                            normalization=[{"scheme": "ct", "clip": [0, 20], "mean": 10, "std": 5}])
    data, _, _ = preprocess_case(ImageData(array=values, spacing=(1, 1)), None, ct)
    assert data.max() == pytest.approx(2.0) and data.min() == pytest.approx(-2.0)

    rgb = make_configuration(dim=2, spacing=(1, 1), n_channels=3,
                             normalization=[{"scheme": "rgb", "mean": 0.5, "std": 0.25}] * 3)
    pixels = np.full((3, 4, 4), 255, dtype=np.uint8)
    data, _, properties = preprocess_case(ImageData(array=pixels, spacing=(1.0, 1.0)), None, rgb)
    np.testing.assert_allclose(data, 2.0)
    assert properties.shape_after_resampling == [4, 4]  # spacing 1,1: no resampling

    with pytest.raises(InputError):
        preprocess_case(ImageData(array=values, spacing=(1, 1)), None, rgb)  # 1 channel, 3 expected


def test_mask_shape_mismatch_is_input_error():
    with pytest.raises(InputError, match="does not match"):
        preprocess_case(ImageData(array=np.ones((1, 4, 5, 6)), spacing=(1, 1, 1)),
                        np.zeros((4, 5, 7), dtype=np.int16), make_configuration())


# ----------------------------------------------------------------------------- dataset cache


def write_nifti(array, path, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(image, str(path))


def synthetic_dataset(root, n=3, labels=None, mask_shape=None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        image, seg = synthetic_case(seed=i)
        write_nifti(image, root / "imagesTr" / f"case{i}_0000.nii.gz")
        if mask_shape is not None and i == n - 1:
            seg = np.zeros(mask_shape, dtype=np.int16)
        write_nifti(seg.astype(np.uint8), root / "labelsTr" / f"case{i}.nii.gz")
    description = {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "a": 1, "b": 2},
                   "numTraining": n, "file_ending": ".nii.gz", "task_type": "segmentation", "name": root.name}
    (root / "dataset.json").write_text(json.dumps(description))
    return load_dataset(root)


def test_preprocess_dataset_writes_cache_and_resumes(tmp_path):
    dataset = synthetic_dataset(tmp_path / "raw" / "Synth")
    configuration = make_configuration()
    out = preprocess_dataset(dataset, make_plan("Synth", configuration), "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert out == tmp_path / "pre" / "Synth" / "3d_fullres"
    data, seg = (array[:] for array in open_case_arrays(out, "case0"))
    assert data.dtype == np.float32 and seg.dtype == np.uint8 and data.shape == (1, 15, 24, 22)
    assert seg.shape == (1, 15, 24, 22)
    properties = CaseProperties.load(out / "case0.json")
    assert properties.stamp and properties.crop_bbox == [[2, 17], [4, 28], [1, 23]]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    preprocess_dataset(dataset, make_plan("Synth", configuration), "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # A killed run may leave arrays without properties: that case (only) is redone.
    (out / "case1.json").unlink()
    preprocess_dataset(dataset, make_plan("Synth", configuration), "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert (out / "case1.json").is_file()
    assert (out / "case0.b2nd").stat().st_mtime_ns == mtimes["case0.b2nd"]

    # A changed source file or configuration invalidates the stamp.
    source = dataset.cases[2].images[0]
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    preprocess_dataset(dataset, make_plan("Synth", configuration), "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert (out / "case2.b2nd").stat().st_mtime_ns != mtimes["case2.b2nd"]
    assert (out / "case0.b2nd").stat().st_mtime_ns == mtimes["case0.b2nd"]
    coarse = make_configuration(spacing=(2.0, 2.0, 2.0))
    preprocess_dataset(dataset, make_plan("Synth", coarse), "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert open_case_arrays(out, "case0")[0].shape == (1, 8, 12, 11)


def test_cache_round_trip_is_exact_and_masks_are_uint8(tmp_path):
    """What the loader reads back is what preprocessing computed: the image bit for bit
    (lossless compression), the mask value for value in the smallest type."""
    from autoplan.io import read_case_images, read_case_labels

    dataset = synthetic_dataset(tmp_path / "raw" / "Synth", n=2)
    configuration = make_configuration()
    out = preprocess_dataset(dataset, make_plan("Synth", configuration), "3d_fullres", tmp_path / "pre", n_jobs=1)
    case = dataset.cases[1]
    image = read_case_images(case)
    expected_data, expected_seg, _ = preprocess_case(image, read_case_labels(case, image, [0, 1, 2]),
                                                     configuration, case.id)
    data, seg = open_case_arrays(out, case.id)
    np.testing.assert_array_equal(data[:], expected_data)
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg[:], expected_seg)
    assert data.chunks[1:] == (15, 16, 16)       # a chunk is at most one patch
    # Compressed files, and no leftover uncompressed ones.
    assert not list(out.glob("*.npy"))
    assert (out / f"{case.id}.b2nd").stat().st_size < expected_data.nbytes


def test_masks_with_label_ids_above_255_keep_int16(tmp_path):
    from autoplan.preprocessing.cache import mask_dtype, save_case_arrays

    seg = np.zeros((1, 4, 5, 6), np.int16)
    seg[0, 1, 2, 3] = 300
    assert mask_dtype(seg) == np.int16 and mask_dtype(np.minimum(seg, 255)) == np.uint8
    save_case_arrays(tmp_path, "big", np.zeros((1, 4, 5, 6), np.float32), seg, [4, 4, 4])
    stored = open_case_arrays(tmp_path, "big")[1]
    assert stored.dtype == np.int16 and stored[0, 1, 2, 3] == 300


def test_storage_layout_chunks_by_patch():
    from autoplan.preprocessing.cache import BLOCK_BYTES, storage_layout

    chunks, blocks = storage_layout((1, 120, 320, 320), 4, [64, 160, 160])
    assert chunks == (1, 64, 160, 160) and np.prod(blocks) * 4 <= BLOCK_BYTES
    assert all(c % b == 0 or c < 2 * b for c, b in zip(chunks, blocks))
    assert storage_layout((2, 35, 50, 35), 4, [40, 56, 40])[0] == (1, 35, 50, 35)   # patch > image
    assert storage_layout((1, 90, 512, 512), 4, [224, 224])[0] == (1, 1, 224, 224)  # 2D patch, volume


def test_version_1_cache_is_read_then_rebuilt(tmp_path, monkeypatch):
    """A cache of version 1 (float32 and int16 .npy) still loads, and preprocessing redoes it
    into the compressed layout and removes the .npy files instead of trusting its stamp."""
    from autoplan.loading import SegmentationLoader
    from autoplan.preprocessing import cache

    dataset = synthetic_dataset(tmp_path / "raw" / "Synth", n=2)
    configuration = make_configuration()
    plan = make_plan("Synth", configuration)
    out = preprocess_dataset(dataset, plan, "3d_fullres", tmp_path / "pre", n_jobs=1)
    arrays = {case.id: [a[:] for a in open_case_arrays(out, case.id)] for case in dataset.cases}
    with monkeypatch.context() as patched:          # turn the cache into what version 1 wrote
        patched.setattr(cache, "CACHE_VERSION", 1)
        for case in dataset.cases:
            data, seg = arrays[case.id]
            np.save(out / f"{case.id}.npy", data)
            np.save(out / f"{case.id}_seg.npy", seg.astype(np.int16))
            for suffix in (".b2nd", "_seg.b2nd"):
                (out / f"{case.id}{suffix}").unlink()
            properties = CaseProperties.load(out / f"{case.id}.json")
            properties.stamp = cache.preprocessing_stamp(configuration, cache._case_sources(case))
            properties.save(out / f"{case.id}.json")
    ids = [case.id for case in dataset.cases]
    with SegmentationLoader(out, ids, configuration, augment="none", n_workers=0) as loader:
        assert next(loader)["data"].shape == (2, 1, 16, 16, 16)
    preprocess_dataset(dataset, plan, "3d_fullres", tmp_path / "pre", n_jobs=1)
    assert not list(out.glob("*.npy")) and len(list(out.glob("*_seg.b2nd"))) == 2
    for case in dataset.cases:
        np.testing.assert_array_equal(open_case_arrays(out, case.id)[0][:], arrays[case.id][0])


def test_preprocess_dataset_rejects_bad_masks(tmp_path):
    dataset = synthetic_dataset(tmp_path / "a" / "Bad", mask_shape=(20, 30, 27))
    with pytest.raises(InputError, match="does not match"):
        preprocess_dataset(dataset, make_plan("Bad", make_configuration()), "3d_fullres", tmp_path / "pre",
                           n_jobs=1)
    dataset = synthetic_dataset(tmp_path / "b" / "Undeclared", labels={"background": 0, "a": 1})
    with pytest.raises(InputError, match="not declared"):
        preprocess_dataset(dataset, make_plan("Undeclared", make_configuration()), "3d_fullres",
                           tmp_path / "pre", n_jobs=1)


def hippocampus_subset(root, n):
    source = shared_dataset("hippocampus")
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for path in sorted((source / "imagesTr").glob("*.nii.gz"))[:n]:
        case_id = path.name[: -len(".nii.gz")]
        (root / "imagesTr" / f"{case_id}_0000.nii.gz").symlink_to(path)
        (root / "labelsTr" / path.name).symlink_to(source / "labelsTr" / path.name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
        "numTraining": n, "file_ending": ".nii.gz", "task_type": "segmentation", "name": "Hippocampus"}))
    return load_dataset(root)


@pytest.mark.realdata
def test_hippocampus_subset_preprocesses_and_skips_second_time(tmp_path, monkeypatch):
    """The second run does no work: it rewrites no file and parses no CASE.json whole (the
    location lists can be MBs); counted, not timed, so a loaded machine cannot fail it."""
    from autoplan.io.images import read_image
    from autoplan.preprocessing import cache

    dataset = hippocampus_subset(tmp_path / "raw" / "Hippocampus", 20)
    configuration = make_configuration(patch_size=(40, 56, 40))
    plan = make_plan("Hippocampus", configuration)
    out = preprocess_dataset(dataset, plan, "3d_fullres", tmp_path / "pre", n_jobs=2)
    assert len(list(out.glob("*_seg.b2nd"))) == 20
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    parsed = []
    monkeypatch.setattr(cache, "read_json", lambda path: parsed.append(path))
    preprocess_dataset(dataset, plan, "3d_fullres", tmp_path / "pre", n_jobs=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert parsed == []
    # A real case goes back onto its original grid exactly.
    case = dataset.cases[0]
    properties = CaseProperties.load(out / f"{case.id}.json")
    seg = open_case_arrays(out, case.id)[1][0]
    original = read_image(case.label).array[0]
    back = revert_to_original(one_hot(seg, 3), properties, configuration).argmax(0)
    np.testing.assert_array_equal(back, original)
    assert set(properties.class_locations) == {"1", "2"}


# ----------------------------------------------------------------------------- classification


def classification_dataset(root):
    (root / "imagesTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(5):
        pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "imagesTr" / f"img{i}_0000.png")
        cases.append({"case": f"img{i}", "label": ["cat", "dog"][i % 2], "group": f"g{i // 2}"})
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".png", "task_type": "classification",
        "classes": ["cat", "dog"], "cases": cases, "name": root.name, "numTraining": 5}))
    return load_dataset(root)


def test_classification_cache(tmp_path):
    dataset = classification_dataset(tmp_path / "raw" / "Pets")
    configuration = make_configuration(
        name="classifier", dim=2, spacing=(), patch_size=(24, 32), n_channels=3,
        normalization=[{"scheme": "rgb", "mean": 0.5, "std": 0.25}] * 3)
    plan = make_plan("Pets", configuration)
    out = preprocess_dataset(dataset, plan, "classifier", tmp_path / "pre", n_jobs=1)
    images = np.load(out / "images.npy")
    index = json.loads((out / "index.json").read_text())
    assert images.shape == (5, 24, 32, 3) and images.dtype == np.uint8
    assert index["cases"] == [f"img{i}" for i in range(5)]
    assert index["labels"] == [0, 1, 0, 1, 0] and index["classes"] == ["cat", "dog"]
    assert index["groups"] == ["g0", "g0", "g1", "g1", "g2"]
    from autoplan.io.images import read_image

    single = load_classification_image(read_image(dataset.cases[3].images[0]), configuration)
    np.testing.assert_array_equal(single, images[3])
    mtime = (out / "images.npy").stat().st_mtime_ns
    preprocess_dataset(dataset, plan, "classifier", tmp_path / "pre", n_jobs=1)
    assert (out / "images.npy").stat().st_mtime_ns == mtime
    batch = normalize_classification_batch(images[:2], configuration)
    assert batch.shape == (2, 3, 24, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1, 2], (images[1, ..., 2] / 255.0 - 0.5) / 0.25, atol=1e-5)
    grey = load_classification_image(ImageData(array=np.full((1, 10, 10), 7, np.uint8), spacing=(1, 1)),
                                     configuration)
    assert grey.shape == (24, 32, 3) and (grey == 7).all()


@pytest.mark.parametrize("shape, new_shape", [((3, 40, 56), (97, 31)), ((2, 9, 12, 15), (5, 20, 31))])
def test_linear_resampling_through_torch_equals_ndimage_zoom(shape, new_shape):
    """revert_to_original's fast path gives the values of the spline path it replaced."""
    from scipy import ndimage

    from autoplan.preprocessing import resample

    data = np.random.default_rng(0).random(shape).astype(np.float32)
    expected = np.stack([ndimage.zoom(c, [n / o for n, o in zip(new_shape, c.shape)], order=1,
                                      mode="nearest", grid_mode=True) for c in data])
    np.testing.assert_allclose(resample(data, new_shape, order=1), expected, atol=1e-5)


@pytest.mark.parametrize("shape, new_shape", [((20, 30, 40), (10, 15, 20)), ((17, 33, 29), (40, 20, 60)),
                                              ((9, 64, 70), (30, 64, 70)), ((3, 3, 3), (7, 2, 5)),
                                              ((37, 23), (12, 70)), ((20,), (9,))])
def test_cubic_resampling_axis_by_axis_equals_scipy_zoom(shape, new_shape, monkeypatch):
    """One axis at a time, a few lines at a time, gives scipy's zoom of the whole image
    (separable spline), so the memory-bounded path changes no preprocessed value."""
    from scipy import ndimage

    from autoplan.preprocessing import resampling

    monkeypatch.setattr(resampling, "ZOOM_CHUNK_VALUES", 97)     # many column blocks, ragged last one
    values = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    expected = ndimage.zoom(values, [n / o for n, o in zip(new_shape, shape)], order=3, mode="nearest",
                            grid_mode=True)
    got = resampling._zoom_volume(values, new_shape, 3)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_mean_and_std_equal_numpy(with_mask, monkeypatch):
    from autoplan.preprocessing import normalization

    monkeypatch.setattr(normalization, "STATISTICS_CHUNK_VALUES", 50)
    values = (1000 + 3 * np.random.default_rng(2).normal(size=(13, 7, 11))).astype(np.float32)
    mask = values > 1001 if with_mask else None
    inside = values[mask] if with_mask else values
    mean, std = normalization.mean_and_std(values, mask)
    assert mean == pytest.approx(inside.astype(np.float64).mean(), rel=1e-12)
    assert std == pytest.approx(inside.astype(np.float64).std(), rel=1e-9)


def test_preprocess_case_leaves_the_callers_float32_array_alone():
    """Normalisation works in place on preprocessing's own copy, never on the image it was given."""
    pixels = np.random.default_rng(3).normal(5, 2, (1, 12, 14, 10)).astype(np.float32)
    before = pixels.copy()
    configuration = make_configuration(normalization=[{"scheme": "zscore"}])
    data, _, _ = preprocess_case(ImageData(array=pixels, spacing=(1.0, 1.0, 1.0)), None, configuration)
    np.testing.assert_array_equal(pixels, before)
    assert abs(float(data.mean())) < 1e-5 and float(data.std()) == pytest.approx(1.0, abs=1e-4)
