"""Atomic writes (a failure leaves the previous file and no temporary) and JSON round trips."""

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import autoplan.jsonio as jsonio
from autoplan.jsonio import (JsonDataclass, atomic_save_npy, atomic_write_text, dumps, read_json, to_jsonable,
                             write_json)


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_text_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "previous")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonio.os, failing, fail)
    with pytest.raises(OSError, match="No space") as raised:
        atomic_write_text(path, "new and longer content")
    assert raised.value.filename == str(path)     # the CLI's one line names the file
    assert path.read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_a_value_that_cannot_be_serialised_does_not_touch_the_file(tmp_path):
    path = tmp_path / "plans.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert read_json(path) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_a_failed_npy_save_leaves_the_previous_array_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "case.npy"
    atomic_save_npy(path, np.arange(4))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt     # also an interrupt mid-write: BaseException, not only Exception

    monkeypatch.setattr(jsonio.np, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_npy(path, np.zeros(100))
    monkeypatch.undo()
    assert np.array_equal(np.load(path), np.arange(4))
    assert _leftovers(tmp_path) == []


def test_atomic_files_get_the_permissions_of_an_ordinary_open(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "x")        # parent folders are made
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a" / "b.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    atomic_save_npy(tmp_path / "c.npy", np.ones(2))
    assert stat.S_IMODE(os.stat(tmp_path / "c.npy").st_mode) == mode


@dataclass
class Stage:
    name: str
    features: int
    kernel: tuple[int, ...] = (3, 3)


@dataclass
class Artifact(JsonDataclass):
    dataset: str
    spacing: tuple[float, ...]
    stages: list[Stage]
    best: Stage | None = None
    scores: dict[str, float] = field(default_factory=dict)
    ratio: float = 1.0
    note: str | None = None


def _artifact(**changes) -> Artifact:
    values = dict(dataset="Task", spacing=(1.0, 0.5), stages=[Stage("enc", 32), Stage("dec", 64, (1, 3))],
                  best=Stage("bottleneck", 320, (3, 3)), scores={"dice": 0.91, "hd95": 3.5}, ratio=2.0)
    return Artifact(**{**values, **changes})


def test_a_dataclass_saves_and_loads_identical_with_nested_dataclasses(tmp_path):
    original = _artifact()
    original.save(tmp_path / "artifact.json")
    loaded = Artifact.load(tmp_path / "artifact.json")
    assert loaded == original
    assert isinstance(loaded.stages[1], Stage) and loaded.stages[1].kernel == (1, 3)
    assert isinstance(loaded.best, Stage) and isinstance(loaded.spacing, tuple)
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "artifact.json").read_text()


def test_numpy_values_save_as_plain_json_and_load_as_python_numbers(tmp_path):
    original = _artifact(spacing=tuple(np.array([1.0, 0.5], np.float32)), ratio=np.float64(2.0),
                         stages=[Stage("enc", np.int64(32))], scores={"dice": np.float32(0.5)})
    original.save(tmp_path / "artifact.json")
    raw = json.loads((tmp_path / "artifact.json").read_text())
    assert raw["stages"][0]["features"] == 32 and raw["scores"] == {"dice": 0.5}
    loaded = Artifact.load(tmp_path / "artifact.json")
    assert loaded == original
    assert type(loaded.ratio) is float and type(loaded.stages[0].features) is int
    assert type(loaded.spacing[0]) is float


def test_whole_floats_written_as_ints_load_as_floats_and_nan_becomes_none(tmp_path):
    path = tmp_path / "artifact.json"
    path.write_text(json.dumps({"dataset": "Task", "spacing": [1, 2], "stages": [], "ratio": 3}))
    loaded = Artifact.load(path)
    assert loaded.ratio == 3.0 and type(loaded.ratio) is float and loaded.spacing == (1.0, 2.0)
    assert loaded.best is None and loaded.scores == {}        # missing fields keep their defaults
    assert to_jsonable({"a": float("nan"), "b": np.float32("inf"), "c": np.bool_(True)}) == \
        {"a": None, "b": None, "c": True}


def test_paths_and_tuples_become_strings_and_lists():
    assert to_jsonable({"root": Path("/data/Task"), "shape": (1, 2), 3: np.arange(2)}) == \
        {"root": "/data/Task", "shape": [1, 2], "3": [0, 1]}
    assert dumps({"a": 1}).endswith("}\n")
