"""find-best (issue 27, part 1): configurations and pairwise ensembles compared on the same
out-of-fold predictions, the choice written to best.json, and predict following it."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoplan import Predictor, pipeline
from autoplan.artifacts import BestChoice, CandidateScore, Member
from autoplan.cli import main
from autoplan.datasets import import_dataset
from autoplan.errors import InputError
from autoplan.inference import predict_folder
from autoplan.paths import resolve_folders
from autoplan.runs import TrainOptions
from autoplan.selection import split_budget

TINY = dict(epochs=2, iterations_per_epoch=3, n_workers=0, device="cpu")


def _write_volumes(folder: Path, n: int, seed: int = 0, with_masks: bool = True) -> tuple:
    """Small anisotropic volumes: a bright ellipsoid (label 1) and a dark block (label 2) in noise."""
    rng = np.random.default_rng(seed)
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    z, y, x = np.mgrid[:16, :28, :28]
    for i in range(n):
        cz, cy, cx = 8 + rng.integers(-2, 3), 12 + rng.integers(-3, 4), 14 + rng.integers(-3, 4)
        ball = ((z - cz) / 5) ** 2 + ((y - cy) / 7) ** 2 + ((x - cx) / 6) ** 2 <= 1
        block = np.zeros_like(ball)
        block[4:10, 20:25, 3 + i % 3:9 + i % 3] = True
        label = np.where(ball, 1, np.where(block, 2, 0)).astype(np.uint8)
        image = rng.normal(100, 15, size=label.shape) + 80 * (label == 1) - 60 * (label == 2)
        for array, target in ((image.astype(np.float32), images), (label, masks)):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((1.0, 1.0, 2.5))
            sitk.WriteImage(volume, str(target / f"case_{i:02d}.nii.gz"))
    return images, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small 3D dataset with 2d and 3d_fullres trained (briefly) on all five folds."""
    root = tmp_path_factory.mktemp("findbest")
    images, masks = _write_volumes(root / "sources", 6)
    folders = resolve_folders(root / "raw", root / "preprocessed", root / "results")
    dataset = import_dataset("TaskBlobs", images, folders.raw, masks_dir=masks, label_map="1=ball,2=block",
                             quiet=True, n_jobs=1)
    pipeline.plan(dataset, folders, device="cpu", n_jobs=1)
    for configuration in ("2d", "3d_fullres"):
        pipeline.train(dataset, folders, TrainOptions(configuration=configuration, fold="all", **TINY))
    return {"folders": folders, "dataset": dataset, "root": root}


def _args(trained) -> list:
    folders = trained["folders"]
    return ["--raw", str(folders.raw), "--preprocessed", str(folders.preprocessed), "--results", str(folders.results)]


@pytest.mark.slow
def test_find_best_prints_the_table_and_choice_and_predict_follows_it(trained, capsys, tmp_path):
    assert main(["find-best", "TaskBlobs", "--no-tta", *_args(trained)]) == 0
    printed = capsys.readouterr().out
    results = trained["folders"].results / "TaskBlobs"
    choice = BestChoice.load(results / "best.json")
    labels = [c.label for c in choice.candidates]
    # both configurations alone and their pair, each on the same 6 out-of-fold cases
    assert len(choice.candidates) == 3 and choice.n_cases == 6 and choice.folds == [0, 1, 2, 3, 4]
    assert sum(" + " in label for label in labels) == 1
    assert {label.split("/")[0] for label in labels if " + " not in label} == {"2d", "3d_fullres"}
    assert [c.score for c in choice.candidates] == sorted((c.score for c in choice.candidates), reverse=True)
    assert choice.chosen.label == labels[0] and f"chosen: {labels[0]}" in printed
    for label in labels:
        assert label in printed
    assert set(choice.candidates[0].per_label) == {"ball", "block"}

    inputs, _ = _write_volumes(tmp_path / "new", 2, seed=5)
    predict_folder(results, inputs, tmp_path / "followed", tta=False)
    expected = Predictor.load(results, tta=False)
    assert [e.fold_dirs[0].parent.name for e in expected.ensembles] == [m.run for m in choice.chosen.members]
    for path in sorted(inputs.iterdir()):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "followed" / path.name)))
        by_hand = expected.predict(array, spacing=image.GetSpacing()[::-1])
        assert np.array_equal(mask, by_hand)


@pytest.mark.slow
def test_a_chosen_pair_averages_both_runs_and_applies_its_own_postprocessing(trained, tmp_path):
    """predict --model RESULTS/NAME with a pair: the mean of the two runs' probabilities."""
    results = trained["folders"].results / "TaskBlobs"
    runs = {p.parent.name: p for p in results.glob("*/*") if (p / "fold_0").is_dir()}
    members = [Member(configuration=path.name, run=run) for run_path in runs.values()
               for path, run in [(run_path.parent, run_path.name)]]
    members.sort(key=lambda m: m.configuration)
    pair = CandidateScore(members=members, score=0.5, per_label={}, postprocessing={"1": True, "2": False})
    choice = BestChoice(dataset="TaskBlobs", task_type="segmentation", metric="mean_foreground_dice",
                        folds=[0], n_cases=1, tta=False, candidates=[pair], chosen=pair)
    chosen_dir = tmp_path / "chosen"
    for member in members:
        (chosen_dir / member.configuration).mkdir(parents=True)
        (chosen_dir / member.configuration / member.run).symlink_to(member.folder(results))
    choice.save(chosen_dir / "best.json")

    predictor = Predictor.load(chosen_dir, tta=False)
    assert len(predictor.ensembles) == 2 and predictor.postprocessing == {"1": True, "2": False}
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(trained["dataset"].cases[0].images[0])))
    _, both = predictor.predict(volume, spacing=(2.5, 1.0, 1.0), return_probabilities=True)
    alone = [Predictor.load(m.folder(results), tta=False).predict(volume, spacing=(2.5, 1.0, 1.0),
                                                                   return_probabilities=True)[1] for m in members]
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone[0], alone[1])


@pytest.mark.slow
def test_runs_missing_folds_are_left_out_and_named(trained, capsys):
    results = trained["folders"].results / "TaskBlobs"
    partial = results / "2d" / "partial"
    (partial / "fold_0").mkdir(parents=True)
    source = next((results / "2d").glob("*/fold_0"))
    for name in ("plan.json", "checkpoint_best.pt"):
        (partial / "fold_0" / name).symlink_to(source / name)
    try:
        assert main(["find-best", "TaskBlobs", "--no-tta", *_args(trained)]) == 0
        printed = capsys.readouterr().out
        assert "not compared: 2d/partial: fold 1, 2, 3, 4 not trained" in printed
        # on fold 0 alone it is compared like the others
        assert main(["find-best", "TaskBlobs", "--no-tta", "--folds", "0", *_args(trained)]) == 0
        choice = BestChoice.load(results / "best.json")
        assert "2d/partial" in {c.label for c in choice.candidates} and choice.folds == [0]
    finally:
        import shutil

        shutil.rmtree(partial)


def test_find_best_without_runs_or_with_a_bad_fold_exits_2(tmp_path, capsys):
    images, masks = _write_volumes(tmp_path / "sources", 3)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    import_dataset("TaskEmpty", images, folders.raw, masks_dir=masks, label_map="1=ball,2=block", quiet=True,
                   n_jobs=1)
    args = ["--raw", str(folders.raw), "--results", str(folders.results)]
    assert main(["find-best", "TaskEmpty", *args]) == 2
    assert "nothing trained yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["find-best", "TaskEmpty", "--folds", "x", *args])


def test_budget_split_names_configurations_folds_and_why(trained):
    plan = pipeline.load_plan(trained["dataset"], trained["folders"])
    split = split_budget(plan, 30, [2, 1, 1, 1, 1])
    assert split.configurations == ["2d", "3d_fullres"] and split.folds == [0, 1, 2, 3, 4]
    assert split.minutes_per_run == pytest.approx((30 - split.reserve_minutes) / 10, abs=1e-3)
    assert "10 runs" in split.reason
    short = split_budget(plan, 2.5, [2, 1, 1, 1, 1])
    assert len(short.folds) < 5 and short.minutes_per_run >= 1.0 and "left out" in short.reason
    with pytest.raises(InputError, match="at least"):
        split_budget(plan, 1.0, [2, 1, 1, 1, 1])
    lowres = replace(plan, configurations={**plan.configurations, "3d_lowres": plan.configurations["3d_fullres"]})
    assert "3d_lowres is not trained" in split_budget(lowres, 30, [2, 1, 1, 1, 1]).reason


def _masks(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def _choose_pair(results: Path) -> None:
    """Rewrite best.json to choose the pair (whatever the short training scored), so the
    package carries two runs."""
    choice = BestChoice.load(results / "best.json")
    pair = next(c for c in choice.candidates if len(c.members) == 2)
    replace(choice, chosen=pair).save(results / "best.json")


@pytest.mark.slow
def test_exported_choice_predicts_the_same_masks_from_zip_and_after_import(trained, tmp_path, capsys):
    results = trained["folders"].results / "TaskBlobs"
    assert main(["find-best", "TaskBlobs", "--no-tta", *_args(trained)]) == 0
    _choose_pair(results)
    inputs, _ = _write_volumes(tmp_path / "new", 2, seed=9)
    predict_folder(results, inputs, tmp_path / "from_results", tta=False)
    package = tmp_path / "blobs.zip"
    assert main(["export-model", str(results), str(package)]) == 0
    assert "find-best's choice" in capsys.readouterr().out
    predict_folder(package, inputs, tmp_path / "from_zip", tta=False)
    elsewhere = tmp_path / "elsewhere"
    assert main(["import-model", str(package), "--results", str(elsewhere)]) == 0
    imported = elsewhere / "TaskBlobs"
    assert (imported / "best.json").is_file() and len(list(imported.glob("*/*/fold_*"))) == 10
    predict_folder(imported, inputs, tmp_path / "from_import", tta=False)
    expected = _masks(tmp_path / "from_results")
    assert len(expected) == 2
    assert _masks(tmp_path / "from_zip") == expected == _masks(tmp_path / "from_import")
    assert main(["import-model", str(package), "--results", str(elsewhere)]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_and_train_find_best_trains_every_configuration_then_chooses(tmp_path, capsys):
    images, masks = _write_volumes(tmp_path / "sources", 4)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    import_dataset("TaskFour", images, folders.raw, masks_dir=masks, label_map="1=ball,2=block", quiet=True,
                   n_jobs=1)
    args = ["--raw", str(folders.raw), "--preprocessed", str(folders.preprocessed),
            "--results", str(folders.results), "--device", "cpu", "--workers", "0", "--n-jobs", "1"]
    assert main(["plan-and-train", "TaskFour", "--find-best", "--config", "2d", *args]) == 2
    assert "leave out --config" in capsys.readouterr().err
    assert main(["plan-and-train", "TaskFour", "--find-best", "--epochs", "1", "--iterations-per-epoch", "2",
                 *args]) == 0
    printed = capsys.readouterr().out
    assert "budget: no time budget: 2 configuration(s) x 4 folds" in printed and "chosen: " in printed
    choice = BestChoice.load(folders.results / "TaskFour" / "best.json")
    assert choice.n_cases == 4 and len(choice.candidates) == 3


@pytest.mark.slow
def test_train_missing_fills_the_folds_a_run_lacks_with_its_own_options(trained):
    dataset, folders = trained["dataset"], trained["folders"]
    pipeline.train(dataset, folders, TrainOptions(configuration="2d", fold="0", run_name="one-fold", loss="ce",
                                                  **TINY))
    run = folders.results / "TaskBlobs" / "2d" / "one-fold"
    try:
        choice = pipeline.find_best(dataset, folders, folds=[0, 1], tta=False, train_missing=True)
        assert (run / "fold_1" / "checkpoint_final.pt").is_file()
        from autoplan.runs import RunSpec

        spec = RunSpec.load(run / "fold_1" / "plan.json")
        assert spec.fold == 1 and spec.configuration.loss == "ce" and spec.options.epochs == TINY["epochs"]
        assert "2d/one-fold" in {c.label for c in choice.candidates}
    finally:
        import shutil

        shutil.rmtree(run)


@pytest.mark.slow
def test_classifiers_are_compared_by_balanced_accuracy(tmp_path, capsys):
    from autoplan.demo import DERM_CLASSES, write_demo_sources

    sources = write_demo_sources(tmp_path / "sources", n_xray=2, n_derm_per_class=6)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    dataset = import_dataset("DemoDerm", sources["derm_images"], folders.raw, labels_csv=sources["derm_labels"],
                             id_column="image_id", label_column="dx", group_column="patient", quiet=True, n_jobs=1)
    pipeline.plan(dataset, folders, device="cpu", n_jobs=1)
    for loss in ("ce", "ce_focal"):
        pipeline.train(dataset, folders, TrainOptions(fold="all", loss=loss, **TINY))
    choice = pipeline.find_best(dataset, folders, tta=False)
    assert choice.metric == "balanced_accuracy" and choice.n_cases == len(dataset.cases)
    assert len(choice.candidates) == 3 and set(choice.candidates[0].per_label) == set(DERM_CLASSES)
    for candidate in choice.candidates:
        assert 0.0 <= candidate.score <= 1.0 and not candidate.postprocessing
    # balanced accuracy is the mean of the per-class recalls
    assert choice.chosen.score == pytest.approx(np.mean(list(choice.chosen.per_label.values())))
    print(pipeline.describe_choice(choice, folders))
    table = capsys.readouterr().out
    assert "| candidate | balanced_accuracy | blob | ring | speckle |" in table
    predictions = predict_folder(folders.results / "DemoDerm", sources["derm_new"], tmp_path / "out", tta=False)
    assert predictions["n_predicted"] == len(DERM_CLASSES)
