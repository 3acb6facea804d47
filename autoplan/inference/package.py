"""Model packages: a trained run as one zip file that another machine predicts with.

``export_model(model_dir, out_zip)`` writes, for every fold of a run (or the one fold given),
its ``plan.json`` (configuration, labels or classes, post-processing and the quality
reference that predict compares new cases with) and its weights (``best`` or ``final``), with
``model.json``: the format, the autoplan version, what the model is, and a SHA-256 per file.
``open_package`` checks a zip against its manifest and unpacks it into a private folder that
``load_ensemble`` reads like a run folder; ``import_model`` unpacks it into a results folder.

Weights are saved as the network's state dict alone and read back with ``weights_only``
loading (``runs.load_checkpoint``): a package from someone else is data, never code.
"""

import atexit
import functools
import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import torch

from autoplan import __version__
from autoplan.errors import InputError
from autoplan.jsonio import atomic_write_bytes
from autoplan.paths import fold_folders
from autoplan.runs import RunSpec, load_checkpoint

PACKAGE_FORMAT = "autoplan-model"
PACKAGE_VERSION = 1
MANIFEST = "model.json"
WEIGHTS = {"best": ("checkpoint_best.pt", "checkpoint_final.pt"), "final": ("checkpoint_final.pt",)}
PACKAGED_CHECKPOINT = "checkpoint_best.pt"      # what load_trained reads in an unpacked fold


def is_package(path) -> bool:
    return Path(path).suffix.lower() == ".zip"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(fold: Path, weights: str) -> bytes:
    """The fold's chosen checkpoint reduced to ``{"model": state_dict}`` (no optimiser, no RNG)."""
    for name in WEIGHTS[weights]:
        if (fold / name).is_file():
            state = load_checkpoint(fold / name)
            buffer = io.BytesIO()
            torch.save({"model": state["model"]}, buffer)
            return buffer.getvalue()
    raise InputError(fold, f"has no {' or '.join(WEIGHTS[weights])} (training not finished)")


def export_model(model_dir, out_zip, weights: str = "best") -> dict:
    """Write the run (every fold of ``model_dir``, or the fold given) to ``out_zip``; returns
    the manifest. ``weights``: 'best' (best EMA checkpoint, else final) or 'final'."""
    if weights not in WEIGHTS:
        raise InputError(None, f"unknown weights {weights!r}: choose 'best' or 'final'")
    out_zip = Path(out_zip)
    if not is_package(out_zip):
        raise InputError(out_zip, "a model package is a .zip file: name the output OUT.zip")
    folds = fold_folders(model_dir)
    specs = [RunSpec.load(fold / "plan.json") for fold in folds]
    files = {}
    for fold in folds:
        files[f"{fold.name}/plan.json"] = (fold / "plan.json").read_bytes()
        files[f"{fold.name}/{PACKAGED_CHECKPOINT}"] = _weights_bytes(fold, weights)
    spec = specs[0]
    manifest = {"format": PACKAGE_FORMAT, "format_version": PACKAGE_VERSION, "autoplan_version": __version__,
                "dataset": spec.dataset, "task_type": spec.task_type, "configuration": spec.configuration.name,
                "run": folds[0].parent.name,
                "folds": [fold.name for fold in folds], "weights": weights,
                "labels": spec.labels, "classes": spec.classes,
                "sha256": {name: _sha256(data) for name, data in files.items()}}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for name, data in files.items():
            archive.writestr(name, data)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_zip, buffer.getvalue())
    return manifest


def _read_manifest(archive: zipfile.ZipFile, path: Path) -> dict:
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except KeyError:
        raise InputError(path, f"is not an autoplan model package (no {MANIFEST} inside)") from None
    except ValueError:
        raise InputError(path, f"has an unreadable {MANIFEST}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise InputError(path, f"is not an autoplan model package ({MANIFEST} names another format)")
    if manifest.get("format_version") != PACKAGE_VERSION:
        raise InputError(path, f"is a version {manifest.get('format_version')} model package; this autoplan "
                               f"({__version__}) reads version {PACKAGE_VERSION}")
    return manifest


def _checked_members(archive: zipfile.ZipFile, manifest: dict, path: Path) -> dict:
    """{member name: bytes} of every file the manifest lists, each matching its checksum."""
    listed = manifest.get("sha256")
    if not isinstance(listed, dict) or not listed:
        raise InputError(path, f"{MANIFEST} lists no files")
    present = set(archive.namelist()) - {MANIFEST}
    if present != set(listed):
        extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
        raise InputError(path, f"does not match its manifest (unlisted: {extra or 'none'}, missing: "
                               f"{missing or 'none'})")
    members = {}
    for name, checksum in listed.items():
        parts = PurePosixPath(name).parts
        if len(parts) != 2 or not parts[0].startswith("fold_") or parts[1] not in ("plan.json", PACKAGED_CHECKPOINT):
            raise InputError(path, f"holds an unexpected file {name!r}: refused")
        data = archive.read(name)
        if _sha256(data) != checksum:
            raise InputError(path, f"is corrupt: {name} does not match its checksum")
        members[name] = data
    return members


def read_package(path) -> tuple:
    """(manifest, {member: bytes}) of a model package, checked; InputError when it is not a
    readable autoplan package or any file differs from its checksum."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such model package")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(archive, path)
            return manifest, _checked_members(archive, manifest, path)
    except zipfile.BadZipFile:
        raise InputError(path, "is not a zip file (a model package is what autoplan export-model writes)") from None
    except (zipfile.LargeZipFile, OSError, EOFError) as error:
        raise InputError(path, f"cannot be read as a model package ({error})") from None


def _unpack(members: dict, folder: Path) -> None:
    for name, data in members.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _check_weights(path: Path, folder: Path, members: dict) -> None:
    """Every unpacked checkpoint loads as data; a refusal names the package and its member."""
    for name in members:
        if name.endswith(PACKAGED_CHECKPOINT):
            try:
                load_checkpoint(folder / name)
            except InputError as error:
                raise InputError(path, f"{name} {error.problem}") from None


@functools.lru_cache(maxsize=8)
def _unpacked(path: Path) -> Path:
    return open_package(path)


def model_folder(path) -> Path:
    """The folder to read a model from: ``path`` itself, or a package's unpacked private folder
    (checked and unpacked once per process, however many stages ask)."""
    return _unpacked(Path(path).resolve()) if is_package(path) else Path(path)


def open_package(path) -> Path:
    """A private folder holding the package's fold folders (removed when the process ends)."""
    _, members = read_package(path)
    folder = Path(tempfile.mkdtemp(prefix="autoplan-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _unpack(members, folder)
    _check_weights(Path(path), folder, members)
    return folder


def import_model(path, results_root, overwrite: bool = False) -> Path:
    """Unpack a package into ``RESULTS/DATASET/CONFIGURATION/RUN`` (the run folder it came
    from); returns that folder. An existing folder is replaced only with ``overwrite``."""
    manifest, members = read_package(path)
    run_dir = Path(results_root) / manifest["dataset"] / manifest["configuration"] / manifest["run"]
    if run_dir.exists() and not overwrite:
        raise InputError(run_dir, "exists already: add --overwrite to replace it")
    staging = run_dir.with_name(f".{run_dir.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    _unpack(members, staging)
    try:
        _check_weights(Path(path), staging, members)
    except InputError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    staging.rename(run_dir)
    return run_dir
