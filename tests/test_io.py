"""autoplan.io: reading and writing natural images, volumes and DICOM series."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import shared_dataset

from autoplan.errors import InputError
from autoplan.io import (
    file_ending,
    is_dicom_folder,
    list_image_files,
    read_image,
    strip_ending,
    write_image,
)

def dicom_series(study: str) -> Path:
    """The series folder of one shared DICOM study (skips without the data)."""
    return next((shared_dataset("hippocampus_dicom") / study).glob("*_HCropVolume"))


def oblique_volume(dtype=np.int16, shape=(7, 9, 11)) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-100, 100, size=shape).astype(dtype))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-12.5, 30.25, 4.0))
    angle = np.deg2rad(20)
    rotation = [np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1]
    image.SetDirection(rotation)
    return image


def assert_same_geometry(a, b):
    assert a.spatial_shape == b.spatial_shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-6)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


# ----------------------------------------------------------------------------- names


def test_endings_and_listing(tmp_path):
    assert file_ending("a/b.NII.GZ") == ".nii.gz"
    assert file_ending("x.PNG") == ".png"
    assert file_ending(tmp_path) == ""
    assert strip_ending("case_01.nii.gz") == "case_01"
    assert strip_ending("ISIC_1.JPG") == "ISIC_1"
    assert strip_ending("1.2.840.113619") == "1.2.840.113619"  # DICOM UID folder names stay
    for name in ["b.png", "a.nii.gz", ".hidden.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "plain_folder").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.nii.gz", "b.png"]
    assert not is_dicom_folder(tmp_path)


# ----------------------------------------------------------------------------- natural images


def test_png_grey_rgb_and_16bit_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(deep).save(tmp_path / "deep.png")

    image = read_image(tmp_path / "grey.png")
    assert image.array.shape == (1, 20, 30) and image.array.dtype == np.uint8
    assert image.spacing == (1.0, 1.0) and image.source_format == "png"
    assert image.meta["bit_depth"] == 8
    write_image(image.array, tmp_path / "grey_out.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "grey_out.png").array[0], grey)

    image = read_image(tmp_path / "rgb.png")
    assert image.array.shape == (3, 20, 30)
    np.testing.assert_array_equal(np.moveaxis(image.array, 0, -1), rgb)
    write_image(image.array, tmp_path / "rgb_out.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb_out.png").array, image.array)

    image = read_image(tmp_path / "deep.png")
    assert image.array.dtype == np.uint16 and image.meta["bit_depth"] == 16
    np.testing.assert_array_equal(image.array[0], deep)
    write_image(image.array[0], tmp_path / "deep_out.tif", image)
    np.testing.assert_array_equal(read_image(tmp_path / "deep_out.tif").array[0], deep)


def test_alpha_palette_and_bmp(tmp_path):
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.array.shape == (3, 8, 9) and int(image.array[0].max()) == 200

    grey_palette = Image.fromarray(np.arange(72, dtype=np.uint8).reshape(8, 9)).convert("P")
    grey_palette.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").array.shape == (1, 8, 9)

    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    write_image(labels, tmp_path / "labels.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "labels.bmp").array[0], labels)


def test_mask_values_choose_uint8_or_uint16(tmp_path):
    write_image(np.array([[0, 3], [1, 2]], dtype=np.int64), tmp_path / "small.png")
    assert read_image(tmp_path / "small.png").array.dtype == np.uint8
    write_image(np.array([[0, 300]], dtype=np.int32), tmp_path / "big.png")
    image = read_image(tmp_path / "big.png")
    assert image.array.dtype == np.uint16 and int(image.array.max()) == 300
    with pytest.raises(ValueError):
        write_image(np.array([[0.5, 1.0]]), tmp_path / "fraction.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "small.png"]  # no leftovers


# ----------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_geometry_round_trip(tmp_path, ending):
    source = tmp_path / f"vol{ending}"
    sitk.WriteImage(oblique_volume(), str(source))
    image = read_image(source)
    assert image.array.shape == (1, 7, 9, 11) and image.array.dtype == np.int16
    assert image.spacing == pytest.approx((2.5, 0.8, 0.7))   # array order (z, y, x)
    assert image.origin == pytest.approx((-12.5, 30.25, 4.0))

    mask = (image.array[0] > 0).astype(np.uint8)
    written = write_image(mask, tmp_path / f"mask{ending}", image)
    back = read_image(written)
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(back.array[0], mask)
    assert not list(tmp_path.glob(".tmp_*"))


def test_vector_and_4d_volumes_become_channels(tmp_path):
    vector = sitk.GetImageFromArray(np.random.rand(4, 5, 6, 2).astype(np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    image = read_image(tmp_path / "vector.nrrd")
    assert image.array.shape == (2, 4, 5, 6)
    write_image(image.array, tmp_path / "vector_out.nii.gz", image)
    np.testing.assert_allclose(read_image(tmp_path / "vector_out.nii.gz").array, image.array)

    volumes = [sitk.GetImageFromArray(np.random.rand(4, 5, 6).astype(np.float32)) for _ in range(3)]
    four_d = sitk.JoinSeries(volumes)  # 4D NIfTI, channels on the 4th axis (MSD style)
    sitk.WriteImage(four_d, str(tmp_path / "four_d.nii.gz"))
    image = read_image(tmp_path / "four_d.nii.gz")
    assert image.array.shape == (3, 4, 5, 6) and len(image.spacing) == 3


def test_2d_nifti_is_2d_and_writes_back(tmp_path):
    flat = sitk.GetImageFromArray(np.arange(20, dtype=np.float32).reshape(4, 5))
    flat.SetSpacing((0.5, 0.25))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    image = read_image(tmp_path / "flat.nii.gz")
    assert image.dim == 2 and image.spacing == pytest.approx((0.25, 0.5))

    slab = sitk.GetImageFromArray(np.arange(20, dtype=np.float32).reshape(1, 4, 5))
    slab.SetSpacing((0.5, 0.25, 3.0))
    slab.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(slab, str(tmp_path / "slab.nii.gz"))
    image = read_image(tmp_path / "slab.nii.gz")
    assert image.array.shape == (1, 4, 5)
    write_image(np.ones((4, 5), np.uint8), tmp_path / "slab_mask.nii.gz", image)
    back = sitk.ReadImage(str(tmp_path / "slab_mask.nii.gz"))
    assert back.GetSize() == (5, 4, 1)
    assert back.GetSpacing() == pytest.approx((0.5, 0.25, 3.0))
    assert back.GetOrigin() == pytest.approx((1.0, 2.0, 3.0))


# ----------------------------------------------------------------------------- bad input


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").touch()
    with pytest.raises(InputError, match="0 bytes") as error:
        read_image(tmp_path / "empty.png")
    assert error.value.path == tmp_path / "empty.png"


def test_corrupt_and_truncated_files(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match="cannot read") as error:
        read_image(tmp_path / "corrupt.png")
    assert error.value.path == tmp_path / "corrupt.png"

    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as error:
        read_image(tmp_path / "truncated.jpg")
    assert error.value.path == tmp_path / "truncated.jpg"

    (tmp_path / "corrupt.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "corrupt.nii.gz")


def test_unknown_extension(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"data")
    with pytest.raises(InputError, match="unknown image file type") as error:
        read_image(tmp_path / "scan.xyz")
    assert error.value.path == tmp_path / "scan.xyz"


def test_nan_in_volume(tmp_path):
    values = np.zeros((3, 4, 5), np.float32)
    values[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="NaN") as error:
        read_image(tmp_path / "nan.nii.gz")
    assert error.value.path == tmp_path / "nan.nii.gz"


# ----------------------------------------------------------------------------- DICOM


@pytest.mark.realdata
def test_dicom_series_reads_and_mask_keeps_geometry(tmp_path):
    folder = dicom_series("Study1")
    assert is_dicom_folder(folder)
    image = read_image(folder)
    assert image.dim == 3 and image.source_format == "dicom"
    assert image.spatial_shape == (32, 51, 35)
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert image.array.dtype == np.int16

    mask = (image.array[0] > np.median(image.array)).astype(np.uint8)
    written = write_image(mask, tmp_path / "13_HCropVolume", image)
    assert written.name == "13_HCropVolume.nii.gz"
    back = read_image(written)
    assert back.source_format == "nifti"
    assert_same_geometry(back, image)
    np.testing.assert_array_equal(back.array[0], mask)


@pytest.mark.realdata
def test_dicom_folder_with_two_series(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for study in ("Study1", "Study2"):
        for file in dicom_series(study).glob("*.dcm"):
            shutil.copy(file, mixed / f"{study}_{file.name}")
    with pytest.raises(InputError, match="2 DICOM series") as error:
        read_image(mixed)
    assert error.value.path == mixed


@pytest.mark.realdata
def test_dicom_series_with_missing_slice(tmp_path):
    source = dicom_series("Study1")
    gappy = tmp_path / "gappy"
    shutil.copytree(source, gappy)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(gappy))
    Path(files[len(files) // 2]).unlink()
    with pytest.raises(InputError, match="uneven slice spacing") as error:
        read_image(gappy)
    assert error.value.path == gappy


@pytest.mark.realdata
def test_a_study_folder_wrapping_one_series_reads_as_that_series():
    from autoplan.io.images import series_folder

    studies = shared_dataset("hippocampus_dicom")
    assert [p.name for p in list_image_files(studies)] == ["Study1", "Study2", "Study3"]
    study = studies / "Study1"
    inner = series_folder(study)
    assert inner.parent == study and inner.name.endswith("_HCropVolume")
    wrapped, direct = read_image(study), read_image(inner)
    assert wrapped.array.shape == direct.array.shape and wrapped.spacing == direct.spacing
    assert wrapped.origin == direct.origin and wrapped.direction == direct.direction


@pytest.mark.parametrize("dtype, low, high", [(np.uint8, 0, 4), (np.int16, -3, 900), (np.int32, 0, 100000),
                                              (np.bool_, 0, 2)])
def test_distinct_values_counts_in_chunks_as_unique_would(dtype, low, high, monkeypatch):
    """Label maps' values by chunked counting (a wide range falls back to np.unique): the same
    sorted values and dtype as np.unique, whatever the chunking."""
    from autoplan.io import cases

    monkeypatch.setattr(cases, "COUNT_CHUNK_VALUES", 1000)
    rng = np.random.default_rng(0)
    array = rng.choice(np.arange(low, high, max(1, (high - low) // 7)), size=(7, 33, 41)).astype(dtype)
    got = cases.distinct_values(array)
    np.testing.assert_array_equal(got, np.unique(array))
    assert got.dtype == np.unique(array).dtype
