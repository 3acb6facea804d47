"""The preprocessed cache of a segmentation dataset, one configuration at a time::

    PRE/NAME/CFG/CASE.npy       float32 (C, [Z,] Y, X)
    PRE/NAME/CFG/CASE_seg.npy   int16   (1, [Z,] Y, X)
    PRE/NAME/CFG/CASE.json      CaseProperties (written last; holds the cache stamp)

A case whose three files exist with a matching stamp is not redone, so an interrupted run
resumes where it stopped.
"""

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from autoplan.io import read_case_images, read_case_labels
from autoplan.jsonio import atomic_save_npy, read_json, to_jsonable
from autoplan.parallel import parallel_map
from autoplan.preprocessing.case import field_of_view, preprocess_case

# Bump when the cached arrays would change for the same inputs and configuration.
CACHE_VERSION = 1


def preprocessing_stamp(configuration, source_files) -> str:
    """Hash of everything the cached arrays depend on."""
    relevant = {
        "version": CACHE_VERSION,
        "dim": configuration.dim,
        "spacing": configuration.spacing,
        "normalization": configuration.normalization,
        "patch_size": configuration.patch_size if configuration.is_classifier else None,
        "n_input_channels": configuration.n_input_channels,
        "sources": [_file_signature(path) for path in source_files],
    }
    if field_of_view(configuration):   # only when set, so caches of mm plans stay valid
        relevant["field_of_view"] = field_of_view(configuration)
    text = json.dumps(to_jsonable(relevant), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _file_signature(path) -> list:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return [path.name, None, None]
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _case_sources(case) -> list:
    return list(case.images) + ([case.label] if case.label is not None else [])


def _case_up_to_date(case, configuration, out_dir) -> bool:
    files = [out_dir / f"{case.id}.npy", out_dir / f"{case.id}_seg.npy", out_dir / f"{case.id}.json"]
    if not all(f.is_file() for f in files):
        return False
    return _stored_stamp(files[2]) == preprocessing_stamp(configuration, _case_sources(case))


_STAMP_PATTERN = re.compile(r'^  "stamp": "([0-9a-f]*)",?$', re.MULTILINE)


def _stored_stamp(path):
    """The stamp of a CASE.json; read from the file's head (the location lists can be MBs)."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(4096)
        found = _STAMP_PATTERN.search(head)
        if found:
            return found.group(1)
        return read_json(path).get("stamp")
    except (OSError, ValueError, AttributeError):
        return None


def _preprocess_and_save(case, configuration, out_dir, label_ids):
    image = read_case_images(case)
    labels = read_case_labels(case, image, label_ids)
    data, seg, properties = preprocess_case(image, labels, configuration, case.id)
    properties.stamp = preprocessing_stamp(configuration, _case_sources(case))
    # Remove the old properties first: arrays and properties of different runs never pair up.
    (out_dir / f"{case.id}.json").unlink(missing_ok=True)
    atomic_save_npy(out_dir / f"{case.id}.npy", data)
    atomic_save_npy(out_dir / f"{case.id}_seg.npy", seg.astype(np.int16))
    properties.save(out_dir / f"{case.id}.json")
    return case.id


def preprocess_segmentation(dataset, configuration, out_dir: Path, n_jobs=None) -> Path:
    """Every case not up to date in ``out_dir`` preprocessed and saved; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    label_ids = sorted(set(int(v) for v in dataset.labels.values()) | {0})
    todo = [case for case in dataset.cases if not _case_up_to_date(case, configuration, out_dir)]
    worker = functools.partial(_preprocess_and_save, configuration=configuration,
                               out_dir=out_dir, label_ids=label_ids)
    parallel_map(worker, todo, n_jobs=n_jobs, desc=f"preprocess {configuration.name}")
    return out_dir
