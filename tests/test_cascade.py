"""The cascade (issue 26, part 2): 3d_lowres, then 3d_cascade_fullres on the image plus the lowres
prediction as one-hot channels, trained on the lowres stage's out-of-fold predictions.

The end-to-end tests train tiny networks (width 4, two iterations an epoch) on five synthetic
CT-like volumes of 32 x 48 x 48 (``benchmarks/synthetic_ct.py``): they check the plumbing (which
prediction reaches which case, which channels the network sees), not accuracy
(``benchmarks/cascade.py`` measures that). Tests marked ``needs_predictor_hook`` run
``autoplan predict`` / ``evaluate`` on a cascade: they need the one-line cascade hook in
``Predictor.segment`` (and ``n_image_channels`` where predict reads cases), and are skipped
until it is in.
"""

import inspect
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from autoplan.artifacts import Plan
from autoplan.cascade_transforms import PreviousStageToOneHot, RandomBinaryMorphology, RemoveRandomComponent
from autoplan.errors import InputError
from autoplan.planning import plan_dataset
from autoplan.planning.segmentation import CASCADE_NAME, plan_cascade
from autoplan.planning.topology import unet_network, unet_topology
from autoplan.runs import RunSpec, TrainOptions
from autoplan.selection.budget import NOT_COMPARED, cascade_budget

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.synthetic_ct import CT_LABELS, write_ct_dataset  # noqa: E402

SHAPE, SPACING = (32, 48, 48), (2.0, 1.0, 1.0)
LOWRES_SPACING = [4.0, 2.0, 2.0]
N_CASES = 5


def _predictor_has_cascade_hook() -> bool:
    from autoplan.inference.predictor import Predictor

    return "with_previous_stage" in inspect.getsource(Predictor.segment)


needs_predictor_hook = pytest.mark.skipif(
    not _predictor_has_cascade_hook(),
    reason="needs the cascade hook in Predictor.segment (cascade.with_previous_stage; issue 26 part 2 report)")


# ------------------------------------------------------------------------------ planning


def test_plan_with_lowres_has_a_cascade_that_round_trips_through_json(tmp_path):
    from test_planning import ct_fingerprint

    plan = plan_dataset("TaskCT", ct_fingerprint(), device="cuda", gpu_memory_gb=8, probe=False)
    assert list(plan.configurations) == ["2d", "3d_lowres", "3d_fullres", CASCADE_NAME]
    full, cascade = plan.configurations["3d_fullres"], plan.configurations[CASCADE_NAME]
    assert cascade.previous_stage == "3d_lowres" and full.previous_stage == ""
    # one-hot channels of the foreground labels, not normalised; the rest is 3d_fullres's
    assert cascade.n_input_channels == full.n_input_channels + full.n_outputs - 1
    assert cascade.n_image_channels == full.n_input_channels
    assert cascade.normalization == full.normalization + [{"scheme": "none"}] * (full.n_outputs - 1)
    assert (cascade.network, cascade.patch_size, cascade.spacing, cascade.epochs) == \
        (full.network, full.patch_size, full.spacing, full.epochs)
    assert cascade.estimated_memory_gb >= full.estimated_memory_gb
    assert "out-of-fold" in cascade.reasons["previous_stage"]
    plan.save(tmp_path / "plans.json")
    loaded = Plan.load(tmp_path / "plans.json")
    assert loaded == plan and loaded.configurations[CASCADE_NAME].previous_stage == "3d_lowres"
    assert plan.default_configuration == "3d_fullres"


def test_no_lowres_means_no_cascade():
    from test_planning import hippocampus_fingerprint

    plan = plan_dataset("TaskHippocampus", hippocampus_fingerprint(), device="cuda", gpu_memory_gb=8, probe=False)
    assert CASCADE_NAME not in plan.configurations and "3d_lowres" not in plan.configurations


# ------------------------------------------------------------------------------ augmentation


def _batch_with_previous(previous: np.ndarray) -> dict:
    """A batch of one sample: a random image, and seg = [labels, previous stage's labels]."""
    seg = np.stack([previous, previous])[None].astype(np.int16)
    return {"data": np.random.default_rng(0).normal(size=(1, 1, *previous.shape)).astype(np.float32), "seg": seg}


def test_previous_stage_becomes_one_hot_channels_after_the_image():
    previous = np.zeros((8, 12, 12), dtype=np.int16)
    previous[2:5, 3:7, 3:7], previous[5:7, 8:11, 8:11] = 1, 3
    batch = PreviousStageToOneHot([1, 2, 3])(**_batch_with_previous(previous))
    assert batch["data"].shape == (1, 4, 8, 12, 12) and batch["seg"].shape == (1, 1, 8, 12, 12)
    for label in (1, 2, 3):
        assert np.array_equal(batch["data"][0, label], (previous == label).astype(np.float32))


def test_cascade_augmentation_keeps_channels_one_hot_and_changes_them():
    previous = np.zeros((24, 24, 24), dtype=np.int16)
    previous[4:16, 4:16, 4:16] = 1
    previous[10:14, 10:14, 10:14] = 2          # inside label 1's block: dilations fight over voxels
    previous[18:21, 18:21, 18:21] = 3          # one small component
    np.random.seed(3)
    changed = 0
    for _ in range(20):
        batch = PreviousStageToOneHot([1, 2, 3])(**_batch_with_previous(previous))
        before = batch["data"][:, 1:].copy()
        batch = RandomBinaryMorphology(3, p_per_sample=1.0)(**batch)
        channels = batch["data"][0, 1:]
        assert set(np.unique(channels)) <= {0.0, 1.0}
        assert channels.sum(axis=0).max() <= 1          # still one-hot (or background)
        changed += not np.array_equal(before, batch["data"][:, 1:])
    assert changed >= 15


def test_random_component_removal_removes_only_small_components():
    previous = np.zeros((20, 20, 20), dtype=np.int16)
    previous[:, :, :10] = 1                   # half the patch: never removed (over 15 %)
    previous[2:4, 12:14, 12:14] = 1           # a small second component of label 1
    np.random.seed(0)
    batch = PreviousStageToOneHot([1])(**_batch_with_previous(previous))
    batch = RemoveRandomComponent(1, p_per_sample=1.0)(**batch)
    channel = batch["data"][0, 1]
    assert channel[:, :, :10].all() and not channel[2:4, 12:14, 12:14].any()


# ------------------------------------------------------------------------------ cache and batches


def test_cascade_cache_and_batches_carry_the_previous_stage_labels(tmp_path):
    """The cache's second seg channel is the previous stage's map, cut and resampled as the labels
    are (here to 1.5 mm in-plane from 1 mm); the batch's extra channels are its one-hot."""
    from autoplan import pipeline
    from autoplan.datasets import load_dataset
    from autoplan.io import read_image
    from autoplan.jsonio import read_json
    from autoplan.loading import SegmentationLoader
    from autoplan.paths import resolve_folders
    from autoplan.preprocessing.cache import open_case_arrays, preprocess_segmentation, save_label_map
    from autoplan.preprocessing.resampling import resample_labels

    folders = resolve_folders(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")
    dataset = load_dataset(write_ct_dataset(folders.dataset_raw("Tiny"), n_cases=2, shape=(16, 24, 24),
                                            spacing=SPACING, name="Tiny"))
    full = pipeline.plan(dataset, folders, device="cpu").configurations["3d_fullres"]
    cascade = replace(plan_cascade(full, "cpu"), spacing=[2.0, 1.5, 1.5], patch_size=[16, 16, 16])
    previous, files = {}, {}
    for case in dataset.cases:      # a "prediction": the reference moved by two voxels along x
        previous[case.id] = np.roll(read_image(case.label).array[0], 2, axis=2)
        files[case.id] = tmp_path / "lowres" / f"{case.id}.npz"
        save_label_map(files[case.id], previous[case.id])
    with pytest.raises(InputError, match="previous stage"):
        preprocess_segmentation(dataset, cascade, tmp_path / "refused")
    out = preprocess_segmentation(dataset, cascade, tmp_path / "cache", n_jobs=1, previous_stage=files)
    ids = [case.id for case in dataset.cases]
    for case_id in ids:
        properties = read_json(out / f"{case_id}.json")
        assert properties["shape_after_resampling"] == [16, 16, 16]
        _, seg = open_case_arrays(out, case_id)
        expected = resample_labels(previous[case_id], [16, 16, 16])
        assert seg.shape[0] == 2 and np.array_equal(seg[1], expected) and not np.array_equal(seg[0], seg[1])
    with SegmentationLoader(out, ids, cascade, augment="none", batch_size=2, n_workers=0, infinite=False) as batches:
        batch = next(batches)
    assert batch["data"].shape == (2, 4, 16, 16, 16) and batch["target"].shape == (2, 1, 16, 16, 16)
    for data, case_id in zip(batch["data"], ids):
        _, seg = open_case_arrays(out, case_id)
        for label in (1, 2, 3):
            assert np.array_equal(data[label], (seg[1] == label).astype(np.float32))


# ------------------------------------------------------------------------------ budget


def test_cascade_budget_shares_equally_and_refuses_too_little():
    minutes, reason = cascade_budget(20, [0, 1, 2, 3, 4], [0])
    assert minutes == pytest.approx(20 / 6, abs=1e-3) and "6 runs" in reason
    assert cascade_budget(20, [], [0])[0] == 20
    assert cascade_budget(None, [0, 1, 2, 3, 4], [0])[0] is None
    with pytest.raises(InputError, match="at least"):
        cascade_budget(3, [0, 1, 2, 3, 4], [0])
    assert "plan-and-train --config 3d_cascade_fullres" in NOT_COMPARED[CASCADE_NAME]


def test_plan_and_train_of_a_cascade_trains_missing_lowres_folds_first_with_equal_shares(tmp_path, monkeypatch):
    """The orchestration alone (training stubbed): every lowres fold lacking its out-of-fold
    predictions, then the cascade's fold, each for an equal share of the budget, re-planned for it."""
    from autoplan import pipeline
    from autoplan.datasets import load_dataset
    from autoplan.paths import resolve_folders

    folders = resolve_folders(tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results")
    dataset = load_dataset(write_ct_dataset(folders.dataset_raw("Tiny"), n_cases=5, shape=(16, 24, 24),
                                            spacing=SPACING, name="Tiny"))
    base = pipeline.plan(dataset, folders, device="cpu")
    full = base.configurations["3d_fullres"]
    planned = replace(base, configurations={"3d_lowres": replace(full, name="3d_lowres"), "3d_fullres": full,
                                            CASCADE_NAME: plan_cascade(full, "cpu")})
    replans, trained = [], []
    monkeypatch.setattr(pipeline, "plan", lambda *args, **kwargs: replans.append(kwargs) or planned)
    monkeypatch.setattr(pipeline, "train", lambda d, f, options, p: trained.append(
        (options.configuration, options.fold, options.time_budget_minutes)) or [])
    options = TrainOptions(configuration=CASCADE_NAME, fold="0", time_budget_minutes=12, **OPTIONS)
    pipeline.plan_and_train(dataset, folders, options, device="cpu", lowres="always")
    assert trained == [("3d_lowres", str(k), 2.0) for k in range(5)] + [(CASCADE_NAME, "0", 2.0)]
    assert [r["time_budget_minutes"] for r in replans] == [12, 2.0] and replans[1]["lowres"] == "always"
    # a lowres run (of any name) whose folds cover every case: only the cascade trains, on the whole budget
    from autoplan.inference.cascade import save_out_of_fold
    from autoplan.splits import load_or_create_splits

    for fold, split in enumerate(load_or_create_splits(dataset, folders.results)):
        for case_id in split["val"]:
            save_out_of_fold(folders.results / "Tiny" / "3d_lowres" / "other" / f"fold_{fold}", case_id,
                             np.zeros((16, 24, 24), np.uint8))
    trained.clear()
    pipeline.plan_and_train(dataset, folders, options, device="cpu", lowres="always")
    assert trained == [(CASCADE_NAME, "0", 12)]


# ------------------------------------------------------------------------------ end to end


def _tiny(configuration, name, spacing, **changes):
    """``configuration`` as a width-4 U-Net that trains two iterations: plumbing, not accuracy."""
    patch = [int(round(n * s / t)) for n, s, t in zip(SHAPE, SPACING, spacing)]
    topology = unet_topology(spacing, patch)
    return replace(configuration, name=name, spacing=list(spacing), patch_size=list(topology.patch_size),
                   network=unet_network(topology, 4, 3), batch_size=2, epochs=1, iterations_per_epoch=2,
                   val_iterations_per_epoch=1, precision="fp32", **changes)


def _tiny_plan(dataset, folders) -> Plan:
    """The dataset's CPU plan with a lowres stage at half the resolution and its cascade. At 32 x 48 x 48
    the planner would plan no lowres stage (the fullres patch covers the image), so it is set by hand."""
    from autoplan import pipeline

    planned = pipeline.plan(dataset, folders, device="cpu")
    # the whole image in one patch at full resolution, so a batch can be compared voxel for voxel
    full = _tiny(planned.configurations["3d_fullres"], "3d_fullres", list(SPACING))
    assert full.patch_size == list(SHAPE)
    configurations = {"3d_lowres": _tiny(full, "3d_lowres", LOWRES_SPACING), "3d_fullres": full,
                      CASCADE_NAME: plan_cascade(full, "cpu")}
    planned = replace(planned, configurations=configurations)
    planned.save(folders.results / dataset.name / "plans.json")
    return planned


OPTIONS = dict(epochs=1, iterations_per_epoch=2, n_workers=0, device="cpu", n_jobs=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Five synthetic CTs (one validation case a fold); 3d_lowres on all five folds and the cascade
    on fold 0, through ``pipeline.train_cascade`` (what plan-and-train --config 3d_cascade_fullres runs)."""
    from autoplan import pipeline
    from autoplan.datasets import load_dataset
    from autoplan.paths import resolve_folders
    from autoplan.splits import load_or_create_splits

    tmp = tmp_path_factory.mktemp("cascade")
    folders = resolve_folders(tmp / "raw", tmp / "preprocessed", tmp / "results")
    dataset = load_dataset(write_ct_dataset(folders.dataset_raw("SyntheticCT"), n_cases=N_CASES, shape=SHAPE,
                                            spacing=SPACING, name="SyntheticCT"))
    planned = _tiny_plan(dataset, folders)
    options = TrainOptions(configuration=CASCADE_NAME, fold="0", **OPTIONS)
    runs = pipeline.train_cascade(dataset, folders, options, planned, planning={})
    return {"dataset": dataset, "folders": folders, "plan": planned, "runs": runs,
            "splits": load_or_create_splits(dataset, folders.results)}


def _run_dir(trained, configuration) -> Path:
    return Path(next(r.run_dir for r in trained["runs"] if r.configuration == configuration)).parent


@pytest.mark.slow
def test_plan_and_train_trains_every_lowres_fold_then_the_cascade(trained):
    trained_folds = [(run.configuration, run.fold) for run in trained["runs"]]
    assert trained_folds == [("3d_lowres", k) for k in range(5)] + [(CASCADE_NAME, 0)]
    spec = RunSpec.load(_run_dir(trained, CASCADE_NAME) / "fold_0" / "plan.json")
    assert spec.configuration.previous_stage == "3d_lowres"
    assert spec.configuration.previous_stage_run == _run_dir(trained, "3d_lowres").name
    assert spec.configuration.n_input_channels == 1 + len(CT_LABELS) - 1


@pytest.mark.slow
def test_every_case_has_an_out_of_fold_lowres_prediction_from_a_fold_that_held_it_out(trained):
    from autoplan.inference.cascade import OUT_OF_FOLD_FOLDER
    from autoplan.preprocessing.cache import load_label_map

    lowres = _run_dir(trained, "3d_lowres")
    seen = []
    for fold, split in enumerate(trained["splits"]):
        predicted = sorted(p.stem for p in (lowres / f"fold_{fold}" / OUT_OF_FOLD_FOLDER).glob("*.npz"))
        assert predicted == sorted(split["val"]) and not set(predicted) & set(split["train"])
        seen += predicted
        labels = load_label_map(lowres / f"fold_{fold}" / OUT_OF_FOLD_FOLDER / f"{predicted[0]}.npz")
        assert labels.shape == SHAPE and labels.max() < len(CT_LABELS)     # the original grid
    assert sorted(seen) == sorted(case.id for case in trained["dataset"].cases)


@pytest.mark.slow
def test_the_cascade_batches_carry_the_out_of_fold_lowres_labels(trained):
    """What the network is fed: the image, then one channel per foreground label that is 1 exactly
    where the lowres fold that held the case out predicted that label."""
    from autoplan.inference.cascade import out_of_fold_predictions
    from autoplan.loading import SegmentationLoader
    from autoplan.paths import preprocessed_folder
    from autoplan.preprocessing.cache import load_label_map

    configuration = RunSpec.load(_run_dir(trained, CASCADE_NAME) / "fold_0" / "plan.json").configuration
    files, missing = out_of_fold_predictions(_run_dir(trained, "3d_lowres"), trained["splits"])
    assert not missing
    cases = sorted(files)[:4]
    cache = preprocessed_folder(trained["folders"].preprocessed, "SyntheticCT", CASCADE_NAME)
    with SegmentationLoader(cache, cases, configuration, augment="none", batch_size=4, n_workers=0,
                            infinite=False) as batches:
        batch = next(batches)
    assert batch["data"].shape == (4, 4, *SHAPE) and batch["target"].shape == (4, 1, *SHAPE)
    for data, case in zip(batch["data"], cases):
        previous = load_label_map(files[case])
        for label in range(1, len(CT_LABELS)):
            assert np.array_equal(data[label], (previous == label).astype(np.float32)), (case, label)
    assert any((load_label_map(files[c]) > 0).any() for c in cases)   # the channels are not all empty


@pytest.mark.slow
def test_cascade_training_refuses_when_lowres_folds_are_missing(trained, tmp_path):
    from autoplan.inference.cascade import OUT_OF_FOLD_FOLDER
    from autoplan.paths import resolve_folders
    from autoplan.training import train

    folders = resolve_folders(trained["folders"].raw, tmp_path / "preprocessed", tmp_path / "results")
    results = folders.results / "SyntheticCT"
    results.mkdir(parents=True)
    for name in ("plans.json", "splits.json"):
        shutil.copy(trained["folders"].results / "SyntheticCT" / name, results / name)
    options = TrainOptions(configuration=CASCADE_NAME, fold="0", **OPTIONS)
    with pytest.raises(InputError, match="--config 3d_lowres --fold all"):
        train(trained["dataset"], trained["plan"], options, folders)
    lowres = _run_dir(trained, "3d_lowres")
    shutil.copytree(lowres, results / "3d_lowres" / lowres.name)
    shutil.rmtree(results / "3d_lowres" / lowres.name / "fold_3" / OUT_OF_FOLD_FOLDER)
    with pytest.raises(InputError, match=r"lacks fold\(s\) 3"):
        train(trained["dataset"], trained["plan"], options, folders)
    assert not (folders.preprocessed / "SyntheticCT" / CASCADE_NAME).exists()     # refused before any work


@pytest.mark.slow
def test_prediction_runs_lowres_then_the_cascade_on_the_appended_channels(trained):
    from autoplan.inference.cascade import previous_stage_labels, with_previous_stage
    from autoplan.inference.models import load_ensemble
    from autoplan.inference.segmentation import predict_case_probabilities
    from autoplan.io import read_case_images

    ensemble = load_ensemble(_run_dir(trained, CASCADE_NAME))
    assert ensemble.previous is not None and len(ensemble.previous.networks) == 5
    assert ensemble.previous.spec.configuration.name == "3d_lowres"
    image = read_case_images(trained["dataset"].cases[0])
    cascade_input = with_previous_stage(image, ensemble, tta=False)
    lowres_labels = previous_stage_labels(image, ensemble.previous, tta=False)
    assert cascade_input.array.shape == (4, *SHAPE) and lowres_labels.shape == SHAPE
    assert np.array_equal(cascade_input.array[0], image.array[0].astype(np.float32))
    for label in (1, 2, 3):
        assert np.array_equal(cascade_input.array[label], (lowres_labels == label).astype(np.float32))
    probabilities, _ = predict_case_probabilities(ensemble.networks, ensemble.spec, cascade_input, tta=False)
    assert probabilities.shape == (4, *SHAPE) and np.allclose(probabilities.sum(0), 1, atol=1e-4)
    # a plain 3d_lowres ensemble takes the image as it is
    assert with_previous_stage(image, ensemble.previous) is image


@pytest.mark.slow
def test_cli_trains_another_cascade_fold_on_the_existing_lowres_run(trained, capsys):
    from autoplan.cli import main

    folders = trained["folders"]
    code = main(["train", "SyntheticCT", "--config", CASCADE_NAME, "--fold", "1", "--epochs", "1",
                 "--iterations-per-epoch", "2", "--workers", "0", "--device", "cpu", "--n-jobs", "1",
                 "--raw", str(folders.raw), "--preprocessed", str(folders.preprocessed),
                 "--results", str(folders.results)])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "out-of-fold predictions" in out and "fold_1" in out
    assert (_run_dir(trained, CASCADE_NAME) / "fold_1" / "metrics.json").is_file()


@pytest.mark.slow
@needs_predictor_hook
def test_cli_predict_and_evaluate_run_both_stages(trained, tmp_path):
    from autoplan.cli import main
    from autoplan.io import read_image

    folders = trained["folders"]
    model = _run_dir(trained, CASCADE_NAME) / "fold_0"
    images = tmp_path / "images"
    images.mkdir()
    source = trained["dataset"].cases[0].images[0]
    shutil.copy(source, images / source.name)
    code = main(["predict", "--model", str(model), "--input", str(images), "--output", str(tmp_path / "masks"),
                 "--no-tta"])
    assert code in (0, None)
    written = sorted((tmp_path / "masks").glob("*.nii.gz"))
    assert len(written) == 1 and read_image(written[0]).array.shape[1:] == SHAPE
    code = main(["evaluate", "--model", str(model), "--dataset", "SyntheticCT", "--no-tta",
                 "--output", str(tmp_path / "evaluation"), "--raw", str(folders.raw),
                 "--results", str(folders.results)])
    assert code in (0, None)
