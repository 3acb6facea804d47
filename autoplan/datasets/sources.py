"""Cases as a publisher lays them out, before anything is read or written: images and masks
paired by name, images alone (DICOM studies included), or an nnU-Net raw folder."""

import re
from dataclasses import dataclass
from pathlib import Path

from autoplan.datasets.layout import load_dataset
from autoplan.errors import InputError
from autoplan.io import CHANNEL_FILE, FIRST_CHANNEL_SUFFIX, is_dicom_folder, list_image_files, read_image, strip_ending

# A mask ``X_segmentation.png`` belongs to image ``X.jpg``.
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_label")
# Files that may sit beside the images without being images (MHD data files included).
_SIDECAR_ENDINGS = (".txt", ".md", ".csv", ".tsv", ".json", ".xlsx", ".xls", ".pdf",
                    ".raw", ".zraw", ".db", ".ini")


@dataclass
class CaseJob:
    """One case as found in the source layout, before anything is written."""
    id: str
    images: list                      # source Paths, one per channel file
    mask: Path | None = None
    class_name: str | None = None
    group: str | None = None


@dataclass
class Collected:
    """What a source holds, before any image is read."""
    layout: str                       # 'nnunet_raw' | 'classification_csv' | 'images_and_masks' | 'images_only'
    task_type: str
    jobs: list                        # CaseJob, sorted by id
    given: dict                       # dataset.json keys of an nnU-Net raw folder; {} otherwise
    label_map: dict | None            # {mask value: label name}; None: number the values found
    classes: list | None


def make_case_id(stem: str, where: Path) -> str:
    """File stems as case ids; characters that trouble file systems or shells become '_'.

    Letters of every script stay (``Пациент_01``, ``患者2``): replacing them made ``__``
    of such names, and two of them the same id.
    """
    case_id = re.sub(r"[^\w\-.]", "_", stem).strip(".")
    if not case_id:
        raise InputError(where, "cannot derive a case id from this name")
    return case_id


def check_unique(jobs: list) -> list:
    seen = {}
    for job in jobs:
        if job.id in seen:
            raise InputError(job.images[0], f"case id {job.id!r} also used by {seen[job.id].name}")
        seen[job.id] = job.images[0]
    return sorted(jobs, key=lambda j: j.id)


def listed_images(images_dir: Path) -> list:
    """Image files and DICOM series folders; any other file (but notes and tables) is refused."""
    images = list_image_files(images_dir)
    for entry in sorted(images_dir.iterdir()):
        if entry.is_file() and not entry.name.startswith(".") and entry not in images:
            if entry.suffix.lower() == ".dcm":
                raise InputError(entry, "DICOM file directly in the images folder: put each "
                                        "series in its own subfolder")
            if entry.suffix.lower() not in _SIDECAR_ENDINGS:
                read_image(entry)  # raises the "unknown image file type" InputError
    if not images:
        raise InputError(images_dir, "no images found (PNG, JPEG, TIFF, BMP, NIfTI, NRRD, "
                                     "MHA/MHD files or DICOM series folders)")
    return images


def _find_mask(stem: str, masks: dict):
    if stem in masks:
        return masks[stem]
    for suffix in MASK_SUFFIXES:
        if stem + suffix in masks:
            return masks[stem + suffix]
    return None


def segmentation_jobs(images_dir: Path, masks_dir: Path) -> list:
    """Pair images and masks by stem: exact, else mask = image stem + a mask suffix.

    Images named ``CASE_0000``, ``CASE_0001`` (nnU-Net channel files) whose full stem has
    no mask are channels of the case ``CASE``.
    """
    if not masks_dir.is_dir():
        raise InputError(masks_dir, "masks folder not found")
    masks = {strip_ending(m.name): m for m in listed_images(masks_dir)}
    by_mask: dict = {}
    for image in listed_images(images_dir):
        stem = strip_ending(image.name)
        candidates = [(stem, 0)]
        channel_match = CHANNEL_FILE.match(stem)
        if channel_match:
            candidates.append((channel_match["case"], int(channel_match["channel"])))
        for case_stem, channel in candidates:
            mask = _find_mask(case_stem, masks)
            if mask is not None:
                by_mask.setdefault(mask, (case_stem, []))[1].append((channel, image))
                break
        else:
            raise InputError(image, f"no mask for this image in {masks_dir} (looked for "
                                    f"{stem}.* and {stem}{{{','.join(MASK_SUFFIXES)}}}.*)")
    unused = sorted(set(masks.values()) - set(by_mask))
    if unused:
        raise InputError(unused[0], f"mask without an image in {images_dir}")
    jobs = []
    for mask, (case_stem, channel_files) in by_mask.items():
        channel_files.sort()
        same_name = [image.name for _, image in channel_files if strip_ending(image.name) == case_stem]
        if len(same_name) > 1:       # X.png and X.jpg: two images for one mask, not two channels
            raise InputError(channel_files[0][1], f"{len(same_name)} images share the name {case_stem!r} "
                                                  f"({', '.join(sorted(same_name))}) but there is one mask "
                                                  f"{mask.name}: keep one image, or name channel files "
                                                  f"{case_stem}_0000, {case_stem}_0001, ...")
        if [c for c, _ in channel_files] != list(range(len(channel_files))):
            raise InputError(mask, "the image channel files of this mask are not numbered "
                                   "_0000, _0001, ... without gaps")
        jobs.append(CaseJob(id=make_case_id(case_stem, mask), images=[p for _, p in channel_files],
                             mask=mask))
    return check_unique(jobs)


def unlabelled_jobs(images_dir: Path) -> list:
    """Images without masks: files and DICOM series folders, nested folders included."""
    if is_dicom_folder(images_dir):
        return [CaseJob(id=make_case_id(images_dir.name, images_dir), images=[images_dir])]
    found = list_image_files(images_dir)
    for folder in sorted(p for p in images_dir.rglob("*") if p.is_dir()):
        relative = folder.relative_to(images_dir)
        inside_series = any(is_dicom_folder(images_dir / parent) for parent in relative.parents
                            if str(parent) != ".")
        if folder.parent != images_dir and is_dicom_folder(folder) and not inside_series:
            found.append(folder)
    if not found:
        listed_images(images_dir)  # raises the "no images" error
    jobs = []
    for path in found:
        relative = path.relative_to(images_dir)
        stem = "_".join(relative.parts[:-1] + (strip_ending(relative.parts[-1]),))
        match = CHANNEL_FILE.match(stem)
        if match and f"_{match['channel']}" == FIRST_CHANNEL_SUFFIX:
            stem = match["case"]     # a single-channel nnU-Net file keeps its case name
        jobs.append(CaseJob(id=make_case_id(stem, path), images=[path]))
    return check_unique(jobs)


def nnunet_jobs(folder: Path) -> tuple:
    """An nnU-Net v2 raw dataset: its own dataset.json decides cases and labels."""
    dataset = load_dataset(folder)
    if dataset.task_type != "classification" and not dataset.cases:
        raise InputError(folder / "imagesTr", f"no *{FIRST_CHANNEL_SUFFIX}{dataset.file_ending} images")
    jobs = []
    for case in dataset.cases:
        for path in case.images + ([case.label] if case.label else []):
            if not path.exists():
                raise InputError(path, "listed by dataset.json / imagesTr but missing")
        jobs.append(CaseJob(id=case.id, images=list(case.images), mask=case.label,
                             class_name=case.class_name, group=case.group))
    description = dict(dataset.description)
    description["labels"] = dataset.labels or {"background": 0}
    return jobs, description
