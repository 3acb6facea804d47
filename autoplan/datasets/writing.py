"""Import's second pass: each case linked, copied or converted into a temporary folder that is
renamed to ``RAW/NAME`` only when the whole dataset is written."""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoplan.datasets.inspection import OutputFormat, mask_lookup
from autoplan.datasets.sources import CaseJob
from autoplan.errors import InputError
from autoplan.io import NATURAL_FORMATS, channel_file_name, read_image, read_mask, write_image
from autoplan.jsonio import write_json
from autoplan.parallel import parallel_map


@dataclass
class _WriteJob:
    case: CaseJob
    root: Path                        # the temporary dataset folder
    ending: str                       # output file ending
    copy_images: bool                 # link/copy the source files unchanged
    to_rgb: bool                      # grey image to be written as RGB
    mask_lookup: dict | None          # source value -> label id; None: copy the mask unchanged


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_dataset(raw_root: Path, name: str, overwrite: bool, jobs: list, output: OutputFormat,
                  description: dict, n_jobs=None, quiet=False) -> None:
    """Every case and dataset.json into a temporary folder, renamed to ``raw_root/name`` at the end."""
    with _building_folder(raw_root, name, overwrite) as building:
        write_jobs = [
            _WriteJob(case=job, root=building, ending=output.ending,
                      copy_images=output.copy_images and job.id not in output.to_rgb,
                      to_rgb=job.id in output.to_rgb,
                      mask_lookup=mask_lookup(job, output.value_to_id, output.ending))
            for job in jobs
        ]
        (building / "imagesTr").mkdir()
        if any(j.mask is not None for j in jobs):
            (building / "labelsTr").mkdir()
        parallel_map(_write_case, write_jobs, n_jobs=n_jobs, desc="writing cases", quiet=quiet)
        write_json(building / "dataset.json", description)


def _write_case(job: _WriteJob) -> None:
    """One case's channel files and mask, linked or copied where they can stay as they are."""
    _write_images(job)
    if job.case.mask is None:
        return
    target = job.root / "labelsTr" / f"{job.case.id}{job.ending}"
    if job.mask_lookup is None:
        _link_or_copy(job.case.mask, target)
        return
    mask = read_mask(job.case.mask)
    lookup = np.zeros(max(job.mask_lookup) + 1, dtype=np.uint16)
    for value, label in job.mask_lookup.items():
        lookup[value] = label
    labels = lookup[mask.array[0].astype(np.int64)]
    dtype = np.uint8 if max(job.mask_lookup.values()) < 256 else np.uint16
    write_image(labels.astype(dtype), target, mask)


def _write_images(job: _WriteJob) -> None:
    case = job.case
    channel = 0
    for source in case.images:
        if job.copy_images:
            _link_or_copy(source, job.root / "imagesTr" / channel_file_name(case.id, channel, job.ending))
            channel += 1
            continue
        image = read_image(source)
        array = np.repeat(image.array, 3, axis=0) if job.to_rgb else image.array
        # a 4D volume (MSD's multi-modal NIfTI) becomes one file per channel, nnU-Net's layout;
        # natural colour images stay one RGB file
        parts = [array] if image.source_format in NATURAL_FORMATS else [c[None] for c in array]
        for part in parts:
            target = job.root / "imagesTr" / channel_file_name(case.id, channel, job.ending)
            try:
                write_image(part, target, image)
            except ValueError as error:
                raise InputError(source, f"cannot convert to {job.ending}: {error}") from None
            channel += 1


class _building_folder:
    """``RAW/.NAME.tmp-XXXX`` while importing, renamed to ``RAW/NAME`` only on success."""

    def __init__(self, raw_root: Path, name: str, overwrite: bool):
        self.raw_root, self.name, self.overwrite = raw_root, name, overwrite

    def __enter__(self) -> Path:
        self.raw_root.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.raw_root))
        return self.path

    def __exit__(self, kind, error, trace):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        target = self.raw_root / self.name
        if target.exists():
            if not self.overwrite:
                shutil.rmtree(self.path, ignore_errors=True)
                raise InputError(target, "appeared while importing; not overwritten")
            old = Path(tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.raw_root))
            os.replace(target, old / self.name)
            os.replace(self.path, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, target)
        return False
