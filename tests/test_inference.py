"""Prediction: sliding window, post-processing, predict_folder on NIfTI/PNG/DICOM, classification.

Run folders are built here from untrained tiny networks: what is checked (shapes,
geometry, file names, error handling, probabilities) does not depend on the weights.
"""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from autoplan.datasets import load_dataset
from autoplan.errors import InputError
from autoplan.inference import evaluate_dataset, predict_folder
from autoplan.inference.classification import decision_probabilities, pick_gradcam_indices
from autoplan.inference.inputs import group_input_cases
from autoplan.inference.segmentation import apply_postprocessing, decide_postprocessing
from autoplan.inference.sliding_window import gaussian_importance_map, sliding_window_predict, sliding_window_starts
from autoplan.io.images import ImageData
from autoplan.jsonio import read_json
from autoplan.planning import Configuration
from autoplan.runs import RunSpec, TrainOptions, build_network
from conftest import shared_dataset

LABELS = {"background": 0, "anterior": 1, "posterior": 2}
CLASSES = ["akiec", "bcc", "nv"]

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- run folders


def _unet_configuration(dim: int, n_channels: int = 1) -> Configuration:
    return Configuration(
        name="3d_fullres" if dim == 3 else "2d", dim=dim,
        patch_size=[16] * dim, batch_size=2, spacing=[1.0] * dim,
        network={"n_stages": 2, "features_per_stage": [4, 8], "strides": [[1] * dim, [2] * dim],
                 "kernel_sizes": [[3] * dim, [3] * dim], "conv_per_stage": 2},
        normalization=[{"scheme": "zscore"}] * n_channels, estimated_memory_gb=0.01,
        epochs=1, iterations_per_epoch=1, n_input_channels=n_channels, n_outputs=len(LABELS))


def _save_run(fold_dir: Path, spec: RunSpec, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec.save(fold_dir / "plan.json")
    torch.save({"model": build_network(spec).state_dict()}, fold_dir / "checkpoint_best.pt")
    return fold_dir


def make_segmentation_run(root: Path, dim: int, n_channels: int = 1, postprocessing=None,
                          qc_reference=None) -> Path:
    """A fold folder of an untrained U-Net; ``qc_reference`` (a QcReference) switches on quality flags."""
    spec = RunSpec(dataset="TaskToy", task_type="segmentation", fold=0,
                   configuration=_unet_configuration(dim, n_channels), options=TrainOptions(),
                   labels=dict(LABELS), channel_names={str(c): f"ch{c}" for c in range(n_channels)},
                   file_ending=".nii.gz" if dim == 3 else ".png", postprocessing=postprocessing or {},
                   qc_reference=qc_reference.to_dict() if qc_reference is not None else {})
    return _save_run(root / f"run{dim}d" / "fold_0", spec)


def predict_constant_label(fold_dir: Path, channel: int) -> None:
    """Make the run's untrained U-Net give output channel ``channel`` everywhere (a known prediction)."""
    checkpoint = fold_dir / "checkpoint_best.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["model"]["heads.0.weight"].zero_()
    state["model"]["heads.0.bias"].copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(channel), len(LABELS)))
    torch.save(state, checkpoint)


def classifier_configuration() -> Configuration:
    """A 3-class ResNet-18 of width 4 on 32 x 32 RGB images."""
    return Configuration(
        name="classifier", dim=2, patch_size=[32, 32], batch_size=4, spacing=[],
        network={"arch": "resnet18", "width": 4}, normalization=[{"scheme": "rgb", "mean": 0.5, "std": 0.25}] * 3,
        estimated_memory_gb=0.01, epochs=1, iterations_per_epoch=1, n_input_channels=3, n_outputs=len(CLASSES))


def make_classification_run(root: Path, n_folds: int = 1, qc_reference=None) -> Path:
    configuration = classifier_configuration()
    for fold in range(n_folds):
        spec = RunSpec(dataset="TaskDerm", task_type="classification", fold=fold, configuration=configuration,
                       options=TrainOptions(), classes=list(CLASSES),
                       channel_names={"0": "R", "1": "G", "2": "B"}, file_ending=".png",
                       qc_reference=qc_reference.to_dict() if qc_reference is not None else {})
        _save_run(root / "runcls" / f"fold_{fold}", spec, seed=fold)
    return root / "runcls" if n_folds > 1 else root / "runcls" / "fold_0"


def rgb_image(shape, seed=0) -> ImageData:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(40, 230, size=(3, *shape), dtype=np.uint8)
    return ImageData(array=pixels, spacing=(1.0, 1.0), source_format="jpeg")


def write_rgb_classification_dataset(root: Path) -> Path:
    """Six 24 x 30 RGB images of the three classes, imported (dataset.json with the cases' classes)."""
    (root / "imagesTr").mkdir(parents=True)
    cases = []
    for i, label in enumerate(["akiec", "bcc", "nv", "nv", "bcc", "akiec"]):
        pixels = np.moveaxis(rgb_image((24, 30), seed=i).array, 0, -1)
        Image.fromarray(pixels).save(root / "imagesTr" / f"img{i}_0000.png")
        cases.append({"case": f"img{i}", "label": label})
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {}, "numTraining": 6, "file_ending": ".png",
        "task_type": "classification", "classes": list(CLASSES), "cases": cases}))
    return root


def _write_volume(path: Path, shape, spacing_xyz, origin, direction, seed=0):
    rng = np.random.default_rng(seed)
    array = (rng.normal(100, 20, size=shape)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


def _rotation_direction(angle: float):
    c, s = np.cos(angle), np.sin(angle)
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel().tolist())


def _assert_same_geometry(output: Path, reference: sitk.Image):
    mask = sitk.ReadImage(str(output))
    assert mask.GetSize() == reference.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-6)
    values = set(np.unique(sitk.GetArrayFromImage(mask)).tolist())
    assert values <= set(LABELS.values())


# ----------------------------------------------------------------------------- sliding window


class PointwiseNet(torch.nn.Module):
    """A 1x1 convolution: every tiling must give exactly the whole-image prediction."""

    def __init__(self, dim, in_channels=1, n_classes=3):
        super().__init__()
        torch.manual_seed(1)
        self.conv = (torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d)(in_channels, n_classes, 1)

    def forward(self, x):
        return self.conv(x)


class ConstantNet(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        shape = (x.shape[0], len(self.logits)) + tuple(x.shape[2:])
        return self.logits.view(1, -1, *([1] * (x.ndim - 2))).expand(shape) + 0 * x[:, :1]


class SmallConvNet(torch.nn.Module):
    def __init__(self, dim, n_classes=3):
        super().__init__()
        conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
        self.body = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, n_classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def test_gaussian_is_symmetric_positive_and_peaks_at_one():
    for patch in [(8, 8), (5, 8), (4, 6, 7)]:
        weights = gaussian_importance_map(patch).numpy()
        assert weights.shape == patch
        for axis in range(len(patch)):
            np.testing.assert_allclose(weights, np.flip(weights, axis), rtol=1e-6)
        assert weights.max() == pytest.approx(1.0)
        assert weights.min() > 0
    # sigma = patch / 8 around the centre (n - 1) / 2, as nnU-Net's compute_gaussian
    n = 40
    x = np.arange(n)
    expected = np.exp(-0.5 * ((x - (n - 1) / 2) / (n / 8)) ** 2)
    np.testing.assert_allclose(gaussian_importance_map((n,)).numpy(), expected / expected.max(), rtol=1e-5)


def test_tile_starts_cover_the_image_with_half_overlap():
    for size, tile in [(16, 16), (17, 16), (40, 16), (100, 32)]:
        (starts,) = sliding_window_starts((size,), (tile,), 0.5)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(0 < b - a <= tile // 2 for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("shape", [(10, 12, 9), (16, 16, 16), (37, 21, 18)])
def test_sliding_window_keeps_shape_and_matches_whole_image_prediction(shape):
    net = PointwiseNet(3)
    data = torch.randn(1, *shape)
    probabilities = sliding_window_predict(net, data, (16, 16, 16), 3, mirror_axes=(0, 1, 2))
    assert probabilities.shape == (3, *shape)
    expected = torch.softmax(net(data[None])[0], 0)
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 9), (16, 16), (45, 30)])
def test_sliding_window_2d_shapes_and_probabilities(shape):
    probabilities = sliding_window_predict(SmallConvNet(2), torch.randn(1, *shape), (16, 16), 3,
                                           mirror_axes=(0, 1), batch_size=3)
    assert probabilities.shape == (3, *shape)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(shape))


def test_2d_network_runs_slice_by_slice_on_a_volume():
    net = PointwiseNet(2)
    data = torch.randn(1, 5, 20, 11)
    probabilities = sliding_window_predict(net, data, (16, 16), 3, mirror_axes=(0, 1))
    assert probabilities.shape == (3, 5, 20, 11)
    expected = torch.stack([torch.softmax(net(data[:, z][None])[0], 0) for z in range(5)], dim=1)
    torch.testing.assert_close(probabilities, expected, rtol=1e-4, atol=1e-5)


def test_constant_network_gives_the_constant():
    logits = [0.5, 2.0, -1.0]
    expected = torch.softmax(torch.tensor(logits), 0)
    for shape, patch, axes in [((1, 30, 19), (16, 16), (0, 1)), ((1, 9, 33, 20), (8, 16, 16), (0, 1, 2))]:
        probabilities = sliding_window_predict(ConstantNet(logits), torch.randn(*shape), patch, 3, mirror_axes=axes)
        torch.testing.assert_close(probabilities, expected.view(3, *([1] * (len(shape) - 1))).expand_as(probabilities))


def test_sliding_window_restores_training_mode():
    net = SmallConvNet(2).train()
    sliding_window_predict(net, torch.randn(1, 20, 20), (16, 16), 3)
    assert net.training


# ----------------------------------------------------------------------------- post-processing


def test_apply_postprocessing_keeps_only_largest_component_of_flagged_labels():
    label_map = np.zeros((20, 20), dtype=np.uint8)
    label_map[2:8, 2:8] = 1       # large
    label_map[15:17, 15:17] = 1   # small stray blob
    label_map[10:12, 2:4] = 2
    label_map[15:17, 2:4] = 2
    result = apply_postprocessing(label_map, {"1": True, "2": False})
    assert (result[2:8, 2:8] == 1).all() and (result[15:17, 15:17] == 0).all()
    assert (result == 2).sum() == 8  # label 2 not flagged: untouched
    assert apply_postprocessing(label_map, {}) is label_map


def test_decide_postprocessing_only_where_it_helps():
    reference = np.zeros((20, 20), dtype=np.int16)
    reference[2:8, 2:8] = 1          # label 1: one object
    reference[12:15, 2:5] = 2        # label 2: two objects
    reference[12:15, 15:18] = 2
    prediction = reference.copy()
    prediction[17:19, 10:12] = 1     # a false-positive blob of label 1: removing it helps
    decision = decide_postprocessing([prediction], [reference], [1, 2], [(1.0, 1.0)])
    assert decision == {"1": True, "2": False}


# ----------------------------------------------------------------------------- inputs


def test_decision_probabilities_take_back_part_of_the_class_weights():
    probabilities = np.array([[0.45, 0.55], [0.9, 0.1]])
    weights = {"strategy": "weighted_loss", "class_weights": [0.5, 2.0]}
    # correction 1: the unweighted posterior, p / w renormalised; the near-tie flips to class 0
    undone = decision_probabilities(probabilities, {**weights, "posterior_correction": 1.0})
    expected = probabilities / [0.5, 2.0]
    np.testing.assert_allclose(undone, expected / expected.sum(1, keepdims=True))
    assert undone.argmax(1).tolist() == [0, 0] and probabilities.argmax(1).tolist() == [1, 0]
    half = decision_probabilities(probabilities, {**weights, "posterior_correction": 0.5})
    assert undone[0, 0] > half[0, 0] > probabilities[0, 0]
    np.testing.assert_allclose(half.sum(1), 1.0)
    # no correction, no weights, or an older plan without the key: unchanged
    for imbalance in (weights, {"strategy": "none", "class_weights": [1, 1], "posterior_correction": 0.5}, None):
        np.testing.assert_array_equal(decision_probabilities(probabilities, imbalance), probabilities)


def test_channel_files_form_one_case_and_lone_suffixes_do_not(tmp_path):
    names = ["a_0000.nii.gz", "a_0001.nii.gz", "b.nii.gz", "scan_2019.png", "c_0001.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    cases = {c.name: [p.name for p in c.files] for c in group_input_cases(sorted(tmp_path.iterdir()))}
    assert cases == {"a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b.nii.gz"],
                     "scan_2019": ["scan_2019.png"], "c_0001": ["c_0001.png"]}


# ----------------------------------------------------------------------------- predict_folder


def test_nifti_masks_keep_each_inputs_geometry(tmp_path):
    model = make_segmentation_run(tmp_path, 3, postprocessing={"1": True})
    inputs = tmp_path / "in"
    inputs.mkdir()
    references = {
        "vol_a": _write_volume(inputs / "vol_a.nii.gz", (9, 20, 18), (0.9, 0.8, 2.0), (10.0, -5.5, 3.25),
                               _rotation_direction(0.3)),
        "vol_b": _write_volume(inputs / "vol_b_0000.nii.gz", (12, 11, 25), (1.1, 1.0, 1.5), (-100.0, 20.0, 7.0),
                               (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), seed=1),
        "vol_c": _write_volume(inputs / "vol_c.mha", (6, 14, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                               _rotation_direction(-1.0), seed=2),
    }
    out = tmp_path / "out"
    summary = predict_folder(model, inputs, out, tta=True, save_probabilities=True)
    assert summary["n_predicted"] == 3 and not summary["failed"]
    expected = {"vol_a.nii.gz", "vol_b.nii.gz", "vol_c.mha",
                "vol_a_probabilities.npz", "vol_b_probabilities.npz", "vol_c_probabilities.npz"}
    assert {p.name for p in out.iterdir()} == expected
    for name, reference in references.items():
        output = next(out.glob(f"{name}.[nm]*"))
        _assert_same_geometry(output, reference)
        probabilities = np.load(out / f"{name}_probabilities.npz")["probabilities"]
        assert probabilities.shape == (3, *sitk.GetArrayFromImage(reference).shape)
        np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)


def test_png_and_jpeg_inputs_give_png_masks_of_the_same_size(tmp_path):
    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"JPCLN001": (40, 52), "tiny": (10, 13), "photo": (30, 24)}
    for stem, (h, w) in sizes.items():
        pixels = rng.integers(0, 255, size=(h, w), dtype=np.uint8)
        Image.fromarray(pixels).save(inputs / (f"{stem}.jpg" if stem == "photo" else f"{stem}.png"))
    out = tmp_path / "out"
    predict_folder(model, inputs, out, tta=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.png" for s in sizes)
    for stem, (h, w) in sizes.items():
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        assert mask.shape == (h, w)
        assert set(np.unique(mask).tolist()) <= set(LABELS.values())


def test_refuses_to_write_into_the_input_folder(tmp_path):
    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(inputs / "a.png")
    for target in (inputs, inputs / "masks", inputs / "." / "x" / ".."):
        with pytest.raises(InputError, match="inside the input folder"):
            predict_folder(model, inputs, target)
    assert sorted(p.name for p in inputs.iterdir()) == ["a.png"]


def test_corrupt_file_is_reported_and_the_others_are_written(tmp_path):
    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for stem in ("good1", "good2"):
        Image.fromarray(np.full((20, 24), 90, dtype=np.uint8)).save(inputs / f"{stem}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="broken.png") as caught:
        predict_folder(model, inputs, out, tta=False)
    assert "1 of 3" in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == ["good1.png", "good2.png"]


def test_wrong_channel_count_is_an_input_error(tmp_path):
    model = make_segmentation_run(tmp_path, 3, n_channels=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_volume(inputs / "single.nii.gz", (6, 16, 16), (1.0, 1.0, 1.0), (0, 0, 0), _rotation_direction(0))
    for c in range(2):
        _write_volume(inputs / f"pair_{c:04d}.nii.gz", (6, 16, 16), (1.0, 1.0, 1.0), (0, 0, 0),
                      _rotation_direction(0), seed=c)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="single.nii.gz: has 1 channel"):
        predict_folder(model, inputs, out, tta=False)
    assert [p.name for p in out.iterdir()] == ["pair.nii.gz"]


@pytest.mark.realdata
def test_dicom_series_give_nifti_masks_with_the_series_geometry(tmp_path):
    studies = shared_dataset("hippocampus_dicom")
    # Study folders hold one series folder each: the input folder links the series folders.
    inputs = tmp_path / "in"
    inputs.mkdir()
    series = sorted(p for study in sorted(studies.glob("Study*")) for p in study.iterdir() if p.is_dir())
    assert len(series) == 3
    for folder in series:
        os.symlink(folder, inputs / folder.name)
    model = make_segmentation_run(tmp_path, 3)
    out = tmp_path / "out"
    summary = predict_folder(model, inputs, out, tta=False)
    assert summary["n_predicted"] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{f.name}.nii.gz" for f in series)
    for folder in series:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        _assert_same_geometry(out / f"{folder.name}.nii.gz", reader.Execute())


# ----------------------------------------------------------------------------- classification


def test_classification_predictions_csv(tmp_path):
    model = make_classification_run(tmp_path, n_folds=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(inputs / "ISIC_0000001.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 20, 3), dtype=np.uint8)).save(inputs / "lesion_b.png")
    Image.fromarray(rng.integers(0, 255, (25, 25), dtype=np.uint8)).save(inputs / "grey.png")
    out = tmp_path / "out"
    summary = predict_folder(model, inputs, out, tta=True)
    assert len(summary["model"]) == 2  # the parent folder: both folds ensembled
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == ["case", "prediction", "akiec", "bcc", "nv"]
    assert [r["case"] for r in rows] == ["ISIC_0000001", "grey", "lesion_b"]
    for row in rows:
        probabilities = [float(row[c]) for c in ("akiec", "bcc", "nv")]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert row["prediction"] == ["akiec", "bcc", "nv"][int(np.argmax(probabilities))]


# ----------------------------------------------------------------------------- evaluate_dataset


def _write_segmentation_dataset(root: Path, n_cases: int = 4) -> Path:
    """Volumes of (8 + i) x 18 x 14 voxels; label 1 a 4 x 6 x 5 block, label 2 a 4 x 4 x 5 one beside it."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        shape = (8 + i, 18, 14)
        image = _write_volume(root / "imagesTr" / f"toy_{i:03d}_0000.nii.gz", shape, (1.0, 1.2, 1.5),
                              (float(i), 2.0, -3.0), _rotation_direction(0.2 * i), seed=i)
        labels = np.zeros(shape, dtype=np.uint8)
        labels[2:6, 4:10, 3:8] = 1
        labels[2:6, 10:14, 3:8] = 2
        mask = sitk.GetImageFromArray(labels)
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(root / "labelsTr" / f"toy_{i:03d}.nii.gz"))
    description = {"name": root.name, "channel_names": {"0": "MR"}, "labels": LABELS,
                   "numTraining": n_cases, "file_ending": ".nii.gz", "task_type": "segmentation"}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def test_evaluate_segmentation_dataset_writes_metrics_report_and_masks(tmp_path):
    model = make_segmentation_run(tmp_path, 3)
    dataset = load_dataset(_write_segmentation_dataset(tmp_path / "raw" / "TaskToyTest"))
    metrics = evaluate_dataset(model, dataset, tta=False)
    out = model / "TaskToyTest"  # default: a folder named after the dataset inside the run folder
    assert read_json(out / "metrics.json")["n_cases"] == 4 == len(metrics["per_case"])
    assert set(metrics["mean"]) == {"1", "2"}
    for entry in metrics["per_case"]:
        assert 0.0 <= entry["per_label"]["1"]["dice"] <= 1.0
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert len(list(out.glob("overlay_*.png"))) == 3  # best, median, worst
    for i in range(4):
        _assert_same_geometry(out / "predictions" / f"toy_{i:03d}.nii.gz",
                              sitk.ReadImage(str(dataset.case(f"toy_{i:03d}").images[0])))


def test_evaluate_writes_the_hand_computed_dice_into_metrics_json_and_the_report(tmp_path):
    """A network that says "anterior" (label 1) everywhere: case i has N = (8 + i) * 18 * 14
    voxels, 120 of them anterior in the reference, so Dice_1 = 2 * 120 / (N + 120), precision_1 =
    120 / N, recall_1 = 1, and Dice_2 = 0 (posterior is never predicted)."""
    model = make_segmentation_run(tmp_path, 3)
    predict_constant_label(model, channel=1)
    dataset = load_dataset(_write_segmentation_dataset(tmp_path / "raw" / "TaskToyTest"))
    out = tmp_path / "eval"
    evaluate_dataset(model, dataset, out, tta=False)

    voxels = [(8 + i) * 18 * 14 for i in range(4)]
    for i, n in enumerate(voxels):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predictions" / f"toy_{i:03d}.nii.gz")))
        assert mask.size == n and (mask == 1).all()
    metrics = read_json(out / "metrics.json")
    dice_1 = [2 * 120 / (n + 120) for n in voxels]
    for entry, expected in zip(metrics["per_case"], dice_1):
        assert entry["per_label"]["1"]["dice"] == pytest.approx(expected)
        assert entry["per_label"]["2"]["dice"] == 0.0
    assert metrics["mean"]["1"]["dice"] == pytest.approx(np.mean(dice_1))
    assert metrics["mean"]["1"]["precision"] == pytest.approx(np.mean([120 / n for n in voxels]))
    assert metrics["mean"]["1"]["recall"] == pytest.approx(1.0)
    assert metrics["foreground_mean"]["dice"] == pytest.approx(np.mean(dice_1) / 2)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["1 anterior"][0] == f"{np.mean(dice_1):.4f}" and rows["2 posterior"][0] == "0.0000"
    assert rows["foreground mean"][0] == f"{np.mean(dice_1) / 2:.4f}"
    assert f"{np.mean(dice_1):.4f}" in (out / "report.html").read_text()


def test_evaluate_classification_dataset(tmp_path):
    model = make_classification_run(tmp_path)
    root = write_rgb_classification_dataset(tmp_path / "raw" / "TaskDermTest")
    out = tmp_path / "eval"
    metrics = evaluate_dataset(model, load_dataset(root), out)
    assert metrics["n_cases"] == 6 and read_json(out / "metrics.json")["classes"] == ["akiec", "bcc", "nv"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
    for name in ("report.html", "report.md", "confusion_matrix.png", "roc.png", "gradcam.png", "predictions.csv"):
        assert (out / name).is_file(), name


def test_gradcam_samples_pick_one_correct_and_one_wrong_per_class():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 0])
    confidence = np.array([0.6, 0.9, 0.8, 0.7, 0.5, 0.4])
    picks = pick_gradcam_indices(y_true, y_pred, confidence, 3)
    assert picks == [2, 1, 3, 4, 5]  # class 0: best correct + the wrong; class 1: two correct; class 2: its wrong one


def test_inputs_that_would_write_the_same_mask_are_refused(tmp_path):
    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("same.png", "same.jpg", "other.png"):
        Image.fromarray(np.full((20, 20), 50, dtype=np.uint8)).save(inputs / name)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="2 of 3") as caught:
        predict_folder(model, inputs, out, tta=False)
    assert "would write same.png" in str(caught.value)
    assert [p.name for p in out.iterdir()] == ["other.png"]


class _RunsCode:
    """A pickle that runs code when loaded, as a malicious model file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """Model files from others are data: unpickling may build tensors and plain values only."""
    run = make_segmentation_run(tmp_path, dim=2)
    marker = tmp_path / "code_ran"
    state = torch.load(run / "checkpoint_best.pt", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, run / "checkpoint_best.pt")
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8)).save(images / "a.png")
    with pytest.raises(InputError, match="could run code"):
        predict_folder(run, images, tmp_path / "out")
    assert not marker.exists()
    (run / "checkpoint_best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        predict_folder(run, images, tmp_path / "out")


def test_old_checkpoints_with_a_numpy_rng_state_still_load(tmp_path):
    """Checkpoints up to this version hold NumPy's RNG state as an array: still data, still loaded."""
    from autoplan.runs import load_checkpoint

    run = make_segmentation_run(tmp_path, dim=2)
    state = torch.load(run / "checkpoint_best.pt", weights_only=True)
    state["rng"] = {"numpy": np.random.get_state()}
    torch.save(state, run / "checkpoint_best.pt")
    loaded = load_checkpoint(run / "checkpoint_best.pt")
    assert isinstance(loaded["rng"]["numpy"][1], np.ndarray)


def test_a_volume_among_photos_fails_alone_and_the_others_are_classified(tmp_path):
    """One 3D NIfTI in a folder of photos: predictions.csv holds the photos, the command names the volume."""
    model = make_classification_run(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(inputs / f"{name}.jpg")
    _write_volume(inputs / "scan.nii.gz", (6, 16, 20), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="scan.nii.gz"):
        predict_folder(model, inputs, out)
    with open(out / "predictions.csv", newline="") as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == ["a", "b"]
