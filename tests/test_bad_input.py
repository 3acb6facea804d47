"""The bad-input catalogue: every kind of bad input to `import` and `predict` ends with exit 2,
one line on stderr naming the offending file or folder, and no partial output.

docs/bad_input.md lists the same cases for users; each row here is one case there.
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from autoplan.cli import main
from tests.test_inference import make_classification_run, make_segmentation_run


# ----------------------------------------------------------------------------- inputs


def _png(path: Path, value=None, shape=(24, 32), seed=0, rgb=False):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, shape + ((3,) if rgb else ()), dtype=np.uint8) if value is None \
        else np.full(shape, value, np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, shape=(24, 32), values=(0, 255)):
    mask = np.zeros(shape, np.uint8)
    mask[4:10, 4:12] = values[1]
    Image.fromarray(mask).save(path)


def _nifti(path: Path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _pairs(root: Path, n=3) -> tuple:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True), masks.mkdir()
    for i in range(n):
        _png(images / f"c{i}.png", seed=i)
        _mask(masks / f"c{i}.png")
    return images, masks


def _volumes(root: Path, n=3) -> tuple:
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        _nifti(images / f"v{i}.nii.gz", rng.normal(size=(6, 8, 10)).astype(np.float32))
        labels = np.zeros((6, 8, 10), np.uint8)
        labels[2:4, 2:5, 3:7] = 1
        _nifti(masks / f"v{i}.nii.gz", labels)
    return images, masks


def _photos(root: Path, n=4) -> Path:
    images = root / "photos"
    images.mkdir(parents=True)
    for i in range(n):
        _png(images / f"p{i}.png", seed=i, rgb=True)
    return images


def _csv(path: Path, rows, header=("image_id", "dx")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# Each case: (what the user did wrong, a function(tmp) -> (argv, path the message must name)).
def truncated_image(tmp):
    images, masks = _pairs(tmp)
    data = (images / "c1.png").read_bytes()
    (images / "c1.png").write_bytes(data[: len(data) // 2])
    return ["--images", images, "--masks", masks], images / "c1.png"


def empty_file(tmp):
    images, masks = _pairs(tmp)
    (images / "c1.png").write_bytes(b"")
    return ["--images", images, "--masks", masks], images / "c1.png"


def not_an_image(tmp):
    images, masks = _pairs(tmp)
    (images / "c1.png").write_text("this is text, not a PNG")
    return ["--images", images, "--masks", masks], images / "c1.png"


def mask_of_another_size(tmp):
    images, masks = _pairs(tmp)
    _mask(masks / "c2.png", shape=(20, 32))
    return ["--images", images, "--masks", masks], masks / "c2.png"


def mask_value_not_in_label_map(tmp):
    images, masks = _pairs(tmp)
    _mask(masks / "c0.png", values=(0, 77))
    return ["--images", images, "--masks", masks, "--label-map", "255=lesion"], masks / "c0.png"


def image_without_mask(tmp):
    images, masks = _pairs(tmp)
    (masks / "c1.png").unlink()
    return ["--images", images, "--masks", masks], images / "c1.png"


def mask_without_image(tmp):
    images, masks = _pairs(tmp)
    _mask(masks / "orphan.png")
    return ["--images", images, "--masks", masks], masks / "orphan.png"


def constant_image(tmp):
    images, masks = _pairs(tmp)
    _png(images / "c1.png", value=128)
    return ["--images", images, "--masks", masks], images / "c1.png"


def nan_in_volume(tmp):
    images, masks = _volumes(tmp)
    array = np.random.default_rng(1).normal(size=(6, 8, 10)).astype(np.float32)
    array[1, 2, 3] = np.nan
    _nifti(images / "v1.nii.gz", array)
    return ["--images", images, "--masks", masks], images / "v1.nii.gz"


def mask_of_another_spacing(tmp):
    images, masks = _volumes(tmp)
    labels = np.zeros((6, 8, 10), np.uint8)
    labels[2:4, 2:5, 3:7] = 1
    _nifti(masks / "v0.nii.gz", labels, spacing=(2.0, 1.0, 1.0))
    return ["--images", images, "--masks", masks], masks / "v0.nii.gz"


def fractional_mask(tmp):
    images, masks = _volumes(tmp)
    _nifti(masks / "v2.nii.gz", np.full((6, 8, 10), 0.5, np.float32))
    return ["--images", images, "--masks", masks], masks / "v2.nii.gz"


def negative_mask_value(tmp):
    images, masks = _volumes(tmp)
    labels = np.zeros((6, 8, 10), np.int16)
    labels[1, 1, 1] = -1
    _nifti(masks / "v1.nii.gz", labels)
    return ["--images", images, "--masks", masks], masks / "v1.nii.gz"


def masks_folder_is_the_images_folder(tmp):
    images, _ = _pairs(tmp)
    return ["--images", images, "--masks", images], images / "c0.png"


def jpeg_masks(tmp):
    images, masks = _pairs(tmp)
    yy, xx = np.mgrid[:24, :32]
    for i in range(3):
        (masks / f"c{i}.png").unlink()
        smooth = (((yy - 12) ** 2 + (xx - 10 - i) ** 2) < 60).astype(np.uint8) * 255
        Image.fromarray(smooth).save(masks / f"c{i}.jpg", quality=70)
    return ["--images", images, "--masks", masks], masks / "c0.jpg"


def grey_and_colour_mixed(tmp):
    images, masks = _pairs(tmp)
    _png(images / "c1.png", seed=1, rgb=True)
    return ["--images", images, "--masks", masks], images / "c1.png"


def two_d_and_three_d_mixed(tmp):
    images, masks = _volumes(tmp)
    _nifti(images / "v1.nii.gz", np.random.default_rng(0).normal(size=(1, 8, 10)).astype(np.float32)[0])
    _nifti(masks / "v1.nii.gz", np.zeros((8, 10), np.uint8))
    return ["--images", images, "--masks", masks], images / "v1.nii.gz"


def images_folder_missing(tmp):
    return ["--images", tmp / "nowhere", "--masks", tmp], tmp / "nowhere"


def images_folder_empty(tmp):
    (tmp / "empty").mkdir()
    return ["--images", tmp / "empty", "--masks", tmp / "empty"], tmp / "empty"


def malformed_label_map(tmp):
    images, masks = _pairs(tmp)
    return ["--images", images, "--masks", masks, "--label-map", "255:lesion"], None


def csv_class_not_declared(tmp):
    photos = _photos(tmp)
    table = _csv(tmp / "labels.csv", [("p0", "nv"), ("p1", "mel"), ("p2", "nv"), ("p3", "zebra")])
    return ["--images", photos, "--labels", table, "--classes", "nv,mel"], table


def csv_names_a_missing_image(tmp):
    photos = _photos(tmp)
    table = _csv(tmp / "labels.csv", [("p0", "nv"), ("p1", "mel"), ("p2", "nv"), ("p3", "mel"), ("p9", "nv")])
    return ["--images", photos, "--labels", table], table


def csv_without_the_id_column(tmp):
    photos = _photos(tmp)
    table = _csv(tmp / "labels.csv", [("p0", "nv")], header=("name_of_file", "dx"))
    return ["--images", photos, "--labels", table, "--id-column", "image_id"], table


def labels_is_a_folder(tmp):
    photos = _photos(tmp)
    return ["--images", photos, "--labels", photos], photos


def raw_folder_under_a_file(tmp):
    images, masks = _pairs(tmp)
    (tmp / "a_file").write_text("x")
    return ["--images", images, "--masks", masks, "--raw", tmp / "a_file" / "raw"], tmp / "a_file"


IMPORT_CASES = [truncated_image, empty_file, not_an_image, mask_of_another_size, mask_value_not_in_label_map,
                image_without_mask, mask_without_image, constant_image, nan_in_volume, mask_of_another_spacing,
                fractional_mask, negative_mask_value, masks_folder_is_the_images_folder, jpeg_masks,
                grey_and_colour_mixed, two_d_and_three_d_mixed, images_folder_missing, images_folder_empty,
                malformed_label_map, csv_class_not_declared, csv_names_a_missing_image, csv_without_the_id_column,
                labels_is_a_folder, raw_folder_under_a_file]


def _one_line(capsys, named: Path | None, strict: bool = True) -> tuple:
    """(the one error line, stdout). ``strict``: nothing else on stderr; otherwise notes and
    per-case progress lines ("failed: ...", written as cases go) may come before it."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0] and (len(err) == 1 or not strict), err
    if named is not None:
        assert str(named) in errors[0] or named.name in errors[0], errors[0]
    return errors[0], captured.out


@pytest.mark.parametrize("case", IMPORT_CASES, ids=lambda c: c.__name__)
def test_bad_import_exits_2_with_one_line_and_leaves_nothing(case, tmp_path, capsys):
    argv, named = case(tmp_path)
    raw = tmp_path / "raw"
    if "--raw" not in argv:
        argv += ["--raw", raw]
    code = main(["import", "Bad", *map(str, argv)])
    assert code == 2
    _one_line(capsys, named)
    assert not (raw / "Bad").exists()
    assert not raw.exists() or not [p for p in raw.iterdir() if p.name.startswith(".Bad.")]


# ----------------------------------------------------------------------------- predict


def _grey_inputs(tmp) -> Path:
    inputs = tmp / "in"
    inputs.mkdir()
    for i in range(2):
        _png(inputs / f"good{i}.png", seed=i, shape=(20, 20))
    return inputs


def model_folder_without_a_plan(tmp):
    (tmp / "model").mkdir()
    return tmp / "model", _grey_inputs(tmp), tmp / "out", tmp / "model"


def output_inside_the_input(tmp):
    inputs = _grey_inputs(tmp)
    return make_segmentation_run(tmp, 2), inputs, inputs / "masks", inputs / "masks"


def output_is_a_file(tmp):
    (tmp / "out.txt").write_text("x")
    return make_segmentation_run(tmp, 2), _grey_inputs(tmp), tmp / "out.txt", tmp / "out.txt"


def input_without_images(tmp):
    (tmp / "in").mkdir()
    (tmp / "in" / "notes.txt").write_text("x")
    return make_segmentation_run(tmp, 2), tmp / "in", tmp / "out", tmp / "in"


def corrupt_case_among_good_ones(tmp):
    inputs = _grey_inputs(tmp)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return make_segmentation_run(tmp, 2), inputs, tmp / "out", inputs / "broken.png"


def volume_with_the_wrong_channel_count(tmp):
    inputs = tmp / "in"
    inputs.mkdir()
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 6, 16, 16)).astype(np.float32),
                                   isVector=False)
    sitk.WriteImage(image, str(inputs / "two_channels.nii.gz"))
    return make_segmentation_run(tmp, 3), inputs, tmp / "out", inputs / "two_channels.nii.gz"


def checkpoint_that_would_run_code(tmp):
    run = make_segmentation_run(tmp, 2)
    state = torch.load(run / "checkpoint_best.pt", weights_only=True)
    state["payload"] = _Payload()
    torch.save(state, run / "checkpoint_best.pt")
    return run, _grey_inputs(tmp), tmp / "out", run / "checkpoint_best.pt"


def truncated_checkpoint(tmp):
    run = make_segmentation_run(tmp, 2)
    data = (run / "checkpoint_best.pt").read_bytes()
    (run / "checkpoint_best.pt").write_bytes(data[: len(data) // 3])
    return run, _grey_inputs(tmp), tmp / "out", run / "checkpoint_best.pt"


def volume_given_to_a_classifier(tmp):
    inputs = tmp / "in"
    inputs.mkdir()
    _png(inputs / "photo.png", seed=0, rgb=True)
    _nifti(inputs / "scan.nii.gz", np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32))
    return make_classification_run(tmp), inputs, tmp / "out", inputs / "scan.nii.gz"


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


PREDICT_CASES = [model_folder_without_a_plan, output_inside_the_input, output_is_a_file, input_without_images,
                 corrupt_case_among_good_ones, volume_with_the_wrong_channel_count, checkpoint_that_would_run_code,
                 truncated_checkpoint, volume_given_to_a_classifier]
# where the good cases of the folder are still written (the contract: the others are predicted)
KEEPS_GOOD_CASES = {"corrupt_case_among_good_ones", "volume_given_to_a_classifier"}


@pytest.mark.parametrize("case", PREDICT_CASES, ids=lambda c: c.__name__)
def test_bad_predict_exits_2_with_one_line(case, tmp_path, capsys):
    model, inputs, output, named = case(tmp_path)
    code = main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(output), "--no-tta"])
    assert code == 2
    line, out = _one_line(capsys, named, strict=False)
    assert "code ran" not in out + line
    written = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if case.__name__ in KEEPS_GOOD_CASES:
        assert written and not any(p.startswith(".") for p in written), written
    elif case.__name__ != "output_inside_the_input":
        assert written == [] or not output.is_dir(), written


def test_the_catalogue_has_at_least_25_kinds_and_docs_list_them():
    cases = IMPORT_CASES + PREDICT_CASES
    assert len(cases) >= 25
    table = (Path(__file__).resolve().parents[1] / "docs" / "bad_input.md").read_text()
    for case in cases:
        assert f"`{case.__name__}`" in table, case.__name__
