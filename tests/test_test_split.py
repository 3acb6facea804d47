"""The untouched test split (autoplan split): grouped, stratified, deterministic, never in a
cross-validation fold, refused where it would leak, and scored alone by evaluate --split test."""

import csv
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset
from test_import import linked_subset, quick
from test_inference import make_classification_run

from autoplan.cli import main
from autoplan.datasets import Case, Dataset, load_dataset
from autoplan.errors import InputError
from autoplan.inference import evaluate_dataset
from autoplan.jsonio import read_json, write_json
from autoplan.paths import fingerprint_file, plans_file, splits_file
from autoplan.splits import load_or_create_splits
from autoplan.test_split import (TestSplit, create_test_split, development_dataset, evaluation_cases,
                                 held_out_file, make_test_split)


def _synthetic_dataset(n_lesions: int = 240, task_type: str = "classification", name: str = "T") -> Dataset:
    """Lesions of 1 to 4 images each; classes 70 / 20 / 10 % of the lesions (one class a lesion)."""
    rng = np.random.default_rng(7)
    cases = []
    for lesion in range(n_lesions):
        label = rng.choice(["nv", "mel", "df"], p=[0.7, 0.2, 0.1]) if task_type == "classification" else None
        for image in range(int(rng.integers(1, 5))):
            cases.append(Case(id=f"img{lesion:04d}_{image}", images=[], class_name=label, group=f"L{lesion}"))
    classes = ["df", "mel", "nv"] if task_type == "classification" else None
    return Dataset(name=name, root=Path("/nowhere") / name, task_type=task_type, channel_names={"0": "R"},
                   labels={} if classes else {"background": 0, "lesion": 1}, file_ending=".png", cases=cases,
                   classes=classes)


def _groups_of(dataset: Dataset, ids) -> set:
    by_id = {case.id: case.group for case in dataset.cases}
    return {by_id[c] for c in ids}


def test_test_split_is_grouped_stratified_and_deterministic():
    dataset = _synthetic_dataset()
    split = make_test_split(dataset, 0.15, seed=3)
    test_ids = set(split.cases)
    rest = {c.id for c in dataset.cases} - test_ids
    assert not _groups_of(dataset, test_ids) & _groups_of(dataset, rest)       # no lesion on both sides
    assert split.achieved_fraction == pytest.approx(0.15, abs=0.02)
    totals = Counter(c.class_name for c in dataset.cases)
    in_test = Counter(c.class_name for c in dataset.cases if c.id in test_ids)
    for name, total in totals.items():                      # every class near 15 % of its own images
        assert in_test[name] == pytest.approx(0.15 * total, abs=4), (name, in_test[name], total)
        assert split.per_class[name] == [in_test[name], total]
    assert make_test_split(dataset, 0.15, seed=3).cases == split.cases           # same seed, same cases
    assert make_test_split(dataset, 0.15, seed=4).cases != split.cases
    shuffled = Dataset(**{**vars(dataset), "cases": list(reversed(dataset.cases))})
    assert make_test_split(shuffled, 0.15, seed=3).cases == split.cases           # not the file order
    assert split.stratified_by == "class" and split.grouped_by.startswith("Case.group")


def test_segmentation_test_split_keeps_patients_whole():
    dataset = _synthetic_dataset(60, task_type="segmentation")
    split = make_test_split(dataset, 0.2)
    rest = {c.id for c in dataset.cases} - set(split.cases)
    assert not _groups_of(dataset, split.cases) & _groups_of(dataset, rest)
    assert split.achieved_fraction == pytest.approx(0.2, abs=0.03)
    assert split.stratified_by.startswith("none") and split.per_class == {}


def test_cross_validation_never_sees_a_test_case(tmp_path):
    dataset = _synthetic_dataset()
    split, _ = create_test_split(dataset, tmp_path, 0.15)
    assert TestSplit.load(held_out_file(tmp_path, "T")).cases == split.cases
    folds = load_or_create_splits(dataset, tmp_path)          # the whole dataset given: still left out
    test_ids = set(split.cases)
    for fold in folds:
        assert not (set(fold["train"]) | set(fold["val"])) & test_ids
        assert not _groups_of(dataset, fold["train"]) & _groups_of(dataset, fold["val"])
    validated = sorted(c for fold in folds for c in fold["val"])
    assert validated == sorted(c.id for c in development_dataset(dataset, tmp_path).cases)
    assert load_or_create_splits(development_dataset(dataset, tmp_path), tmp_path) == folds   # saved, reused


def test_splits_json_that_names_a_test_case_is_refused(tmp_path):
    dataset = _synthetic_dataset()
    old_folds = load_or_create_splits(dataset, tmp_path)              # folds made before the test split
    split, notes = create_test_split(dataset, tmp_path, 0.15)
    assert not splits_file(tmp_path, "T").exists() and any("splits.json" in n for n in notes)
    write_json(splits_file(tmp_path, "T"), old_folds)                # copied back from elsewhere
    with pytest.raises(InputError, match="untouched test split") as error:
        load_or_create_splits(dataset, tmp_path)
    assert Path(error.value.path) == splits_file(tmp_path, "T")


def test_making_a_split_removes_what_saw_its_cases_and_refuses_over_trained_runs(tmp_path):
    dataset = _synthetic_dataset()
    for path in (plans_file(tmp_path, "T"), fingerprint_file(tmp_path, "T")):
        write_json(path, {})
    create_test_split(dataset, tmp_path, 0.15)
    assert not plans_file(tmp_path, "T").exists() and not fingerprint_file(tmp_path, "T").exists()
    again, notes = create_test_split(dataset, tmp_path, 0.15)     # the same cases: nothing changes
    assert notes[0].startswith("unchanged")
    fold = tmp_path / "T" / "classifier" / "run" / "fold_0"
    write_json(fold / "plan.json", {})
    with pytest.raises(InputError, match="--overwrite") as error:
        create_test_split(dataset, tmp_path, 0.25)
    assert Path(error.value.path) == fold
    assert TestSplit.load(held_out_file(tmp_path, "T")).cases == again.cases     # the saved one stays
    changed, notes = create_test_split(dataset, tmp_path, 0.25, overwrite=True)
    assert len(changed.cases) > len(again.cases) and "train them again" in notes[0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1])
def test_fractions_outside_zero_to_one_are_refused(fraction):
    with pytest.raises(InputError, match="between 0 and 1"):
        make_test_split(_synthetic_dataset(20), fraction)


def test_a_fraction_too_small_for_one_group_is_refused():
    with pytest.raises(InputError, match="no test case"):
        make_test_split(_synthetic_dataset(20), 0.001)


def test_evaluation_cases_without_a_test_split_says_how_to_make_one(tmp_path):
    dataset = _synthetic_dataset(20)
    assert evaluation_cases(dataset, tmp_path, "all").label == "all cases of T"
    with pytest.raises(InputError, match="autoplan split T"):
        evaluation_cases(dataset, tmp_path, "test")


# ----------------------------------------------------------------------------- on disk, with a model


def _write_image_dataset(root: Path, n_lesions: int = 24) -> Path:
    """RAW/TaskDerm: 16 x 16 RGB PNGs of the tiny classifier's classes, 1-2 images a lesion."""
    (root / "imagesTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = []
    for lesion in range(n_lesions):
        label = ["akiec", "bcc", "nv"][lesion % 3]
        for image in range(1 + lesion % 2):
            case = f"img{lesion:02d}{image}"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / "imagesTr" / f"{case}_0000.png")
            cases.append({"case": case, "label": label, "group": f"L{lesion}"})
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {}, "numTraining": len(cases),
        "file_ending": ".png", "task_type": "classification", "classes": ["akiec", "bcc", "nv"], "cases": cases}))
    return root


def _touch_weights(fold_dir: Path, when: float) -> None:
    os.utime(fold_dir / "checkpoint_best.pt", (when, when))


def test_cli_split_then_evaluate_scores_exactly_the_test_cases(tmp_path, capsys):
    raw, results = tmp_path / "raw", tmp_path / "results"
    _write_image_dataset(raw / "TaskDerm")
    folders = ["--raw", str(raw), "--results", str(results)]
    assert main(["split", "TaskDerm", "--test-fraction", "0.25", "--seed", "1", *folders]) == 0
    assert "test split of TaskDerm" in capsys.readouterr().out
    split = TestSplit.load(held_out_file(results, "TaskDerm"))
    model = make_classification_run(tmp_path)             # a classifier "of TaskDerm" saved before the split
    _touch_weights(model, time.time() - 3600)
    evaluate = ["evaluate", "--model", str(model), "--dataset", "TaskDerm", "--split", "test", "--no-tta", *folders]
    assert main(evaluate) == 2
    assert "trained before the test split" in capsys.readouterr().err
    _touch_weights(model, time.time() + 1)
    assert main(evaluate) == 0
    assert f"untouched test split ({len(split.cases)} cases)" in capsys.readouterr().out
    metrics = read_json(model / "TaskDerm_test" / "metrics.json")
    assert sorted(entry["case"] for entry in metrics["per_case"]) == split.cases
    assert metrics["split"] == f"untouched test split ({len(split.cases)} cases)"
    assert metrics["split"] in (model / "TaskDerm_test" / "report.md").read_text()
    # the default stays every case of the dataset
    everything = evaluate_dataset(model, load_dataset(raw / "TaskDerm"), tmp_path / "all", tta=False)
    assert everything["n_cases"] == len(load_dataset(raw / "TaskDerm").cases)
    assert everything["split"] == "all cases of TaskDerm"


def test_cli_split_refuses_a_new_fraction_over_trained_runs(tmp_path, capsys):
    raw, results = tmp_path / "raw", tmp_path / "results"
    _write_image_dataset(raw / "TaskDerm")
    folders = ["--raw", str(raw), "--results", str(results)]
    assert main(["split", "TaskDerm", "--test-fraction", "0.2", *folders]) == 0
    write_json(results / "TaskDerm" / "classifier" / "run" / "fold_0" / "plan.json", {})
    assert main(["split", "TaskDerm", "--test-fraction", "0.3", *folders]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["split", "TaskDerm", "--test-fraction", "0.3", "--overwrite", *folders]) == 0


def test_cli_fingerprint_after_a_split_leaves_the_test_cases_out(tmp_path):
    raw, results = tmp_path / "raw", tmp_path / "results"
    _write_image_dataset(raw / "TaskDerm")
    folders = ["--raw", str(raw), "--results", str(results), "--n-jobs", "1"]
    assert main(["fingerprint", "TaskDerm", *folders]) == 0
    n_all = read_json(fingerprint_file(results, "TaskDerm"))["n_cases"]
    assert main(["split", "TaskDerm", *folders]) == 0                 # removes that fingerprint: it saw them
    assert not fingerprint_file(results, "TaskDerm").exists()
    assert main(["fingerprint", "TaskDerm", *folders]) == 0
    n_test = len(TestSplit.load(held_out_file(results, "TaskDerm")).cases)
    assert read_json(fingerprint_file(results, "TaskDerm"))["n_cases"] == n_all - n_test


# ----------------------------------------------------------------------------- HAM10000


def _ham_subset(tmp_path: Path, lesions_per_class: int = 80) -> tuple:
    """RAW/TaskDerm from every image of the first lesions (sorted) of three classes: ~320 images,
    many lesions in two or more of them."""
    ham = shared_dataset("ham10000")
    rows = list(csv.DictReader(open(ham / "HAM10000_metadata.csv")))
    lesions = set()
    for name in ("akiec", "bcc", "nv"):
        lesions |= set(sorted({r["lesion_id"] for r in rows if r["dx"] == name})[:lesions_per_class])
    chosen = [r for r in rows if r["lesion_id"] in lesions]
    images = linked_subset([ham / "images" / f"{r['image_id']}.jpg" for r in chosen], tmp_path / "images")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    dataset = quick(name="TaskDerm", images_dir=images, labels_csv=table, raw_root=tmp_path / "raw",
                    id_column="image_id", label_column="dx", group_column="lesion_id")
    return dataset, {r["image_id"]: r["lesion_id"] for r in chosen}


@pytest.mark.realdata
def test_ham10000_subset_test_split_and_evaluate(tmp_path):
    dataset, lesion_of = _ham_subset(tmp_path)
    assert len(dataset.cases) > 250 and len(set(lesion_of.values())) < len(dataset.cases)   # duplicated lesions
    results = tmp_path / "results"
    split, _ = create_test_split(dataset, results, 0.15)
    test_ids = set(split.cases)
    assert split.achieved_fraction == pytest.approx(0.15, abs=0.02)
    assert not {lesion_of[c] for c in test_ids} & {lesion_of[c.id] for c in dataset.cases if c.id not in test_ids}
    for name, (in_test, total) in split.per_class.items():
        assert in_test == pytest.approx(0.15 * total, abs=3), name
    for fold in load_or_create_splits(dataset, results):
        assert not (set(fold["train"]) | set(fold["val"])) & test_ids

    model = make_classification_run(tmp_path)
    metrics = evaluate_dataset(model, dataset, tmp_path / "eval", tta=False, split="test", results_dir=results)
    assert sorted(entry["case"] for entry in metrics["per_case"]) == split.cases
    assert metrics["n_cases"] == len(split.cases) and metrics["split"].startswith("untouched test split")
    assert "lesions" in metrics["ci95"]["resampled"]
