"""The fingerprint's entry: ``fingerprint_dataset`` runs the analyser of the dataset's task and
caches its result in ``RESULTS/NAME/fingerprint.json`` by a hash of the dataset's files."""

import hashlib
import os
from pathlib import Path

from autoplan.errors import InputError
from autoplan.fingerprint.classification import fingerprint_classification
from autoplan.fingerprint.segmentation import fingerprint_segmentation
from autoplan.fingerprint.types import Fingerprint
from autoplan.io import FIRST_CHANNEL_SUFFIX
from autoplan.paths import fingerprint_file

# Bump when the computation changes: it is part of the cache key. 2: per-case intensity
# percentiles, label fractions and components, source formats (for prediction's quality flags).
FINGERPRINT_VERSION = 2
# Each task's analyser: (dataset, source hash, n_jobs) -> Fingerprint.
ANALYSERS = {"segmentation": fingerprint_segmentation, "classification": fingerprint_classification}


def fingerprint_dataset(dataset, results_dir, force=False, n_jobs=None) -> Fingerprint:
    """Fingerprint ``dataset`` into ``results_dir/NAME/fingerprint.json`` (cached by source hash)."""
    path = fingerprint_file(results_dir, dataset.name)
    source_hash = dataset_source_hash(dataset)
    if not force:
        cached = _load_cached(path, source_hash)
        if cached is not None:
            return cached
    if not dataset.cases:
        raise InputError(Path(dataset.root) / "imagesTr", f"no cases found (expected CASE{FIRST_CHANNEL_SUFFIX}"
                         f"{dataset.file_ending} files or a 'cases' list in dataset.json)")
    analyse = ANALYSERS.get(dataset.task_type)
    if analyse is None:
        raise InputError(Path(dataset.root) / "dataset.json",
                         f"unknown task_type {dataset.task_type!r} (segmentation or classification)")
    fingerprint = analyse(dataset, source_hash, n_jobs)
    fingerprint.save(path)
    return fingerprint


def dataset_source_hash(dataset) -> str:
    """Hash of every case file's name, size and mtime, and of dataset.json: the cache key.

    Missing files raise InputError here, before any work starts.
    """
    root = Path(dataset.root)
    digest = hashlib.sha256(f"autoplan-fingerprint-v{FINGERPRINT_VERSION}\n".encode())
    files = [root / "dataset.json"]
    for case in dataset.cases:
        files.extend(Path(p) for p in case.images)
        if case.label is not None:
            files.append(Path(case.label))
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            raise InputError(path, "missing (listed by dataset.json or the images of a case)") from None
        name = os.path.relpath(path, root)
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _load_cached(path: Path, source_hash: str):
    if not path.is_file():
        return None
    try:
        cached = Fingerprint.load(path)
    except (ValueError, TypeError, KeyError, OSError):
        return None  # unreadable or from an older layout: recompute
    return cached if cached.source_hash == source_hash else None
