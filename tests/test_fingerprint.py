"""autoplan.fingerprint: hand-checked synthetic values, caching, and real-data subsets."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_dataset

from autoplan.datasets import load_dataset
from autoplan.errors import InputError
from autoplan.fingerprint import (
    ANALYSERS,
    Fingerprint,
    LabelStats,
    fingerprint_dataset,
    format_fingerprint_summary,
    full_component_count,
    intensity_percentiles,
)
from autoplan.fingerprint.segmentation import component_sizes
from autoplan.paths import fingerprint_file


def write_volume(array, path, spacing_zyx):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_dataset_json(root, **entries):
    description = {"channel_names": {"0": "image"}, "file_ending": ".nii.gz", **entries}
    (root / "dataset.json").write_text(json.dumps(description))


SPACING = (3.0, 1.0, 0.5)  # z, y, x: a voxel is 1.5 mm^3


@pytest.fixture
def synthetic(tmp_path):
    """Two 3D cases whose fingerprint values are worked out by hand below."""
    root = tmp_path / "raw" / "Synthetic"
    # Case a (6, 8, 10): nonzero box [1:5, 2:7, 3:9] -> cropped (4, 5, 6), relative size 0.25.
    image = np.zeros((6, 8, 10), np.int16)
    image[1:5, 2:7, 3:9] = 50
    seg = np.zeros((6, 8, 10), np.uint8)
    seg[1, 2, 3:5] = 1          # label 1, component of 2 voxels
    seg[3, 5, 7] = 1            # label 1, component of 1 voxel
    seg[2:4, 3:5, 5] = 2        # label 2, component of 4 voxels
    image[seg == 1] = 10
    image[seg == 2] = 30
    write_volume(image, root / "imagesTr" / "a_0000.nii.gz", SPACING)
    write_volume(seg, root / "labelsTr" / "a.nii.gz", SPACING)
    # Case b (4, 6, 8): nonzero everywhere -> cropped = full shape; label 1 only, 3 voxels.
    image = np.full((4, 6, 8), 5, np.int16)
    seg = np.zeros((4, 6, 8), np.uint8)
    seg[0, 0, 0:3] = 1
    image[seg == 1] = 20
    write_volume(image, root / "imagesTr" / "b_0000.nii.gz", SPACING)
    write_volume(seg, root / "labelsTr" / "b.nii.gz", SPACING)
    write_dataset_json(root, labels={"background": 0, "one": 1, "two": 2}, numTraining=2)
    return load_dataset(root)


def test_synthetic_values_by_hand(synthetic, tmp_path):
    fp = fingerprint_dataset(synthetic, tmp_path / "results", n_jobs=1)
    assert (fp.dim, fp.axis_order, fp.n_cases, fp.case_ids) == (3, ["z", "y", "x"], 2, ["a", "b"])
    assert fp.shapes == [[6, 8, 10], [4, 6, 8]]
    assert fp.median_shape == [5, 7, 9]
    assert fp.median_spacing == [3.0, 1.0, 0.5]
    assert fp.anisotropy == pytest.approx(6.0)
    assert fp.cropped_shapes == [[4, 5, 6], [4, 6, 8]]
    assert fp.median_cropped_shape == [4, 5.5, 7]
    assert fp.median_relative_size_after_cropping == pytest.approx((0.25 + 1.0) / 2)
    assert fp.total_voxels == 480 + 192
    assert fp.per_case_intensity_max == [50, 20]
    assert fp.intensity_scales_differ is False

    # Each case weighs the same (nnU-Net's equal per-case sample): a = {10 x3, 30 x4}, b = {20 x3}.
    stats = fp.intensity[0]
    assert stats.mean == pytest.approx(0.5 * 150 / 7 + 0.5 * 20)
    second_moment = 0.5 * (3 * 100 + 4 * 900) / 7 + 0.5 * 400
    assert stats.std == pytest.approx(np.sqrt(second_moment - stats.mean ** 2))
    assert (stats.min, stats.median, stats.max) == (10, 20, 30)
    assert (stats.percentile_00_5, stats.percentile_99_5) == (10, 30)

    one, two = fp.labels["1"], fp.labels["2"]
    assert (one.name, two.name) == ("one", "two")
    assert one.voxel_fraction == pytest.approx(6 / 672)
    assert two.voxel_fraction == pytest.approx(4 / 672)
    assert (one.case_fraction, two.case_fraction) == (1.0, 0.5)
    assert one.components_per_case_median == 1.5      # a: 2 components, b: 1
    assert one.components_per_case_max == 2
    assert one.component_size_median_voxels == 2       # sizes 2, 1, 3
    assert one.component_size_median_mm == pytest.approx(3.0)
    assert (two.components_per_case_median, two.component_size_median_voxels) == (1, 4)
    assert two.component_size_median_mm == pytest.approx(6.0)
    assert fp.foreground_fraction == pytest.approx(10 / 672)
    assert fp.background_foreground_ratio == pytest.approx(662 / 10)
    assert fp.channels[0].kind == "mr" and "not CT" in fp.channels[0].kind_reason
    assert any("anisotropic" in note for note in fp.notes)
    assert any("absent from 50% of cases" in note for note in fp.notes)

    summary = format_fingerprint_summary(fp)
    assert "3D, 2 cases" in summary and "(z,y,x)" in summary and "1 one:" in summary

    # Per-case summaries for prediction's quality flags (whole images, not the crop).
    assert fp.source_formats == ["nifti"]
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(synthetic.root / "imagesTr" / f"{c}_0000.nii.gz")))
            for c in "ab")
    assert fp.per_case_intensity_percentiles == [[np.percentile(x, [0.5, 50, 99.5]).tolist()] for x in (a, b)]
    assert fp.per_case_label_fractions == [{"1": 3 / 480, "2": 4 / 480}, {"1": 3 / 192, "2": 0.0}]
    # Full connectivity: case a's label-1 pieces touch nowhere, not even diagonally.
    assert fp.per_case_label_components == [{"1": 2, "2": 1}, {"1": 1, "2": 0}]


def test_json_round_trip(synthetic, tmp_path):
    fp = fingerprint_dataset(synthetic, tmp_path / "results", n_jobs=1)
    path = fingerprint_file(tmp_path / "results", "Synthetic")
    assert Fingerprint.load(path) == fp
    fp.save(tmp_path / "copy.json")
    assert Fingerprint.load(tmp_path / "copy.json") == fp
    assert isinstance(Fingerprint.load(path).labels["1"], LabelStats)


def test_cache_hit_and_miss(synthetic, tmp_path, monkeypatch):
    results = tmp_path / "results"
    first = fingerprint_dataset(synthetic, results, n_jobs=1)

    calls = []
    real = ANALYSERS["segmentation"]
    monkeypatch.setitem(ANALYSERS, "segmentation", lambda *args: calls.append(1) or real(*args))
    assert fingerprint_dataset(synthetic, results, n_jobs=1) == first
    assert calls == []                                    # unchanged files: cached
    fingerprint_dataset(synthetic, results, force=True, n_jobs=1)
    assert calls == [1]                                   # force recomputes

    # Change one case file: a larger label in case b.
    seg = np.zeros((4, 6, 8), np.uint8)
    seg[0, 0, 0:5] = 1
    label_path = synthetic.root / "labelsTr" / "b.nii.gz"
    write_volume(seg, label_path, SPACING)
    os.utime(label_path, ns=(1, 1))  # a distinct mtime even on coarse-clock file systems
    changed = fingerprint_dataset(synthetic, results, n_jobs=1)
    assert calls == [1, 1]
    assert changed.source_hash != first.source_hash
    assert changed.labels["1"].voxel_count == 8


def test_bad_input_names_the_file(synthetic, tmp_path):
    seg = np.zeros((4, 6, 8), np.uint8)
    seg[0, 0, 0] = 7
    write_volume(seg, synthetic.root / "labelsTr" / "b.nii.gz", SPACING)
    for n_jobs in (1, 2):  # the error must also come back from a worker process
        with pytest.raises(InputError, match="values 7") as error:
            fingerprint_dataset(synthetic, tmp_path / "results", n_jobs=n_jobs)
        assert error.value.path.name == "b.nii.gz"

    (synthetic.root / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(InputError, match="missing"):
        fingerprint_dataset(synthetic, tmp_path / "results", n_jobs=1)


def test_unlabelled_dataset(synthetic, tmp_path):
    """Imported studies without masks (DICOM for prediction): geometry only, and said so."""
    write_dataset_json(synthetic.root, labels={"background": 0, "one": 1}, unlabelled=True)
    fp = fingerprint_dataset(load_dataset(synthetic.root), tmp_path / "results", n_jobs=1)
    assert fp.shapes == [[6, 8, 10], [4, 6, 8]] and fp.cropped_shapes == [[4, 5, 6], [4, 6, 8]]
    assert fp.intensity == [None] and fp.foreground_fraction == 0
    assert fp.per_case_label_fractions == [None, None] and fp.per_case_label_components == [None, None]
    assert fp.labels["1"].case_fraction == 0
    assert fp.notes[0].startswith("2 of 2 cases have no mask")
    assert Fingerprint.load(fingerprint_file(tmp_path / "results", "Synthetic")) == fp
    assert "no foreground voxels" in format_fingerprint_summary(fp)


@pytest.mark.parametrize("dtype, low, high", [(np.uint8, 0, 256), (np.uint16, 3, 9), (np.int16, -1024, 3072),
                                             (np.int32, -(1 << 22), 1 << 22), (np.float32, -5, 5), (bool, 0, 2)])
def test_intensity_percentiles_agree_with_numpy(dtype, low, high):
    """Histogram counting (integers over a small range) and sorting give np.percentile's values."""
    values = np.random.default_rng(0).integers(low, high, size=(2, 37, 41)).astype(dtype)
    expected = np.percentile(values.reshape(2, -1).astype(np.float64), [0.5, 50, 99.5], axis=1).T
    np.testing.assert_allclose(intensity_percentiles(values), expected, rtol=1e-12)


def test_full_component_count_joins_diagonal_neighbours():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = mask[4, 4] = True
    assert full_component_count(mask) == 2
    assert component_sizes(mask) == [1, 1, 1]  # face connectivity: three


def test_older_fingerprints_load_without_the_per_case_fields(synthetic, tmp_path):
    fp = fingerprint_dataset(synthetic, tmp_path / "results", n_jobs=1)
    path = fingerprint_file(tmp_path / "results", "Synthetic")
    stored = json.loads(path.read_text())
    for name in ("source_formats", "per_case_intensity_percentiles", "per_case_label_fractions",
                 "per_case_label_components"):
        del stored[name]
    old = Fingerprint.from_dict(stored)
    assert old.per_case_intensity_percentiles is None and old.labels == fp.labels


def test_ct_guessed_from_hounsfield_units(tmp_path):
    root = tmp_path / "CT"
    image = np.full((5, 6, 7), -1024, np.int16)
    image[1:4, 2:5, 2:5] = 40
    seg = (image == 40).astype(np.uint8)
    write_volume(image, root / "imagesTr" / "c_0000.nii.gz", (2.5, 0.8, 0.8))
    write_volume(seg, root / "labelsTr" / "c.nii.gz", (2.5, 0.8, 0.8))
    write_dataset_json(root, labels={"background": 0, "organ": 1})
    fp = fingerprint_dataset(load_dataset(root), tmp_path / "results", n_jobs=1)
    assert fp.channels[0].kind == "ct" and "Hounsfield" in fp.channels[0].kind_reason
    # -1024 is nonzero: nothing is cropped, as in nnU-Net.
    assert fp.cropped_shapes == [[5, 6, 7]]


# ---------------------------------------------------------------- real data


def nnunet_style_stats(cases, samples_per_case):
    """nnU-Net v2's procedure, written out independently: RandomState(1234) per case,
    `samples_per_case` foreground voxels drawn with replacement, pooled."""
    pooled = []
    for image_path, label_path in cases:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        foreground = image[seg > 0]
        pooled.append(np.random.RandomState(1234).choice(foreground, samples_per_case, replace=True))
    pooled = np.concatenate(pooled)
    return {"mean": pooled.mean(), "std": pooled.std(), "median": np.median(pooled),
            "p005": np.percentile(pooled, 0.5), "p995": np.percentile(pooled, 99.5)}


@pytest.mark.realdata
def test_hippocampus_subset(tmp_path):
    source = shared_dataset("hippocampus")
    root = tmp_path / "Hippo"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    names = sorted(p.name[: -len(".nii.gz")] for p in (source / "imagesTr").glob("*.nii.gz"))[:20]
    for name in names:
        (root / "imagesTr" / f"{name}_0000.nii.gz").symlink_to(source / "imagesTr" / f"{name}.nii.gz")
        (root / "labelsTr" / f"{name}.nii.gz").symlink_to(source / "labelsTr" / f"{name}.nii.gz")
    write_dataset_json(root, channel_names={"0": "MRI"},
                       labels={"background": 0, "anterior": 1, "posterior": 2})
    fp = fingerprint_dataset(load_dataset(root), tmp_path / "results", n_jobs=2)

    assert (fp.dim, fp.axis_order, fp.n_cases) == (3, ["z", "y", "x"], 20)
    assert fp.median_spacing == [1.0, 1.0, 1.0]
    z, y, x = fp.median_shape
    assert 30 <= z <= 40 and 45 <= y <= 55 and 30 <= x <= 40
    assert set(fp.labels) == {"1", "2"}
    for stats in fp.labels.values():
        assert 0.01 < stats.voxel_fraction < 0.06 and stats.case_fraction == 1.0
    assert fp.channels[0].kind == "mr"
    maxima = [float(sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / f"{n}.nii.gz"))).max())
              for n in names]
    assert fp.per_case_intensity_max == maxima
    assert fp.intensity_scales_differ == (max(maxima) / min(maxima) > 10)

    # Against nnU-Net's own sampling (10000 voxels per case here): within 1-2 %.
    reference = nnunet_style_stats(
        [(source / "imagesTr" / f"{n}.nii.gz", source / "labelsTr" / f"{n}.nii.gz") for n in names], 10000)
    stats = fp.intensity[0]
    assert stats.mean == pytest.approx(reference["mean"], rel=0.01)
    assert stats.std == pytest.approx(reference["std"], rel=0.01)
    assert stats.median == pytest.approx(reference["median"], rel=0.02)
    assert stats.percentile_99_5 == pytest.approx(reference["p995"], rel=0.02)


@pytest.mark.realdata
def test_jsrt_subset(tmp_path):
    source = shared_dataset("jsrt_lungs")
    root = tmp_path / "XRay"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grey_to_label = {0: 0, 150: 1, 200: 2, 250: 3}
    for mask_path in sorted((source / "masks").glob("*.png"))[:20]:
        grey = np.asarray(Image.open(mask_path))
        labels = np.zeros_like(grey)
        for value, label in grey_to_label.items():
            labels[grey == value] = label
        Image.fromarray(labels).save(root / "labelsTr" / mask_path.name)
        (root / "imagesTr" / f"{mask_path.stem}_0000.png").symlink_to(source / "images" / mask_path.name)
    write_dataset_json(root, file_ending=".png",
                       labels={"background": 0, "right lung": 1, "left lung": 2, "heart": 3})
    fp = fingerprint_dataset(load_dataset(root), tmp_path / "results", n_jobs=2)

    assert (fp.dim, fp.axis_order, fp.n_cases) == (2, ["y", "x"], 20)
    assert len(fp.channels) == 1 and fp.channels[0].kind == "xray"
    assert fp.median_shape == [224, 224] and fp.median_spacing == [1.0, 1.0]
    assert sorted(fp.labels) == ["1", "2", "3"]
    for stats in fp.labels.values():
        assert stats.case_fraction == 1.0 and 0.02 < stats.voxel_fraction < 0.3
    assert fp.labels["1"].components_per_case_median == 1
    assert "2D, 20 cases" in format_fingerprint_summary(fp)


@pytest.mark.realdata
def test_ham10000_classification_subset(tmp_path):
    source = shared_dataset("ham10000")
    root = tmp_path / "Derm"
    (root / "imagesTr").mkdir(parents=True)
    with open(source / "HAM10000_metadata.csv", newline="") as handle:
        all_rows = list(csv.DictReader(handle))
    # The metadata is sorted by class, then lesion: the first rows of each class keep
    # lesions imaged several times together.
    rows = [r for dx in sorted({r["dx"] for r in all_rows}) for r in
            [row for row in all_rows if row["dx"] == dx][:43]][:300]
    cases = []
    for row in rows:
        (root / "imagesTr" / f"{row['image_id']}_0000.jpg").symlink_to(source / "images" / f"{row['image_id']}.jpg")
        cases.append({"case": row["image_id"], "label": row["dx"], "group": row["lesion_id"]})
    # An exact copy under another name, class and lesion: a duplicate that would leak.
    shutil.copy(source / "images" / f"{rows[0]['image_id']}.jpg", root / "imagesTr" / "copy_0000.jpg")
    other_class = next(r["dx"] for r in rows if r["dx"] != rows[0]["dx"])
    cases.append({"case": "copy", "label": other_class, "group": "HAM_copy"})
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    write_dataset_json(root, task_type="classification", file_ending=".jpg", classes=classes, cases=cases,
                       channel_names={"0": "R", "1": "G", "2": "B"})
    fp = fingerprint_dataset(load_dataset(root), tmp_path / "results", n_jobs=2)

    labels = [c["label"] for c in cases]
    assert fp.task_type == "classification" and fp.n_cases == 301
    assert fp.class_counts == {name: labels.count(name) for name in classes}
    assert sum(fp.class_counts.values()) == 301
    assert fp.class_frequencies[rows[0]["dx"]] == pytest.approx(labels.count(rows[0]["dx"]) / 301)
    present = [n for n in fp.class_counts.values() if n]
    assert fp.imbalance_ratio == pytest.approx(max(present) / min(present))
    lesions = {c["group"] for c in cases}
    assert fp.n_groups == len(lesions)
    images_per_lesion = [sum(c["group"] == lesion for c in cases) for lesion in lesions]
    assert fp.images_per_group["max"] == max(images_per_lesion)
    assert max(images_per_lesion) > 1  # the metadata's first rows hold lesions imaged several times
    assert fp.groups_per_class == {name: len({c["group"] for c in cases if c["label"] == name})
                                   for name in classes}
    assert [c.kind for c in fp.channels] == ["rgb"] * 3
    assert fp.median_shape == [150, 200] and fp.aspect_ratios["median"] == pytest.approx(200 / 150)

    copy_sets = [d for d in fp.duplicates if "copy" in d["cases"]]
    assert len(copy_sets) == 1
    assert sorted(copy_sets[0]["cases"]) == sorted([rows[0]["image_id"], "copy"])
    assert sorted(copy_sets[0]["classes"]) == sorted([rows[0]["dx"], other_class])
    assert copy_sets[0]["same_class"] is False and copy_sets[0]["same_group"] is False

    pixels = np.stack([np.asarray(Image.open(root / "imagesTr" / f"{c['case']}_0000.jpg").convert("RGB"))
                       for c in cases]).astype(np.float64) / 255
    assert fp.channel_mean == pytest.approx(pixels.mean(axis=(0, 1, 2)).tolist(), abs=1e-9)
    assert fp.channel_std == pytest.approx(pixels.std(axis=(0, 1, 2)).tolist(), abs=1e-6)
    assert Fingerprint.load(fingerprint_file(tmp_path / "results", "Derm")) == fp
    assert "identical images: " in format_fingerprint_summary(fp)
