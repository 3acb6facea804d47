"""Model packages: a trained run as one zip file that another machine predicts with.

``export_model(model_dir, out_zip)`` writes, for every fold of a run (or the one fold given),
its ``plan.json`` (configuration, labels or classes, post-processing and the quality
reference that predict compares new cases with) and its weights (``best`` or ``final``), with
``model.json``: the format, the autoplan version, what the model is, and a SHA-256 per file.
Given a dataset's results folder, it writes what find-best chose instead: ``best.json`` and
the chosen runs as ``CONFIGURATION/RUN/fold_K/`` (format version 2; a single run stays
version 1). ``open_package`` checks a zip against its manifest and unpacks it into a private
folder that ``Predictor.load`` reads like a run (or results) folder; ``import_model`` unpacks
it into a results folder.

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
from autoplan.artifacts import BEST_FILE, BestChoice
from autoplan.errors import InputError
from autoplan.jsonio import atomic_write_bytes
from autoplan.paths import fold_folders
from autoplan.runs import RunSpec, load_checkpoint

PACKAGE_FORMAT = "autoplan-model"
PACKAGE_VERSION = 1                 # one run: fold_K/{plan.json, weights}
CHOICE_VERSION = 2                  # a find-best choice: best.json, CONFIGURATION/RUN/fold_K/...
READABLE_VERSIONS = (PACKAGE_VERSION, CHOICE_VERSION)
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


def _fold_files(folds: list, prefix: str, weights: str) -> dict:
    files = {}
    for fold in folds:
        files[f"{prefix}{fold.name}/plan.json"] = (fold / "plan.json").read_bytes()
        files[f"{prefix}{fold.name}/{PACKAGED_CHECKPOINT}"] = _weights_bytes(fold, weights)
    return files


def _run_contents(model_dir, weights: str) -> tuple:
    """(manifest fields, files) of one run, or of the one fold given."""
    folds = fold_folders(model_dir)
    spec = RunSpec.load(folds[0] / "plan.json")
    if getattr(spec.configuration, "previous_stage", None):
        # a package holds one run; a cascade also needs its first stage's run to predict
        raise InputError(model_dir, f"is a cascade ({spec.configuration.name} after "
                                    f"{spec.configuration.previous_stage}): model packages of cascades are not "
                                    "supported yet; share the results folder with both runs instead")
    fields = {"format_version": PACKAGE_VERSION, "dataset": spec.dataset, "task_type": spec.task_type,
              "configuration": spec.configuration.name, "run": folds[0].parent.name,
              "folds": [fold.name for fold in folds], "labels": spec.labels, "classes": spec.classes}
    return fields, _fold_files(folds, "", weights)


def _choice_contents(results_dir: Path, weights: str) -> tuple:
    """(manifest fields, files) of find-best's choice in a dataset's results folder."""
    choice = BestChoice.load(results_dir / BEST_FILE)
    files = {BEST_FILE: (results_dir / BEST_FILE).read_bytes()}
    folds = {}
    for member in choice.chosen.members:
        member_folds = fold_folders(member.folder(results_dir))
        folds[member.label] = [fold.name for fold in member_folds]
        files.update(_fold_files(member_folds, f"{member.label}/", weights))
    spec = RunSpec.load(fold_folders(choice.chosen.members[0].folder(results_dir))[0] / "plan.json")
    fields = {"format_version": CHOICE_VERSION, "dataset": choice.dataset, "task_type": choice.task_type,
              "configuration": choice.chosen.label, "run": None, "members": [m.label for m in choice.chosen.members],
              "folds": folds, "labels": spec.labels, "classes": spec.classes}
    return fields, files


def export_model(model_dir, out_zip, weights: str = "best") -> dict:
    """Write the run (every fold of ``model_dir``, or the fold given), or the choice of
    find-best when ``model_dir`` is a dataset's results folder with best.json, to ``out_zip``;
    returns the manifest. ``weights``: 'best' (best EMA checkpoint, else final) or 'final'."""
    if weights not in WEIGHTS:
        raise InputError(None, f"unknown weights {weights!r}: choose 'best' or 'final'")
    out_zip = Path(out_zip)
    if not is_package(out_zip):
        raise InputError(out_zip, "a model package is a .zip file: name the output OUT.zip")
    is_choice = (Path(model_dir) / BEST_FILE).is_file()
    fields, files = (_choice_contents if is_choice else _run_contents)(Path(model_dir), weights)
    manifest = {"format": PACKAGE_FORMAT, **fields, "autoplan_version": __version__, "weights": weights,
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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise InputError(path, f"is a version {manifest.get('format_version')} model package; this autoplan "
                               f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return manifest


def _expected_member(name: str, version) -> bool:
    """A run's ``fold_K/{plan.json, weights}``; a choice's also under ``CONFIGURATION/RUN/``,
    and its best.json. No other file, and no part that climbs out of the folder."""
    parts = PurePosixPath(name).parts
    if version == CHOICE_VERSION and name == BEST_FILE:
        return True
    depth = 4 if version == CHOICE_VERSION else 2
    if len(parts) != depth or "\\" in name or any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return False
    return parts[-2].startswith("fold_") and parts[-1] in ("plan.json", PACKAGED_CHECKPOINT)


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
        if not _expected_member(name, manifest.get("format_version")):
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
    """Unpack a package into the results folder it came from: a run into
    ``RESULTS/DATASET/CONFIGURATION/RUN`` (returned), a choice into ``RESULTS/DATASET`` (its
    runs and best.json; the dataset folder is returned). Existing folders (and best.json) are
    replaced only with ``overwrite``."""
    manifest, members = read_package(path)
    dataset_dir = Path(results_root) / manifest["dataset"]
    is_choice = manifest["format_version"] == CHOICE_VERSION
    targets = ([dataset_dir / label for label in manifest["members"]] + [dataset_dir / BEST_FILE] if is_choice
               else [dataset_dir / manifest["configuration"] / manifest["run"]])
    for target in targets:
        if target.exists() and not overwrite:
            raise InputError(target, "exists already: add --overwrite to replace it")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".importing-", dir=dataset_dir))
    try:
        _unpack(members, staging)
        _check_weights(Path(path), staging, members)
        sources = ([staging / label for label in manifest["members"]] + [staging / BEST_FILE] if is_choice
                   else [staging])
        for source, target in zip(sources, targets):
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset_dir if is_choice else targets[0]
