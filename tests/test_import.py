"""autoplan import: publisher layouts into RAW/NAME, and every refusal of bad input."""

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_dataset

from autoplan.datasets import import_dataset, load_dataset, parse_label_map
from autoplan.errors import InputError
from autoplan.io import read_image

JSRT_LABELS = "150=right_lung,200=left_lung,250=heart"


def linked_subset(files, folder: Path) -> Path:
    """A tmp folder of symlinks: real data, small enough for a fast test."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def quick(**kwargs):
    """import_dataset in-process (no worker start-up) and quietly."""
    return import_dataset(n_jobs=1, quiet=True, **kwargs)


def assert_refused(error, path: Path, raw: Path, name: str) -> None:
    """The error names ``path``, and neither RAW/NAME nor a temporary folder is left."""
    assert error.value.path is not None
    assert Path(error.value.path).resolve() == Path(path).resolve(), error.value
    assert not (raw / name).exists()
    assert not raw.exists() or not [p for p in raw.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- synthetic data


def blob_png(path: Path, shape=(24, 32), rgb=False, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=shape + ((3,) if rgb else ()), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def mask_png(path: Path, shape=(24, 32), values=(0, 255)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for index, value in enumerate(values):
        mask[index * 4:(index + 1) * 4] = value
    Image.fromarray(mask).save(path)
    return mask


def volume(path: Path, values: np.ndarray, spacing=(0.8, 0.8, 2.0), origin=(5.0, -3.0, 10.0)):
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def natural_segmentation(root: Path, n=3, rgb=False) -> tuple:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for index in range(n):
        blob_png(images / f"case{index}.png", rgb=rgb, seed=index)
        mask_png(masks / f"case{index}.png", values=(0, 150, 200))
    return images, masks


def volume_segmentation(root: Path, n=3) -> tuple:
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for index in range(n):
        volume(images / f"vol_{index:03d}.nii.gz", rng.normal(size=(6, 8, 10)).astype(np.float32))
        labels = np.zeros((6, 8, 10), np.uint8)
        labels[2:4, 2:5, 3:7] = 1
        labels[4, 2:5, 3:7] = 2
        volume(masks / f"vol_{index:03d}.nii.gz", labels)
    return images, masks


def classification_folder(root: Path, n=4, classes=("a", "b")) -> tuple:
    images = root / "images"
    images.mkdir(parents=True)
    table = root / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "dx", "patient"])
        for index in range(n):
            blob_png(images / f"img{index}.png", rgb=True, seed=index)
            writer.writerow([f"img{index}", classes[index % len(classes)], f"p{index // 2}"])
    return images, table


# ----------------------------------------------------------------------------- layouts


def test_parse_label_map():
    assert parse_label_map("150=right_lung, 200=left_lung") == {150: "right_lung", 200: "left_lung"}
    for bad in ["150", "x=lung", "0=background", "1=a,1=b", "1=two words"]:
        with pytest.raises(InputError):
            parse_label_map(bad)
    # several values may share a name: they merge into one label
    assert parse_label_map("150=lung,200=lung,250=heart") == {150: "lung", 200: "lung", 250: "heart"}


def test_natural_images_with_suffixed_masks(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for index in range(3):
        Image.fromarray(blob_png(tmp_path / "x.png", rgb=True, seed=index)).save(
            images / f"ISIC_{index}.jpg", quality=95)
        mask_png(masks / f"ISIC_{index}_segmentation.png", values=(0, 255))
    (images / "README.txt").write_text("notes beside the images are ignored")
    raw = tmp_path / "raw"
    dataset = quick(name="TaskDerm", images_dir=images, masks_dir=masks, raw_root=raw)
    assert dataset.labels == {"background": 0, "foreground": 1}
    assert dataset.channel_names == {"0": "R", "1": "G", "2": "B"}
    assert dataset.file_ending == ".png"
    assert [c.id for c in dataset.cases] == ["ISIC_0", "ISIC_1", "ISIC_2"]
    image = read_image(dataset.cases[0].images[0])
    assert image.array.shape == (3, 24, 32)
    np.testing.assert_array_equal(image.array, read_image(images / "ISIC_0.jpg").array)
    assert sorted(np.unique(read_image(dataset.cases[0].label).array)) == [0, 1]
    assert sorted(p.name for p in raw.iterdir()) == ["TaskDerm"]


def test_label_map_order_sets_ids_and_discovery_is_consecutive(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    mapped = quick(name="Mapped", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw",
                   label_map="200=left,150=right")
    assert mapped.labels == {"background": 0, "left": 1, "right": 2}
    mask = read_image(mapped.cases[0].label).array[0]
    source = read_image(masks / "case0.png").array[0]
    assert (mask[source == 200] == 1).all() and (mask[source == 150] == 2).all()
    assert mapped.description["source"]["label_map"] == {"200": 1, "150": 2}

    found = quick(name="Found", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert found.labels == {"background": 0, "label_150": 1, "label_200": 2}


def test_volumes_with_channel_files_and_other_formats(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    for index in range(2):
        for channel in range(2):
            volume(images / f"pt{index}_{channel:04d}.nrrd",
                   rng.normal(size=(5, 6, 7)).astype(np.float32))
        labels = np.zeros((5, 6, 7), np.uint8)
        labels[1:3, 1:3, 1:3] = 1
        volume(masks / f"pt{index}.mha", labels)
    dataset = quick(name="TaskTwoChannels", images_dir=images, masks_dir=masks,
                    raw_root=tmp_path / "raw", channel_names=["T1", "T2"])
    assert dataset.channel_names == {"0": "T1", "1": "T2"}
    assert dataset.file_ending == ".nii.gz"
    case = dataset.cases[0]
    assert [p.name for p in case.images] == ["pt0_0000.nii.gz", "pt0_0001.nii.gz"]
    converted, source = read_image(case.images[1]), read_image(images / "pt0_0001.nrrd")
    np.testing.assert_array_equal(converted.array, source.array)
    assert converted.spacing == pytest.approx(source.spacing)
    assert converted.origin == pytest.approx(source.origin)


def test_classification_csv_with_groups_and_extensions_in_ids(tmp_path):
    images, table = classification_folder(tmp_path, n=4)
    rows = list(csv.reader(open(table)))
    rows[1][0] += ".png"                       # ids may carry the file ending
    csv.writer(open(table, "w", newline="")).writerows(rows)
    dataset = quick(name="TaskCls", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
                    label_column="dx", group_column="patient", classes=["b", "a"])
    assert dataset.task_type == "classification"
    assert dataset.classes == ["b", "a"]
    assert dataset.description["cases"][0] == {"case": "img0", "label": "a", "group": "p0"}
    assert dataset.file_ending == ".png"
    assert all(p.exists() for c in dataset.cases for p in c.images)
    assert (dataset.cases[0].images[0]).read_bytes() == (images / "img0.png").read_bytes()


def test_segmentation_groups_from_csv(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src", n=3)
    table = tmp_path / "patients.csv"
    table.write_text("file,patient\ncase0.png,A\ncase1.png,A\ncase2.png,B\n")
    dataset = quick(name="T", images_dir=images, masks_dir=masks, labels_csv=table,
                    raw_root=tmp_path / "raw", id_column="file", group_column="patient")
    assert dataset.task_type == "segmentation"
    assert dataset.description["groups"] == {"case0": "A", "case1": "A", "case2": "B"}
    assert dataset.case("case2").group == "B"


def test_grey_and_rgb_mixed_with_convert_grey(tmp_path):
    images, table = classification_folder(tmp_path, n=3)
    blob_png(images / "img1.png", rgb=False, seed=9)
    dataset = quick(name="Mixed", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
                    label_column="dx", convert_grey=True)
    assert dataset.channel_names == {"0": "R", "1": "G", "2": "B"}
    converted = read_image(dataset.case("img1").images[0]).array
    assert converted.shape[0] == 3 and (converted[0] == converted[2]).all()
    assert dataset.description["source"]["converted_grey_to_rgb"] == ["img1"]


def test_nnunet_raw_folder_loads_and_imports_as_is(tmp_path):
    images, masks = volume_segmentation(tmp_path / "src")
    first = quick(name="Dataset001_Vol", images_dir=images, masks_dir=masks,
                  raw_root=tmp_path / "raw", label_map="1=anterior,2=posterior")
    assert load_dataset(first.root).task_type == "segmentation"
    again = quick(name="Copy", images_dir=first.root, raw_root=tmp_path / "raw")
    assert again.labels == first.labels and len(again.cases) == 3
    assert again.description["source"]["layout"] == "nnunet_raw"
    assert again.cases[0].label.read_bytes() == first.cases[0].label.read_bytes()


def test_existing_target_is_refused_unless_overwrite(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src", n=2)
    raw = tmp_path / "raw"
    quick(name="Task", images_dir=images, masks_dir=masks, raw_root=raw)
    with pytest.raises(InputError, match="already exists"):
        quick(name="Task", images_dir=images, masks_dir=masks, raw_root=raw)
    blob_png(images / "case2.png")
    mask_png(masks / "case2.png")
    dataset = quick(name="Task", images_dir=images, masks_dir=masks, raw_root=raw, overwrite=True)
    assert len(dataset.cases) == 3 and sorted(p.name for p in raw.iterdir()) == ["Task"]


def test_parallel_workers_report_input_errors(tmp_path):
    """A worker's InputError reaches the caller; of several, the first case's, whichever
    worker failed first."""
    images, masks = natural_segmentation(tmp_path / "src", n=3)
    for name in ("case1.png", "case2.png"):
        (images / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError) as error:
        import_dataset("Task", images, tmp_path / "raw", masks_dir=masks, n_jobs=2, quiet=True)
    assert_refused(error, images / "case1.png", tmp_path / "raw", "Task")


# ----------------------------------------------------------------------------- bad input


def test_zero_byte_image(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    (images / "case1.png").write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "case1.png", tmp_path / "raw", "T")


def test_corrupt_png_mask(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    (masks / "case2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(InputError, match="cannot read") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, masks / "case2.png", tmp_path / "raw", "T")


def test_mask_of_another_size(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    mask_png(masks / "case1.png", shape=(24, 30))
    with pytest.raises(InputError, match="size") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, masks / "case1.png", tmp_path / "raw", "T")


@pytest.mark.parametrize("change", ["spacing", "origin"])
def test_nifti_mask_with_other_geometry(tmp_path, change):
    images, masks = volume_segmentation(tmp_path / "src")
    labels = sitk.ReadImage(str(masks / "vol_001.nii.gz"))
    if change == "spacing":
        labels.SetSpacing((0.8, 0.8, 2.5))
    else:
        labels.SetOrigin((5.0, -3.0, 12.0))
    sitk.WriteImage(labels, str(masks / "vol_001.nii.gz"))
    with pytest.raises(InputError, match=change) as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, masks / "vol_001.nii.gz", tmp_path / "raw", "T")


def test_mask_value_not_in_label_map(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    mask_png(masks / "case2.png", values=(0, 150, 201))
    with pytest.raises(InputError, match="201") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw",
              label_map="150=a,200=b")
    assert_refused(error, masks / "case2.png", tmp_path / "raw", "T")


def test_nan_in_volume(tmp_path):
    images, masks = volume_segmentation(tmp_path / "src")
    values = np.ones((6, 8, 10), np.float32)
    values[3, 3, 3] = np.nan
    volume(images / "vol_002.nii.gz", values)
    with pytest.raises(InputError, match="NaN") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "vol_002.nii.gz", tmp_path / "raw", "T")


def test_constant_image(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    Image.fromarray(np.full((24, 32), 7, np.uint8)).save(images / "case0.png")
    with pytest.raises(InputError, match="constant") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "case0.png", tmp_path / "raw", "T")


def test_image_without_mask_and_mask_without_image(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    (masks / "case1.png").rename(masks / "other.png")
    with pytest.raises(InputError, match="no mask") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "case1.png", tmp_path / "raw", "T")
    (images / "case1.png").unlink()
    with pytest.raises(InputError, match="without an image") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, masks / "other.png", tmp_path / "raw", "T")


def test_csv_row_without_image(tmp_path):
    images, table = classification_folder(tmp_path)
    (images / "img2.png").unlink()
    with pytest.raises(InputError, match="img2") as error:
        quick(name="T", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw")
    assert_refused(error, table, tmp_path / "raw", "T")


def test_image_without_csv_row(tmp_path):
    images, table = classification_folder(tmp_path)
    blob_png(images / "stray.png", rgb=True)
    with pytest.raises(InputError, match="no row") as error:
        quick(name="T", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw")
    assert_refused(error, images / "stray.png", tmp_path / "raw", "T")


def test_unknown_class_name(tmp_path):
    images, table = classification_folder(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(InputError, match="'c'") as error:
        quick(name="T", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
              classes="a,b")
    assert_refused(error, table, tmp_path / "raw", "T")


def test_missing_csv_column(tmp_path):
    images, table = classification_folder(tmp_path)
    with pytest.raises(InputError, match="no column 'site'") as error:
        quick(name="T", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
              group_column="site")
    assert_refused(error, table, tmp_path / "raw", "T")


def test_unknown_file_extension(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    (images / "case3.webp").write_bytes(b"RIFF....WEBP")
    with pytest.raises(InputError, match="unknown image file type") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "case3.webp", tmp_path / "raw", "T")


def test_rgb_and_grey_mixed(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src", n=3, rgb=True)
    blob_png(images / "case1.png", rgb=False)
    with pytest.raises(InputError, match="convert-grey") as error:
        quick(name="T", images_dir=images, masks_dir=masks, raw_root=tmp_path / "raw")
    assert_refused(error, images / "case1.png", tmp_path / "raw", "T")


@pytest.mark.realdata
def test_dicom_folder_with_two_series(tmp_path):
    dicom_studies = shared_dataset("hippocampus_dicom")
    studies = tmp_path / "studies"
    shutil.copytree(dicom_studies / "Study3", studies / "Study3")
    mixed = studies / "Mixed" / "series"
    mixed.mkdir(parents=True)
    for study in ("Study1", "Study2"):
        for file in next((dicom_studies / study).glob("*_HCropVolume")).glob("*.dcm"):
            shutil.copy(file, mixed / f"{study}_{file.name}")
    with pytest.raises(InputError, match="2 DICOM series") as error:
        quick(name="T", images_dir=studies, raw_root=tmp_path / "raw")
    assert_refused(error, mixed, tmp_path / "raw", "T")


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_jsrt_subset(tmp_path):
    jsrt = shared_dataset("jsrt_lungs")
    names = sorted(p.name for p in (jsrt / "images").glob("*.png"))[:12]
    images = linked_subset([jsrt / "images" / n for n in names], tmp_path / "images")
    masks = linked_subset([jsrt / "masks" / n for n in names], tmp_path / "masks")
    dataset = quick(name="TaskXRay", images_dir=images, masks_dir=masks,
                    raw_root=tmp_path / "raw", label_map=JSRT_LABELS)
    assert dataset.description["numTraining"] == 12
    assert dataset.labels == {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3}
    assert dataset.channel_names == {"0": "grey"}
    case = dataset.cases[0]
    assert case.images[0].read_bytes() == (jsrt / "images" / names[0]).read_bytes()
    mask = read_image(case.label).array
    assert mask.shape == (1, 224, 224) and set(np.unique(mask)) == {0, 1, 2, 3}


@pytest.mark.realdata
def test_hippocampus_subset(tmp_path):
    hippocampus = shared_dataset("hippocampus")
    names = sorted(p.name for p in (hippocampus / "imagesTr").glob("hippocampus_*.nii.gz"))[:10]
    images = linked_subset([hippocampus / "imagesTr" / n for n in names], tmp_path / "imagesTr")
    masks = linked_subset([hippocampus / "labelsTr" / n for n in names], tmp_path / "labelsTr")
    dataset = quick(name="TaskHippocampus", images_dir=images, masks_dir=masks,
                    raw_root=tmp_path / "raw", label_map="1=anterior,2=posterior")
    assert dataset.labels == {"background": 0, "anterior": 1, "posterior": 2}
    assert dataset.cases[0].images[0].name == "hippocampus_001_0000.nii.gz"
    image, label = read_image(dataset.cases[0].images[0]), read_image(dataset.cases[0].label)
    assert image.dim == 3 and image.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert label.spatial_shape == image.spatial_shape and set(np.unique(label.array)) <= {0, 1, 2}


@pytest.mark.realdata
def test_ham10000_subset_classification(tmp_path):
    ham = shared_dataset("ham10000")
    rows = list(csv.DictReader(open(ham / "HAM10000_metadata.csv")))
    picked = {r["image_id"]: r for r in rows if r["dx"] in ("mel", "nv", "df")}
    chosen = sorted(picked)[:15]
    images = linked_subset([ham / "images" / f"{i}.jpg" for i in chosen], tmp_path / "images")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked[i] for i in chosen)
    dataset = quick(name="TaskDerm", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
                    id_column="image_id", label_column="dx", group_column="lesion_id")
    assert dataset.file_ending == ".jpg"
    assert dataset.classes == sorted({picked[i]["dx"] for i in chosen})
    assert dataset.cases[0].group == picked[chosen[0]]["lesion_id"]
    assert read_image(dataset.cases[0].images[0]).array.shape == (3, 150, 200)


@pytest.mark.realdata
def test_dicom_studies_become_nifti_cases(tmp_path):
    dicom_studies = shared_dataset("hippocampus_dicom")
    dataset = quick(name="TaskDicom", images_dir=dicom_studies, raw_root=tmp_path / "raw")
    # a study folder wrapping one series is that series, named after the study
    assert [c.id for c in dataset.cases] == ["Study1", "Study2", "Study3"]
    assert dataset.description["unlabelled"] is True
    converted = read_image(dataset.cases[0].images[0])
    series = read_image(dicom_studies / "Study1" / "13_HCropVolume")
    np.testing.assert_array_equal(converted.array, series.array)
    assert converted.spacing == series.spacing and converted.origin == series.origin


@pytest.mark.slow
@pytest.mark.realdata
def test_full_real_datasets_import_times(ham10000_imported, tmp_path):
    """Full HAM10000 (classification; the session's import), hippocampus and JSRT; prints the times.

    HAM10000's time is compared with decoding its images in this same run (a ratio, not seconds,
    so a loaded machine slows both): import reads each image once and links the JPEGs."""
    ham, hippocampus, jsrt = (shared_dataset(n) for n in ("ham10000", "hippocampus", "jsrt_lungs"))
    n_jobs = min(2, os.cpu_count() or 1)
    derm = ham10000_imported["dataset"]
    timings = {"ham10000": ham10000_imported["seconds"]}
    assert len(derm.cases) == 8526 and len(derm.classes) == 7
    assert len({c.group for c in derm.cases}) < 8526        # lesions with several images
    first = derm.cases[0]
    assert first.images[0].read_bytes() == (ham / "images" / f"{first.id}.jpg").read_bytes()  # not re-encoded

    start = time.perf_counter()
    hippo = import_dataset("TaskHippocampus", hippocampus / "imagesTr", tmp_path,
                           masks_dir=hippocampus / "labelsTr", label_map="1=anterior,2=posterior",
                           n_jobs=n_jobs, quiet=True)
    timings["hippocampus"] = time.perf_counter() - start
    assert len(hippo.cases) == 220

    start = time.perf_counter()
    xray = import_dataset("TaskXRay", jsrt / "images", tmp_path, masks_dir=jsrt / "masks",
                          label_map=JSRT_LABELS, n_jobs=n_jobs, quiet=True)
    timings["jsrt"] = time.perf_counter() - start
    assert xray.description["numTraining"] == 200
    assert xray.labels == {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3}
    sample = sorted((ham / "images").glob("*.jpg"))[:500]
    start = time.perf_counter()
    for path in sample:
        read_image(path)
    decode_all = (time.perf_counter() - start) * len(derm.cases) / len(sample)
    print("import seconds:", {k: round(v, 1) for k, v in timings.items()}, "decoding HAM10000:", round(decode_all, 1))
    assert timings["ham10000"] < 30 * decode_all


def test_masks_that_look_like_photographs_are_refused_with_a_hint(tmp_path):
    """--masks naming the images folder, and lossy JPEG masks, imported hundreds of 'labels'."""
    images, masks = natural_segmentation(tmp_path / "src")
    raw = tmp_path / "raw"
    with pytest.raises(InputError, match="looks like a photograph") as error:
        quick(name="Photos", images_dir=images, raw_root=raw, masks_dir=images)
    assert "images folder" in error.value.problem
    assert_refused(error, images / "case0.png", raw, "Photos")
    # a smooth mask saved as JPEG: its edges get values between 0 and 255
    jpeg_masks = tmp_path / "jpeg_masks"
    jpeg_masks.mkdir()
    yy, xx = np.mgrid[:24, :32]
    for index in range(3):
        smooth = (((yy - 12) ** 2 + (xx - 10 - index) ** 2) < 60).astype(np.uint8) * 255
        Image.fromarray(smooth).save(jpeg_masks / f"case{index}.jpg", quality=70)
    with pytest.raises(InputError, match="JPEG is lossy"):
        quick(name="Jpeg", images_dir=images, raw_root=raw, masks_dir=jpeg_masks)
    # the same bytes under a .png name are still a JPEG
    for path in jpeg_masks.glob("*.jpg"):
        path.rename(path.with_suffix(".png"))
    with pytest.raises(InputError, match="JPEG is lossy"):
        quick(name="Jpeg", images_dir=images, raw_root=raw, masks_dir=jpeg_masks,
              label_map=parse_label_map("255=lesion"))


def test_non_latin_file_names_keep_readable_unique_ids(tmp_path):
    """Names in other scripts became '__' and collided; spaces still become '_' and
    dataset.json says which file each renamed case came from."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for index, stem in enumerate(["Пациент1", "Пациент2", "患者3", "scan 4"]):
        blob_png(images / f"{stem}.png", seed=index)
        mask_png(masks / f"{stem}.png")
    dataset = quick(name="Names", images_dir=images, raw_root=tmp_path / "raw", masks_dir=masks)
    assert sorted(case.id for case in dataset.cases) == sorted(["Пациент1", "Пациент2", "患者3", "scan_4"])
    assert dataset.description["source"]["renamed"] == {"scan_4": ["scan 4.png"]}


def test_4d_volumes_are_split_into_channel_files(tmp_path, folders):
    """Multi-modal 4D NIfTI (as MSD ships BrainTumour and Prostate) imported as one file
    declaring two channels, and the fingerprint then failed; now each channel is a file."""
    from autoplan.fingerprint import fingerprint_dataset

    images, masks = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        four_d = sitk.GetImageFromArray(rng.normal(size=(2, 6, 8, 10)).astype(np.float32), isVector=False)
        sitk.WriteImage(four_d, str(images / f"brain_{index}.nii.gz"))
        labels = np.zeros((6, 8, 10), np.uint8)
        labels[2:4, 2:5, 3:7] = 1
        volume(masks / f"brain_{index}.nii.gz", labels, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    dataset = quick(name="Brain", images_dir=images, raw_root=folders.raw, masks_dir=masks)
    assert len(dataset.channel_names) == 2
    files = sorted(p.name for p in (folders.raw / "Brain" / "imagesTr").iterdir())
    assert files[:2] == ["brain_0_0000.nii.gz", "brain_0_0001.nii.gz"] and len(files) == 6
    second = read_image(folders.raw / "Brain" / "imagesTr" / "brain_1_0001.nii.gz")
    assert second.array.shape == (1, 6, 8, 10)
    fingerprint = fingerprint_dataset(dataset, folders.results, n_jobs=1)
    assert len(fingerprint.channels) == 2


def test_csv_with_semicolons_is_read_and_a_latin1_csv_is_named(tmp_path):
    """European Excel writes ';' and often latin-1: the first is read, the second named with the fix."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        blob_png(images / f"p{index}.png", rgb=True, seed=index)
    table = tmp_path / "labels.csv"
    table.write_text("image_id;dx\np0;nv\np1;mel\np2;nv\np3;mel\n", encoding="utf-8")
    dataset = quick(name="Semi", images_dir=images, raw_root=tmp_path / "raw", labels_csv=table)
    assert sorted(dataset.classes) == ["mel", "nv"]
    table.write_bytes("image_id;dx\np0;nævus\np1;mel\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8.*CSV UTF-8"):
        quick(name="Latin", images_dir=images, raw_root=tmp_path / "raw", labels_csv=table)


def test_two_images_of_one_name_for_one_mask_are_named_as_such(tmp_path):
    images, masks = natural_segmentation(tmp_path / "src")
    blob_png(images / "case0.jpg", seed=9)
    with pytest.raises(InputError, match=r"2 images share the name 'case0' \(case0.jpg, case0.png\)"):
        quick(name="Twice", images_dir=images, raw_root=tmp_path / "raw", masks_dir=masks)
