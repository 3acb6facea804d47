"""Where the folders are (flag > environment > default) and the results layout inside them."""

from pathlib import Path

import pytest

from autoplan.errors import InputError
from autoplan.paths import (Folders, fingerprint_file, fold_folder, fold_folders, plans_file,
                            preprocessed_folder, resolve_folders, splits_file, throughput_file)

FOLDERS = {"raw": ("AUTOPLAN_RAW", "datasets_raw"), "preprocessed": ("AUTOPLAN_PREPROCESSED", "preprocessed"),
           "results": ("AUTOPLAN_RESULTS", "results")}


@pytest.fixture
def no_env(monkeypatch):
    for variable, _ in FOLDERS.values():
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_a_flag_beats_the_environment_which_beats_the_default(kind, no_env, tmp_path):
    variable, default = FOLDERS[kind]
    assert getattr(resolve_folders(), kind) == Path(".") / default
    no_env.setenv(variable, str(tmp_path / "from_env"))
    assert getattr(resolve_folders(), kind) == tmp_path / "from_env"
    assert getattr(resolve_folders(**{kind: tmp_path / "from_flag"}), kind) == tmp_path / "from_flag"
    others = [other for other in FOLDERS if other != kind]
    for other in others:          # one folder's flag or variable does not move the others
        assert getattr(resolve_folders(**{kind: tmp_path / "from_flag"}), other) == Path(".") / FOLDERS[other][1]


def test_an_empty_variable_counts_as_unset_and_home_is_expanded(no_env):
    no_env.setenv("AUTOPLAN_RESULTS", "")
    assert resolve_folders().results == Path("results")
    assert resolve_folders(raw="~/data").raw == Path.home() / "data"


def test_the_results_layout(tmp_path):
    folders = Folders(raw=tmp_path / "raw", preprocessed=tmp_path / "pre", results=tmp_path / "res")
    assert folders.dataset_raw("Task") == tmp_path / "raw" / "Task"
    assert folders.dataset_results("Task") == tmp_path / "res" / "Task"
    for layout, name in ((fingerprint_file, "fingerprint.json"), (plans_file, "plans.json"),
                         (splits_file, "splits.json"), (throughput_file, "throughput.json")):
        assert layout(folders.results, "Task") == tmp_path / "res" / "Task" / name
        assert layout(str(folders.results), "Task") == tmp_path / "res" / "Task" / name   # str roots too
    assert preprocessed_folder(folders.preprocessed, "Task", "2d") == tmp_path / "pre" / "Task" / "2d"
    assert fold_folder(folders.results, "Task", "3d_fullres", "run", 3) == \
        tmp_path / "res" / "Task" / "3d_fullres" / "run" / "fold_3"
    assert fold_folder(folders.results, "Task", "2d", "run", "all").name == "fold_all"


def _fold(run: Path, name: str, plan=True) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    if plan:
        (folder / "plan.json").write_text("{}")
    return folder


def test_fold_folders_are_in_numeric_order_and_skip_folders_without_a_plan(tmp_path):
    run = tmp_path / "run"
    folds = [_fold(run, f"fold_{k}") for k in (10, 2, 0, 1)]
    _fold(run, "fold_3", plan=False)          # an interrupted fold: no plan.json
    _fold(run, "fold_all")
    (run / "notes").mkdir()
    found = fold_folders(run)
    assert [f.name for f in found] == ["fold_0", "fold_1", "fold_2", "fold_10", "fold_all"]
    assert set(found[:4]) == set(folds)


def test_a_fold_folder_is_its_own_model(tmp_path):
    fold = _fold(tmp_path / "run", "fold_0")
    assert fold_folders(fold) == [fold]
    assert fold_folders(str(fold)) == [fold]


def test_a_missing_folder_or_one_without_plan_json_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such run folder") as missing:
        fold_folders(tmp_path / "nowhere")
    assert missing.value.path == tmp_path / "nowhere"
    empty = tmp_path / "empty"
    _fold(empty, "fold_0", plan=False)
    with pytest.raises(InputError, match="no plan.json") as no_plan:
        fold_folders(empty)
    assert no_plan.value.path == empty
