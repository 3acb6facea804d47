"""autoplan.qc: each rule flags with its reason, training-like cases pass, predict writes the flags.

The reference comes from fingerprinting a few small synthetic PNG cases (grey "X-rays"
with a bright blob as label 1 and a small patch as label 2), so no real data is needed.
"""

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from autoplan.cli import main
from autoplan.datasets import load_dataset
from autoplan.errors import InputError
from autoplan.fingerprint import Fingerprint, fingerprint_dataset
from autoplan.inference import predict_folder
from autoplan.inference.inputs import read_case
from autoplan.io import read_image
from autoplan.io.images import ImageData
from autoplan.qc import QcReference, check_case, check_prediction, qc_csv, qc_reference
from conftest import shared_dataset
from test_inference import (_unet_configuration, _write_volume, classifier_configuration, make_classification_run,
                            make_segmentation_run, predict_constant_label, rgb_image, write_rgb_classification_dataset)

CONFIGURATION = _unet_configuration(2)            # a 1-channel 2D model working in mm (pixels)
FIT = SimpleNamespace(name="2d", n_input_channels=1,  # the same resizing images to a working size
                      field_of_view={"mode": "fit", "working_size": [16, 20]})
LABELS = {"background": 0, "anterior": 1, "posterior": 2}


# ----------------------------------------------------------------------------- synthetic data


def xray_like(seed: int, shape=(16, 20)) -> np.ndarray:
    """8-bit grey: dark noisy background, a bright blob where label 1 is."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 60, size=shape).astype(np.uint8)
    pixels[4:10, 5:12] = rng.integers(160, 200, size=(6, 7))
    return pixels


def write_png_dataset(root: Path, label_1_everywhere: bool = True, n_cases: int = 6) -> Path:
    """Label 1 (a 6x7 blob) in every case (or the first half), label 2 (3x5) in even cases."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        shape = (16 + 2 * (i % 2), 20)
        labels = np.zeros(shape, dtype=np.uint8)
        if label_1_everywhere or i < n_cases // 2:
            labels[4:10, 5:12] = 1
        if i % 2 == 0:
            labels[11:14, 12:17] = 2
        Image.fromarray(xray_like(i, shape)).save(root / "imagesTr" / f"case{i}_0000.png")
        Image.fromarray(labels).save(root / "labelsTr" / f"case{i}.png")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "xray"}, "labels": LABELS, "numTraining": n_cases, "file_ending": ".png"}))
    return root


def reference_of(root: Path, configuration=CONFIGURATION) -> QcReference:
    fingerprint = fingerprint_dataset(load_dataset(root), root.parent / "results", n_jobs=1)
    return qc_reference(fingerprint, configuration)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    root = write_png_dataset(tmp_path_factory.mktemp("raw") / "TaskToy")
    return root, reference_of(root)


def grey(pixels, spacing=(1.0, 1.0), source_format="png") -> ImageData:
    pixels = np.asarray(pixels)
    return ImageData(array=pixels[None], spacing=tuple(spacing), source_format=source_format)


def upscaled(pixels, factor: float) -> np.ndarray:
    height, width = pixels.shape
    size = (int(round(width * factor)), int(round(height * factor)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.NEAREST))


# ----------------------------------------------------------------------------- the reference


def test_reference_holds_the_training_ranges(training):
    _, reference = training
    assert (reference.task_type, reference.dim, reference.n_channels) == ("segmentation", 2, 1)
    assert reference.channel_kinds == ["xray"] and reference.source_formats == ["png"]
    assert (reference.shape_min, reference.shape_max) == ([16, 20], [18, 20])
    assert (reference.extent_min, reference.extent_max) == ([16, 20], [18, 20])  # spacing 1: pixels
    low, high = reference.intensity[0]["p99_5"]
    assert 150 < low <= high < 200
    anterior, posterior = reference.labels["1"], reference.labels["2"]
    assert anterior["name"] == "anterior" and anterior["case_fraction"] == 1.0
    assert anterior["fraction_min"] == pytest.approx(42 / 360) and anterior["fraction_max"] == pytest.approx(42 / 320)
    assert posterior["case_fraction"] == 0.5 and posterior["components_max"] == 1
    assert QcReference.from_dict(json.loads(json.dumps(reference.to_dict()))) == reference


def test_training_like_cases_and_masks_are_not_flagged(training):
    root, reference = training
    for seed in range(6, 12):  # unseen images of the same kind
        assert check_case(grey(xray_like(seed)), reference, CONFIGURATION) == []
        assert check_case(grey(xray_like(seed)), reference, FIT) == []
    for mask in sorted((root / "labelsTr").glob("*.png")):
        assert check_prediction(np.asarray(Image.open(mask)), reference) == []


# ----------------------------------------------------------------------------- case rules


def test_a_volume_given_to_a_2d_model_is_flagged(training):
    _, reference = training
    volume = ImageData(array=np.stack([xray_like(s) for s in range(5)])[None], spacing=(2.0, 1.0, 1.0),
                       source_format="nifti")
    reasons = check_case(volume, reference, CONFIGURATION)
    assert reasons == ["3D volume (5 x 16 x 20); the model was trained on 2D images (png): predicted slice by slice"]


def test_channel_conversions_of_natural_images_are_flagged(training, tmp_path):
    _, reference = training
    rgb = np.stack([xray_like(1), xray_like(2), xray_like(3)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    image = read_case([tmp_path / "photo.png"], 1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(image.array[0], expected)  # luminance, as PIL "L"
    assert check_case(image, reference, CONFIGURATION) == [
        "colour image (3 channels); the model was trained on grey images: converted to grey (luminance)"]

    Image.fromarray(xray_like(1)).save(tmp_path / "grey.png")
    repeated = read_case([tmp_path / "grey.png"], 3)
    assert repeated.array.shape == (3, 16, 20) and repeated.meta["original_channels"] == 1

    # Non-natural inputs with another channel count still fail as before.
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 20, 3), np.uint8), isVector=True),
                    str(tmp_path / "vector.nii.gz"))
    with pytest.raises(InputError, match="has 3 channel"):
        read_case([tmp_path / "vector.nii.gz"], 1)


def test_constant_empty_and_nan_images_are_flagged(training):
    _, reference = training
    assert check_case(grey(np.full((16, 20), 7, np.uint8)), reference, CONFIGURATION) == [
        "constant image (every value 7)"]
    assert check_case(grey(np.zeros((0, 20), np.uint8)), reference, FIT)[0] == "empty image (no pixels)"
    with_nan = xray_like(0).astype(np.float32)
    with_nan[3, 3] = np.nan
    assert "contains NaN values" in check_case(grey(with_nan), reference, CONFIGURATION)


def test_resized_models_flag_sizes_beyond_10x_of_training(training):
    _, reference = training
    assert check_case(grey(upscaled(xray_like(0), 9)), reference, FIT) == []
    reasons = check_case(grey(upscaled(xray_like(0), 16)), reference, FIT)
    assert reasons == ["256 x 320 pixels, 16.0x the largest training image (18 x 20): resized more than "
                       "10x beyond training"]
    tiny = check_case(grey(xray_like(0)[:, :1]), reference, FIT)
    assert tiny[0].startswith("16 x 1 pixels, 1/20.0 of the smallest training image (16 x 20)")


def test_mm_models_flag_extent_beyond_4x_and_spacing_beyond_3x(training):
    _, reference = training
    assert check_case(grey(upscaled(xray_like(0), 3.5)), reference, CONFIGURATION) == []
    assert check_case(grey(upscaled(xray_like(0), 5)), reference, CONFIGURATION) == [
        "extent 80 x 100 pixels; training 16 x 20 to 18 x 20 (flagged beyond 4x)"]
    # Same field of view with 4 mm pixels: the extent fits, the spacing does not.
    coarse = grey(xray_like(0)[::4, ::4], spacing=(4.0, 4.0), source_format="nifti")
    assert check_case(coarse, reference, CONFIGURATION) == [
        "spacing 4 x 4 mm; training 1 x 1 to 1 x 1 (flagged beyond 3x)"]
    assert check_case(grey(xray_like(0), spacing=(2.5, 2.5), source_format="nifti"), reference, FIT) == []


def test_intensity_scales_beyond_4x_are_flagged(training):
    _, reference = training
    brighter = check_case(grey(xray_like(0).astype(np.uint16) * 5), reference, CONFIGURATION)
    assert len(brighter) == 1 and brighter[0].startswith("channel 0 (xray): brightest values (p99.5 ")
    assert "more than 4x the training images'" in brighter[0]
    darker = check_case(grey(xray_like(0) // 5), reference, CONFIGURATION)
    assert len(darker) == 1 and "under 1/4 of the training images'" in darker[0]
    assert check_case(grey((xray_like(0) * 1.5).astype(np.uint16)), reference, CONFIGURATION) == []


def test_ct_medians_beyond_500_hu_of_training_are_flagged(training):
    _, reference = training
    ct = dataclasses.replace(reference, channel_kinds=["ct"], intensity=[
        {"p00_5": [-1024.0, -1000.0], "p50": [-100.0, 60.0], "p99_5": [300.0, 1500.0]}])
    soft_tissue = np.full((16, 20), 40, np.int16)
    soft_tissue[:4] = -1000  # air
    soft_tissue[-2:] = 700   # bone
    assert check_case(grey(soft_tissue, source_format="nifti"), ct, CONFIGURATION) == []
    bone = soft_tissue + 700
    assert check_case(grey(bone, source_format="nifti"), ct, CONFIGURATION) == [
        "channel 0 (ct): median 740 HU; training medians -100..60 HU (flagged beyond 500 HU outside)"]


def test_classifiers_flag_aspect_ratios_beyond_the_training_range(tmp_path):
    reference = reference_of(write_rgb_classification_dataset(tmp_path / "raw" / "TaskDerm"),
                             classifier_configuration())
    assert (reference.aspect_ratio_min, reference.aspect_ratio_max) == (1.25, 1.25)
    configuration = classifier_configuration()
    assert check_case(rgb_image((24, 40)), reference, configuration) == []
    assert check_case(rgb_image((24, 90)), reference, configuration) == [
        "aspect ratio (width/height) 3.75; training images 1.25..1.25: stretched to the input size more "
        "than training ever was"]


def test_a_grey_picture_saved_as_rgb_is_flagged_for_a_colour_model(tmp_path):
    """Skin-like photos (red above green above blue): an exported grey radiograph has three
    equal channels and is flagged; colour photos are not; untinted training disables the rule."""
    root = write_rgb_classification_dataset(tmp_path / "raw" / "TaskDerm")
    tint = np.array([60, 0, -40])[:, None, None]
    for path in sorted((root / "imagesTr").glob("*.png")):
        pixels = np.asarray(Image.open(path)).astype(int)
        Image.fromarray(np.clip(pixels + np.moveaxis(tint, 0, -1), 0, 255).astype(np.uint8)).save(path)
    configuration = classifier_configuration()
    reference = reference_of(root, configuration)
    assert reference.colour_spread_p01 > 0.2
    photo = rgb_image((24, 30), seed=9)
    photo.array = np.clip(photo.array.astype(int) + tint, 0, 255).astype(np.uint8)
    assert check_case(photo, reference, configuration) == []
    grey_rgb = ImageData(array=np.repeat(xray_like(1, (24, 30))[None], 3, axis=0), spacing=(1.0, 1.0),
                         source_format="jpeg")
    assert check_case(grey_rgb, reference, configuration)[0].startswith("grey picture in colour channels")
    untinted = reference_of(write_rgb_classification_dataset(tmp_path / "raw2" / "TaskDerm"), configuration)
    assert check_case(grey_rgb, untinted, configuration) == []


def test_a_reference_from_an_older_fingerprint_skips_what_it_cannot_check(training):
    root, reference = training
    stored = json.loads((root.parent / "results" / "TaskToy" / "fingerprint.json").read_text())
    for name in ("source_formats", "per_case_intensity_percentiles", "per_case_label_fractions",
                 "per_case_label_components"):
        del stored[name]
    old = qc_reference(Fingerprint.from_dict(stored), CONFIGURATION)
    assert old.intensity == [] and old.labels["1"]["fraction_min"] is None
    assert old.labels["1"]["components_max"] == 1  # the face-connected count stands in
    assert check_case(grey(xray_like(0) // 5), old, CONFIGURATION) == []      # no intensity ranges
    assert check_prediction(np.ones((16, 20), np.uint8), old) == []           # no fraction ranges
    assert check_prediction(np.zeros((16, 20), np.uint8), old) == [
        "no anterior (label 1) predicted; every training case has it"]


# ----------------------------------------------------------------------------- prediction rules


def test_prediction_rules(training):
    _, reference = training
    good = np.zeros((16, 20), np.uint8)
    good[4:10, 5:12] = 1
    assert check_prediction(good, reference) == []  # label 2 is absent from half the training cases

    assert check_prediction(np.zeros((16, 20), np.uint8), reference) == [
        "no anterior (label 1) predicted; every training case has it"]
    everything = check_prediction(np.ones((16, 20), np.uint8), reference)
    assert everything == ["anterior (label 1) covers 100.000% of the image; training cases 11.667%..13.125% "
                          "(flagged beyond 3x)"]
    speck = good * 0
    speck[5, 5] = 1
    assert "covers 0.312% of the image" in check_prediction(speck, reference)[0]

    fragments = np.zeros((16, 20), np.uint8)
    for row in (1, 5, 9):
        for col in (1, 8):
            fragments[row:row + 2, col:col + 3] = 1
    assert check_prediction(fragments, reference) == [
        "anterior (label 1) in 6 pieces; training cases had at most 1 (flagged above 4)"]
    # Diagonal neighbours are one piece (full connectivity, as inference.segmentation.largest_component).
    diagonal = good.copy()
    diagonal[10, 12] = diagonal[11, 13] = diagonal[12, 14] = diagonal[13, 15] = 1
    assert check_prediction(diagonal, reference) == []


def test_qc_csv_rows():
    text = qc_csv({"a": [], "b": ["constant image (every value 0)", "3D volume, with, commas"]})
    rows = list(csv.DictReader(text.splitlines()))
    assert rows == [{"case": "a", "flagged": "false", "reasons": ""},
                    {"case": "b", "flagged": "true",
                     "reasons": "constant image (every value 0); 3D volume, with, commas"}]


# ----------------------------------------------------------------------------- predict


def test_predict_writes_qc_csv_and_the_cli_counts_flagged_cases(tmp_path, capsys):
    reference = reference_of(write_png_dataset(tmp_path / "raw" / "TaskToy", label_1_everywhere=False))
    model = make_segmentation_run(tmp_path, 2, qc_reference=reference)
    # background everywhere: plausible masks for a reference where each label is absent from some cases
    predict_constant_label(model, channel=0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (20, 21):
        Image.fromarray(xray_like(seed)).save(inputs / f"good{seed}.png")
    Image.fromarray(np.stack([xray_like(s) for s in (1, 2, 3)], axis=-1)).save(inputs / "photo.png")
    Image.fromarray(upscaled(xray_like(4), 16)).save(inputs / "big.png")
    Image.fromarray(np.full((16, 20), 90, np.uint8)).save(inputs / "blank.png")
    _write_volume(inputs / "mri.nii.gz", (6, 16, 20), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = tmp_path / "out"

    assert main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(out), "--no-tta"]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.endswith(f"4 of 6 cases flagged, see {out / 'qc.csv'}")
    with open(out / "qc.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["big", "blank", "good20", "good21", "mri", "photo"]
    assert {case: row["flagged"] for case, row in rows.items()} == {
        "big": "true", "blank": "true", "good20": "false", "good21": "false", "mri": "true", "photo": "true"}
    assert rows["big"]["reasons"].startswith("extent 256 x 320 pixels")
    assert rows["blank"]["reasons"] == "constant image (every value 90)"
    assert rows["mri"]["reasons"].startswith("3D volume (6 x 16 x 20)")
    assert rows["photo"]["reasons"].startswith("colour image (3 channels)")
    # every case still got its mask, the photo's as a grey PNG of its size
    assert np.asarray(Image.open(out / "photo.png")).shape == (16, 20)
    assert sitk.ReadImage(str(out / "mri.nii.gz")).GetSize() == (20, 16, 6)


def test_runs_without_a_reference_predict_as_before(tmp_path, capsys):
    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((16, 20), 90, np.uint8)).save(inputs / "blank.png")
    summary = predict_folder(model, inputs, tmp_path / "out", tta=False)
    assert (summary["n_flagged"], summary["qc"]) == (None, None)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["blank.png"]
    assert capsys.readouterr().err.count("no quality reference") == 1


def test_classification_flags_a_grey_image_in_predictions_csv(tmp_path):
    reference = reference_of(write_rgb_classification_dataset(tmp_path / "raw" / "TaskDerm"),
                             classifier_configuration())
    model = make_classification_run(tmp_path, qc_reference=reference)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.moveaxis(rgb_image((24, 30), seed=9).array, 0, -1)).save(inputs / "lesion.png")
    Image.fromarray(xray_like(0, shape=(24, 30)) + 60).save(inputs / "chest.png")
    summary = predict_folder(model, inputs, tmp_path / "out", tta=False)
    assert summary["n_flagged"] == 1 and summary["qc"] == str(tmp_path / "out" / "predictions.csv")
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["case", "prediction", "akiec", "bcc", "nv", "flagged", "reasons"]
    assert [(r["case"], r["flagged"]) for r in rows] == [("chest", "true"), ("lesion", "false")]
    assert rows[0]["reasons"] == ("grey image (1 channel); the model was trained on colour images: "
                                  "repeated to 3 channels")


def test_training_stores_the_reference_from_the_fingerprint(training, tmp_path):
    from autoplan.paths import resolve_folders
    from autoplan.training import _qc_reference

    root, reference = training
    dataset = load_dataset(root)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", root.parent / "results")
    assert QcReference.from_dict(_qc_reference(folders, dataset, CONFIGURATION)) == reference
    assert _qc_reference(resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "none"),
                         dataset, CONFIGURATION) == {}


# ----------------------------------------------------------------------------- real data


def _jsrt_labels(mask_path: Path) -> np.ndarray:
    grey = np.asarray(Image.open(mask_path))
    labels = np.zeros_like(grey)
    for value, label in {150: 1, 200: 2, 250: 3}.items():
        labels[grey == value] = label
    return labels


@pytest.mark.realdata
def test_jsrt_held_out_images_pass_and_a_16x_upscaled_one_is_flagged(tmp_path):
    source = shared_dataset("jsrt_lungs")
    names = sorted(p.name for p in (source / "images").glob("*.png"))
    root = tmp_path / "XRay"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in names[::2]:  # the reference from every other image, checked on the rest
        (root / "imagesTr" / f"{Path(name).stem}_0000.png").symlink_to(source / "images" / name)
        Image.fromarray(_jsrt_labels(source / "masks" / name)).save(root / "labelsTr" / name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "xray"}, "file_ending": ".png",
        "labels": {"background": 0, "right lung": 1, "left lung": 2, "heart": 3}}))
    fit = SimpleNamespace(name="2d", n_input_channels=1, field_of_view={"mode": "fit", "working_size": [224, 224]})
    reference = reference_of(root, fit)

    for name in names:
        image = read_image(source / "images" / name)
        assert check_case(image, reference, fit) == [], name
        assert check_prediction(_jsrt_labels(source / "masks" / name), reference) == [], name
    pixels = read_image(source / "images" / names[1]).array[0]
    assert check_case(grey(upscaled(pixels, 2048 / 224)), reference, fit) == []     # 9.1x: a full-size JSRT film
    assert "16.0x the largest" in check_case(grey(upscaled(pixels, 16)), reference, fit)[0]


@pytest.mark.realdata
def test_chest_xrays_given_to_a_dermoscopy_classifier_are_flagged(tmp_path):
    derm, xray = shared_dataset("ham10000"), shared_dataset("jsrt_lungs")
    images = sorted((derm / "images").glob("*.jpg"))[:60]
    root = tmp_path / "Derm"
    (root / "imagesTr").mkdir(parents=True)
    for path in images[:30]:
        (root / "imagesTr" / f"{path.stem}_0000.jpg").symlink_to(path)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".jpg", "task_type": "classification",
        "classes": ["any"], "cases": [{"case": p.stem, "label": "any"} for p in images[:30]]}))
    configuration = classifier_configuration()
    reference = reference_of(root, configuration)
    for path in images[30:]:
        assert check_case(read_image(path), reference, configuration) == [], path.name
    chest = read_image(next((xray / "images").glob("*.png")))
    assert check_case(chest, reference, configuration)[0].startswith("grey image (1 channel)")
    # the same radiograph exported as an RGB JPEG: three equal channels
    exported = tmp_path / "chest.jpg"
    Image.fromarray(np.repeat(chest.array[0][..., None], 3, axis=-1).astype(np.uint8)).save(exported)
    reasons = check_case(read_image(exported), reference, configuration)
    assert len(reasons) == 1 and reasons[0].startswith("grey picture in colour channels"), reasons
