"""Cross-validation splits: grouped (no lesion on both sides), stratified, deterministic."""

import csv
from collections import Counter

import pytest

from conftest import shared_dataset

from autoplan.datasets import Case, Dataset
from autoplan.paths import splits_file
from autoplan.splits import load_or_create_splits, make_splits


def _classification_dataset(rows):
    cases = [Case(id=r["case"], images=[], class_name=r["label"], group=r.get("group")) for r in rows]
    classes = sorted({r["label"] for r in rows})
    return Dataset(name="T", root=None, task_type="classification", channel_names={"0": "R", "1": "G", "2": "B"},
                   labels={}, file_ending=".jpg", cases=cases, classes=classes)


def test_grouped_split_keeps_each_group_on_one_side():
    rows = [{"case": f"c{i}", "label": "ab"[i % 2], "group": f"g{i // 3}"} for i in range(60)]
    splits = make_splits(_classification_dataset(rows))
    assert len(splits) == 5
    group_of = {r["case"]: r["group"] for r in rows}
    all_val = []
    for fold in splits:
        train_groups = {group_of[c] for c in fold["train"]}
        val_groups = {group_of[c] for c in fold["val"]}
        assert not train_groups & val_groups
        all_val += fold["val"]
    assert sorted(all_val) == sorted(r["case"] for r in rows)   # every case validated exactly once


def test_splits_are_deterministic_and_saved(tmp_path):
    rows = [{"case": f"c{i}", "label": "abc"[i % 3]} for i in range(30)]
    dataset = _classification_dataset(rows)
    assert make_splits(dataset) == make_splits(dataset)
    first = load_or_create_splits(dataset, tmp_path)
    assert splits_file(tmp_path, "T").is_file()
    assert load_or_create_splits(dataset, tmp_path) == first


@pytest.mark.realdata
def test_ham10000_lesions_never_cross_a_split():
    root = shared_dataset("ham10000")
    with open(root / "HAM10000_metadata.csv") as handle:
        rows = [{"case": r["image_id"], "label": r["dx"], "group": r["lesion_id"]} for r in csv.DictReader(handle)]
    splits = make_splits(_classification_dataset(rows))
    group_of = {r["case"]: r["group"] for r in rows}
    label_of = {r["case"]: r["label"] for r in rows}
    overall = Counter(label_of.values())
    for fold in splits:
        assert not {group_of[c] for c in fold["train"]} & {group_of[c] for c in fold["val"]}
        val_counts = Counter(label_of[c] for c in fold["val"])
        # stratified: every class present in every validation fold, near its overall share
        for label, count in overall.items():
            assert val_counts[label] == pytest.approx(count / 5, rel=0.35)
