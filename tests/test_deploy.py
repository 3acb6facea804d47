"""Sharing a trained model: model packages (export-model / import-model / predict --model OUT.zip)
and the Python API (``autoplan.Predictor``), which must give what the command line gives."""

import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from autoplan import Predictor
from autoplan.cli import main
from autoplan.errors import InputError
from autoplan.inference import predict_folder
from autoplan.inference.package import MANIFEST, export_model, import_model, read_package
from test_inference import CLASSES, make_classification_run, make_segmentation_run

ROOT = Path(__file__).resolve().parents[1]


def _volumes(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        image = sitk.GetImageFromArray(rng.normal(100, 30, size=(20, 24, 22)).astype(np.float32))
        image.SetSpacing((1.0, 1.2, 2.0))
        image.SetOrigin((5.0, -3.0, 7.0))
        sitk.WriteImage(image, str(folder / f"case_{i}.nii.gz"))
    return folder


def _pngs(folder: Path, sizes=((40, 52), (31, 27))) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, size=(h, w), dtype=np.uint8)).save(folder / f"xray_{i}.png")
    return folder


def _two_fold_run(tmp_path: Path, dim: int) -> Path:
    """A run folder with two differently initialised folds (an ensemble)."""
    fold0 = make_segmentation_run(tmp_path, dim)
    spec = json.loads((fold0 / "plan.json").read_text())
    fold1 = fold0.parent / "fold_1"
    fold1.mkdir()
    spec["fold"] = 1
    (fold1 / "plan.json").write_text(json.dumps(spec))
    state = torch.load(fold0 / "checkpoint_best.pt", weights_only=True)
    torch.manual_seed(7)
    state["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, fold1 / "checkpoint_best.pt")
    return fold0.parent


def _mask_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "qc.csv"}


def test_exported_then_imported_model_gives_byte_identical_masks(tmp_path):
    run = _two_fold_run(tmp_path, 3)
    inputs = _volumes(tmp_path / "in")
    predict_folder(run, inputs, tmp_path / "from_run", tta=False)
    masks = _mask_bytes(tmp_path / "from_run")
    labels_seen = set()
    for name in masks:
        labels_seen |= set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_run" / name)))))
    assert len(labels_seen) > 1          # a prediction with structure, not one constant label

    package = tmp_path / "model.zip"
    manifest = export_model(run, package)
    assert manifest["folds"] == ["fold_0", "fold_1"] and manifest["dataset"] == "TaskToy"
    # a fresh process predicts from the zip itself, and from the run import-model unpacks
    fresh = subprocess.run([sys.executable, "-m", "autoplan", "predict", "--model", str(package), "--input",
                            str(inputs), "--output", str(tmp_path / "from_zip"), "--no-tta"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert _mask_bytes(tmp_path / "from_zip") == masks
    imported = import_model(package, tmp_path / "elsewhere" / "results")
    assert imported == tmp_path / "elsewhere" / "results" / "TaskToy" / "3d_fullres" / run.name
    predict_folder(imported, inputs, tmp_path / "from_import", tta=False)
    assert _mask_bytes(tmp_path / "from_import") == masks
    with pytest.raises(InputError, match="exists already"):
        import_model(package, tmp_path / "elsewhere" / "results")


def _fresh_environment(folder: Path) -> Path:
    """A new virtual environment with autoplan installed in it from a copy of the sources (not
    this checkout's editable install); its dependencies come from this environment's
    site-packages, which it sees as a plain path (so this checkout's autoplan stays invisible).
    Returns its python."""
    import shutil
    import site
    import venv

    venv.EnvBuilder(with_pip=False).create(folder / "venv")      # this pip installs into it (--python)
    python = folder / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    source = folder / "source"
    shutil.copytree(ROOT / "autoplan", source / "autoplan", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, capture_output=True, timeout=300)
    return python


@pytest.mark.slow
def test_model_imported_in_a_fresh_virtual_environment_gives_byte_identical_masks(tmp_path):
    """Issue 27's done-when: export here, import and predict in another environment, another
    folder, with only the zip."""
    run = _two_fold_run(tmp_path, 3)
    inputs = _volumes(tmp_path / "in")
    predict_folder(run, inputs, tmp_path / "here", tta=False)
    package = tmp_path / "model.zip"
    export_model(run, package)
    python = _fresh_environment(tmp_path / "fresh")
    where = subprocess.run([str(python), "-c", "import autoplan; print(autoplan.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "fresh" / "venv") in where, where
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (["import-model", str(package), "--results", "results"],
                    ["predict", "--model", f"results/TaskToy/3d_fullres/{run.name}", "--input", str(inputs),
                     "--output", "masks", "--no-tta"]):
        done = subprocess.run([str(python), "-m", "autoplan", *command], cwd=elsewhere, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert _mask_bytes(elsewhere / "masks") == _mask_bytes(tmp_path / "here")


def test_package_holds_weights_only_and_final_weights_on_request(tmp_path):
    fold = make_segmentation_run(tmp_path, 2)
    state = torch.load(fold / "checkpoint_best.pt", weights_only=True)
    state["optimizer"] = {"state": {}, "param_groups": []}
    torch.save(state, fold / "checkpoint_best.pt")
    torch.save({"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}, fold / "checkpoint_final.pt")
    export_model(fold, tmp_path / "best.zip")
    export_model(fold, tmp_path / "final.zip", weights="final")
    _, best = read_package(tmp_path / "best.zip")
    _, final = read_package(tmp_path / "final.zip")
    best_state = torch.load(io.BytesIO(best["fold_0/checkpoint_best.pt"]), weights_only=True)
    final_state = torch.load(io.BytesIO(final["fold_0/checkpoint_best.pt"]), weights_only=True)
    assert list(best_state) == ["model"]          # no optimiser state, no RNG: weights alone
    assert all(torch.equal(best_state["model"][k], state["model"][k]) for k in state["model"])
    assert all(not v.any() for v in final_state["model"].values())


def _rewrite(package: Path, target: Path, change) -> Path:
    """A copy of ``package`` with ``change(members: dict)`` applied (manifest included)."""
    with zipfile.ZipFile(package) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def _flip_a_weight_byte(members):
    name = "fold_0/checkpoint_best.pt"
    data = bytearray(members[name])
    data[len(data) // 2] ^= 0xFF
    members[name] = bytes(data)


class Smuggled:
    def __reduce__(self):
        return (print, ("this would have run",))


def _smuggle_code_with_valid_checksums(members):
    buffer = io.BytesIO()
    torch.save({"model": {}, "payload": Smuggled()}, buffer)
    members["fold_0/checkpoint_best.pt"] = buffer.getvalue()
    manifest = json.loads(members[MANIFEST])
    manifest["sha256"]["fold_0/checkpoint_best.pt"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    members[MANIFEST] = json.dumps(manifest).encode()


@pytest.mark.parametrize("damage, message", [
    (_flip_a_weight_byte, "does not match its checksum"),
    (lambda members: members.pop(MANIFEST), "not an autoplan model package"),
    (lambda members: members.update({"../evil.py": b"print(1)"}), "does not match its manifest"),
    (_smuggle_code_with_valid_checksums, "could run code"),
])
def test_corrupt_foreign_or_malicious_packages_are_refused_with_exit_2(tmp_path, capsys, damage, message):
    fold = make_segmentation_run(tmp_path, 2)
    export_model(fold, tmp_path / "model.zip")
    bad = _rewrite(tmp_path / "model.zip", tmp_path / "bad.zip", damage)
    inputs = _pngs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(bad), "--input", str(inputs), "--output", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0] and "bad.zip" in error[0]
    assert not out.exists() or not any(out.iterdir())
    assert main(["import-model", str(bad), "--results", str(tmp_path / "results")]) == 2
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.pt"))


def test_a_file_that_is_not_a_zip_is_refused(tmp_path, capsys):
    (tmp_path / "model.zip").write_bytes(b"not a zip at all")
    assert main(["import-model", str(tmp_path / "model.zip"), "--results", str(tmp_path / "r")]) == 2
    assert "is not a zip file" in capsys.readouterr().err


def test_python_api_gives_the_command_lines_masks(tmp_path):
    run3d = _two_fold_run(tmp_path, 3)
    inputs = _volumes(tmp_path / "in3d")
    predict_folder(run3d, inputs, tmp_path / "out3d", tta=True)
    predictor = Predictor.load(run3d)
    assert predictor.task_type == "segmentation" and len(predictor.ensemble.networks) == 2
    for path in sorted(inputs.iterdir()):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        labels, probabilities = predictor.predict(array, spacing=image.GetSpacing()[::-1], return_probabilities=True)
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out3d" / path.name)))
        assert np.array_equal(labels, expected)
        assert probabilities.shape == (len(predictor.labels), *array.shape)

    fold2d = make_segmentation_run(tmp_path, 2)
    pngs = _pngs(tmp_path / "in2d")
    predict_folder(fold2d, pngs, tmp_path / "out2d", tta=True)
    predictor = Predictor.load(fold2d)
    for path in sorted(pngs.iterdir()):
        expected = np.asarray(Image.open(tmp_path / "out2d" / path.name))
        assert np.array_equal(predictor.predict(np.asarray(Image.open(path))), expected)
    with pytest.raises(InputError, match="takes"):
        predictor.predict(np.zeros((2, 3, 20, 20)))


def test_python_api_classifies_as_the_command_line(tmp_path):
    model = make_classification_run(tmp_path, n_folds=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    photos = {"a": rng.integers(0, 255, (30, 40, 3), dtype=np.uint8),
              "b": rng.integers(0, 255, (50, 20, 3), dtype=np.uint8)}
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(inputs / f"{name}.png")
    predict_folder(model, inputs, tmp_path / "out", tta=True)
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        rows = {row["case"]: [float(row[c]) for c in CLASSES] for row in csv.DictReader(handle)}
    predictor = Predictor.load(model)
    assert predictor.classes == list(CLASSES)
    probabilities = predictor.classify([photos["a"], photos["b"]])
    assert probabilities.shape == (2, len(CLASSES))
    assert np.allclose(probabilities, [rows["a"], rows["b"]], atol=1e-4)
    with pytest.raises(InputError, match="classification model, not a segmentation"):
        predictor.predict(np.zeros((32, 32)))


def test_the_documented_example_runs(tmp_path, monkeypatch):
    """docs/deploy.md's Python example, run as written against small models under its names."""
    import re
    import shutil

    text = (ROOT / "docs" / "deploy.md").read_text()
    example = re.search(r"## The Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    fold2d = make_segmentation_run(tmp_path / "models", 2)
    (tmp_path / "results" / "TaskXRay" / "2d").mkdir(parents=True)
    shutil.copytree(fold2d.parent, tmp_path / "results" / "TaskXRay" / "2d" / "RUN")
    export_model(make_segmentation_run(tmp_path / "models", 3), tmp_path / "hippocampus_model.zip")
    export_model(make_classification_run(tmp_path / "models"), tmp_path / "derm_model.zip")
    _pngs(tmp_path / "new_xrays", sizes=((36, 30),))
    (tmp_path / "new_xrays" / "xray_0.png").rename(tmp_path / "new_xrays" / "JPCLN001.png")
    shutil.copy(sorted(_volumes(tmp_path / "volumes").iterdir())[0], tmp_path / "scan.nii.gz")
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
        tmp_path / "lesion.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "docs/deploy.md", "exec"), namespace)
    assert namespace["labels"].shape == sitk.GetArrayFromImage(sitk.ReadImage("scan.nii.gz")).shape
    assert namespace["probabilities"].shape == (1, len(CLASSES))
