"""Raw datasets: the dataset.json contract, loading a dataset, and ``autoplan import``.

A dataset is ``RAW/NAME/`` with ``dataset.json`` and nnU-Net v2's layout:
``imagesTr/CASE_0000.ext`` (one file per channel; one RGB file counts as the
three channels R, G, B) and, for segmentation, ``labelsTr/CASE.ext``.
Classification datasets list their cases with class and optional group in
``dataset.json["cases"]``.
"""

import csv
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoplan.errors import InputError

from autoplan.io.images import (
    NATURAL_EXTENSIONS,
    NATURAL_FORMATS,
    ImageData,
    file_ending,
    is_dicom_folder,
    list_image_files,
    read_image,
    strip_ending,
    write_image,
)
from autoplan.jsonio import read_json, write_json
from autoplan.parallel import parallel_map


@dataclass
class Case:
    id: str
    images: list                      # Paths, one per channel file (usually one)
    label: Path | None = None         # segmentation mask
    class_name: str | None = None     # classification label
    group: str | None = None          # patient / lesion: never split across folds


@dataclass
class Dataset:
    name: str
    root: Path
    task_type: str                    # 'segmentation' | 'classification'
    channel_names: dict               # {"0": "T1"} or {"0": "R", "1": "G", "2": "B"}
    labels: dict                      # {"background": 0, "anterior": 1, ...}; {} for classification
    file_ending: str
    cases: list = field(default_factory=list)
    classes: list | None = None       # classification class names, in index order
    description: dict = field(default_factory=dict)  # the whole dataset.json

    @property
    def foreground_labels(self) -> dict:
        """{label id: name} without background, sorted by id."""
        return {v: k for k, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0}

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise KeyError(case_id)


def _label_ids(labels: dict) -> dict:
    """nnU-Net v2 allows region labels (lists); we support plain integer labels."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f"region-based label {name!r} is not supported")
            value = value[0]
        out[name] = int(value)
    return out


def load_dataset(root) -> Dataset:
    """Read ``root/dataset.json`` and discover the cases. Raises InputError."""
    root = Path(root)
    description_path = root / "dataset.json"
    if not description_path.is_file():
        raise InputError(description_path, "dataset.json not found (import the dataset first)")
    try:
        description = read_json(description_path)
    except ValueError as error:
        raise InputError(description_path, f"not valid JSON ({error})") from None
    task_type = description.get("task_type", "segmentation")
    ending = description.get("file_ending", "")
    channel_names = {str(k): v for k, v in description.get("channel_names", {"0": "image"}).items()}
    n_files = _files_per_case(channel_names)
    images_dir = root / "imagesTr"
    if task_type == "classification":
        cases = [
            Case(
                id=entry["case"],
                images=[images_dir / f"{entry['case']}_{c:04d}{ending}" for c in range(n_files)],
                class_name=entry["label"],
                group=entry.get("group"),
            )
            for entry in description.get("cases", [])
        ]
        labels = {}
    else:
        groups = description.get("groups", {})
        case_ids = sorted(
            {p.name[: -len(ending)][:-5] for p in images_dir.glob(f"*_0000{ending}")}
        )
        cases = [
            Case(
                id=case_id,
                images=[images_dir / f"{case_id}_{c:04d}{ending}" for c in range(n_files)],
                label=None if description.get("unlabelled") else root / "labelsTr" / f"{case_id}{ending}",
                group=groups.get(case_id),
            )
            for case_id in case_ids
        ]
        labels = _label_ids(description.get("labels", {"background": 0}))
    return Dataset(
        name=description.get("name", root.name),
        root=root,
        task_type=task_type,
        channel_names=channel_names,
        labels=labels,
        file_ending=ending,
        cases=cases,
        classes=description.get("classes"),
        description=description,
    )


def _files_per_case(channel_names: dict) -> int:
    """An RGB natural image is one file holding three channels."""
    names = [str(v).upper() for v in channel_names.values()]
    if names[:3] == ["R", "G", "B"]:
        return 1
    return len(channel_names)


# ============================================================================ import
#
# ``import_dataset`` brings a dataset from its publisher's layout into RAW/NAME/.
# It runs in two passes over the cases, both in parallel: ``_inspect_case`` reads and
# validates every image and mask (nothing is written), then, once the whole dataset
# is known (label values, channel counts, file endings), ``_write_case`` links, copies
# or converts each case into a temporary folder that is renamed to RAW/NAME at the end.

# A mask ``X_segmentation.png`` belongs to image ``X.jpg``.
MASK_SUFFIXES = ("_segmentation", "_mask", "_seg", "_label")
# Geometry of image and mask must agree within these tolerances.
SPACING_RTOL = 1e-4
# A 2D mask without --label-map holding more grey values than this is a photograph or a lossy
# JPEG (254 values when --masks named the images folder, ~90 for JPEG masks), not a label map.
MAX_UNMAPPED_MASK_VALUES = 32
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_ID_COLUMNS = ("image_id", "image", "id", "case", "filename", "file", "name")
# Files that may sit beside the images without being images (MHD data files included).
_SIDECAR_ENDINGS = (".txt", ".md", ".csv", ".tsv", ".json", ".xlsx", ".xls", ".pdf",
                    ".raw", ".zraw", ".db", ".ini")
_LABEL_COLUMNS = ("label", "class", "dx", "diagnosis", "target", "category")


@dataclass
class _CaseJob:
    """One case as found in the source layout, before anything is written."""
    id: str
    images: list                      # source Paths, one per channel file
    mask: Path | None = None
    class_name: str | None = None
    group: str | None = None


@dataclass
class _Inspection:
    id: str
    channels: int                     # total channels over the case's image files
    dim: int
    mask_values: list                 # distinct integer values in the mask
    first_image: Path = None


@dataclass
class _WriteJob:
    case: _CaseJob
    root: Path                        # the temporary dataset folder
    ending: str                       # output file ending
    copy_images: bool                 # link/copy the source files unchanged
    to_rgb: bool                      # grey image to be written as RGB
    mask_lookup: dict | None          # source value -> label id; None: copy the mask unchanged


# Public datasets whose terms ask every report about them to cite the sources.
KNOWN_CITATIONS = {
    "jsrt": "JSRT database: Shiraishi et al., AJR 174:71-74, 2000. SCR masks: van Ginneken et al., "
            "Medical Image Analysis 10(1):19-40, 2006.",
    "ham10000": "HAM10000: Tschandl, Rosendahl and Kittler, Scientific Data 5:180161, 2018 "
                "(ISIC 2018 challenge data).",
    "hippocampus": "Medical Segmentation Decathlon, Task04 Hippocampus: Simpson et al., arXiv:1902.09063, "
                   "2019; Antonelli et al., Nature Communications 13:4128, 2022.",
}


def known_citation(source) -> str | None:
    """The citation a known public dataset asks for, recognised from its source path."""
    text = str(Path(source).resolve()).lower() if source else ""
    for key, citation in KNOWN_CITATIONS.items():
        if key in text:
            return citation
    return None


def parse_label_map(text) -> dict:
    """``"150=right_lung,200=left_lung"`` -> ``{150: "right_lung", 200: "left_lung"}`` (in order)."""
    if isinstance(text, dict):
        pairs = [(str(k), str(v)) for k, v in text.items()]
    else:
        pairs = []
        for item in str(text).split(","):
            if item.strip():
                if "=" not in item:
                    raise InputError(None, f"label map entry {item.strip()!r} is not VALUE=name")
                pairs.append(tuple(part.strip() for part in item.split("=", 1)))
    label_map = {}
    for value_text, name in pairs:
        try:
            value = int(value_text)
        except ValueError:
            raise InputError(None, f"label map value {value_text!r} is not an integer") from None
        if value <= 0:
            raise InputError(None, f"label map value {value}: 0 is always background; "
                                   "give positive mask values")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == "background":
            raise InputError(None, f"label name {name!r} must be letters, digits, _ or - "
                                   "(and not 'background')")
        if value in label_map:
            raise InputError(None, f"label map repeats value {value}")
        # a name may take several values: "150=lung,200=lung" merges both lungs into one label
        label_map[value] = name
    if not label_map:
        raise InputError(None, "empty label map")
    return label_map


def import_dataset(
    name: str,
    images_dir,
    raw_root,
    masks_dir=None,
    labels_csv=None,
    label_map=None,
    id_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    classes=None,
    n_jobs: int | None = None,
    convert_grey: bool = False,
    overwrite: bool = False,
    channel_names=None,
    quiet: bool = False,
) -> Dataset:
    """Bring a dataset from its publisher's layout into ``raw_root/name``. Raises InputError.

    Layouts: an nnU-Net v2 raw folder (``images_dir`` holds dataset.json); images + CSV of
    classes (``labels_csv``); images + masks of the same stems (``masks_dir``), 2D or 3D;
    images alone (for example a folder of DICOM series). ``label_map`` ({mask value: name}
    or "V=name,...") fixes label ids 1..N in its order; without it the distinct mask values
    are numbered in increasing order. ``convert_grey`` turns grey images into RGB when a
    natural-image dataset mixes both. ``channel_names`` (list) overrides the channel names.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", str(name)):
        raise InputError(None, f"dataset name {name!r}: use letters, digits, _, - and .")
    images_dir, raw_root = Path(images_dir), Path(raw_root)
    target = raw_root / name
    if target.exists() and not overwrite:
        raise InputError(target, "already exists (remove it or import with overwrite)")
    if not images_dir.is_dir():
        raise InputError(images_dir, "images folder not found")
    if label_map is not None:
        label_map = parse_label_map(label_map)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    options = dict(n_jobs=n_jobs, quiet=quiet)
    source = _Source(images_dir, masks_dir, labels_csv, id_column, label_column, group_column)
    layout, task_type, jobs, given, label_map, classes = _collect_jobs(source, label_map, classes)

    inspections = _run_cases(_InspectTask(label_map), jobs, "checking cases", options)
    dim, channels, to_rgb = _channel_policy(jobs, inspections, convert_grey)
    natural = dim == 2 and all(file_ending(p) in NATURAL_EXTENSIONS for j in jobs for p in j.images)
    if layout == "nnunet_raw":
        ending, copy_images = given["file_ending"], not to_rgb
    else:
        ending, copy_images = _output_ending(jobs, natural, task_type, to_rgb)
    if not natural and any(i.channels > len(j.images) for i, j in zip(inspections, jobs)):
        copy_images = False        # volumes holding several channels are split into channel files
    value_to_id, labels = _label_ids_from(label_map, inspections, task_type)
    description = {
        **{k: v for k, v in given.items() if k not in ("name", "numTraining")},
        "name": name,
        "task_type": task_type,
        "channel_names": given.get("channel_names")
        or _channel_names(channel_names, channels, natural),
        "labels": labels,
        "numTraining": len(jobs),
        "file_ending": ending,
        **_case_listing(jobs, task_type, classes, layout),
        "source": {
            "layout": layout,
            **{k: str(Path(v).resolve()) if v else None for k, v in
               (("images", images_dir), ("masks", masks_dir), ("labels_csv", labels_csv))},
            "label_map": {str(k): v for k, v in value_to_id.items()} if value_to_id else None,
            "converted_grey_to_rgb": sorted(to_rgb),
            # which file each case came from, where its id is not simply the file's stem
            "renamed": {job.id: [Path(p).name for p in job.images] for job in jobs
                        if job.id not in {strip_ending(Path(p).name) for p in job.images}
                        and not _CHANNEL_SUFFIX.match(strip_ending(Path(job.images[0]).name))} or None,
        },
    }
    citation = known_citation(images_dir)
    if citation:
        description["citation"] = citation
    with _building_folder(raw_root, name, overwrite) as building:
        write_jobs = [
            _WriteJob(case=job, root=building, ending=ending,
                      copy_images=copy_images and job.id not in to_rgb, to_rgb=job.id in to_rgb,
                      mask_lookup=_mask_lookup(job, value_to_id, ending))
            for job in jobs
        ]
        (building / "imagesTr").mkdir()
        if any(j.mask is not None for j in jobs):
            (building / "labelsTr").mkdir()
        _run_cases(_write_case, write_jobs, "writing cases", options)
        write_json(building / "dataset.json", description)
    return load_dataset(target)


@dataclass
class _Source:
    images: Path
    masks: Path | None
    labels_csv: Path | None
    id_column: str | None
    label_column: str | None
    group_column: str | None


def _collect_jobs(source: _Source, label_map, classes) -> tuple:
    """(layout, task type, jobs, given dataset.json keys, label map, classes) of the source."""
    images = source.images
    masks = Path(source.masks) if source.masks is not None else None
    table = Path(source.labels_csv) if source.labels_csv is not None else None
    if (images / "dataset.json").is_file():
        jobs, given = _nnunet_jobs(images)
        if label_map is None:
            by_id = sorted(given["labels"].items(), key=lambda kv: kv[1])
            label_map = {v: k for k, v in by_id if v != 0}
        classes = classes or given.get("classes")
        return "nnunet_raw", given.get("task_type", "segmentation"), jobs, given, label_map, classes
    if table is not None and masks is None:
        jobs, classes = _classification_jobs(images, table, source.id_column,
                                             source.label_column, source.group_column, classes)
        return "classification_csv", "classification", jobs, {}, label_map, classes
    if masks is not None:
        jobs = _segmentation_jobs(images, masks)
        if table is not None:  # a CSV beside masks only says which patient each case is
            _attach_groups(jobs, table, source.id_column, source.group_column)
        return "images_and_masks", "segmentation", jobs, {}, label_map, classes
    return "images_only", "segmentation", _unlabelled_jobs(images), {}, label_map, classes


def _case_listing(jobs, task_type: str, classes, layout: str) -> dict:
    """dataset.json keys that list cases: classes and cases, groups, or unlabelled."""
    if task_type == "classification":
        return {"classes": classes,
                "cases": [{"case": j.id, "label": j.class_name, "group": j.group} for j in jobs]}
    listing = {}
    if any(j.group is not None for j in jobs):
        listing["groups"] = {j.id: j.group for j in jobs}
    if layout == "images_only":
        listing["unlabelled"] = True     # no labelsTr: images for prediction only
    return listing


# ---------------------------------------------------------------------------- layouts


def _case_id(stem: str, where: Path) -> str:
    """File stems as case ids; characters that trouble file systems or shells become '_'.

    Letters of every script stay (``Пациент_01``, ``患者2``): replacing them made ``__``
    of such names, and two of them the same id.
    """
    case_id = re.sub(r"[^\w\-.]", "_", stem).strip(".")
    if not case_id:
        raise InputError(where, "cannot derive a case id from this name")
    return case_id


def _check_unique(jobs: list) -> list:
    seen = {}
    for job in jobs:
        if job.id in seen:
            raise InputError(job.images[0], f"case id {job.id!r} also used by {seen[job.id].name}")
        seen[job.id] = job.images[0]
    return sorted(jobs, key=lambda j: j.id)


def _listed_images(images_dir: Path) -> list:
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


def _segmentation_jobs(images_dir: Path, masks_dir: Path) -> list:
    """Pair images and masks by stem: exact, else mask = image stem + a mask suffix.

    Images named ``CASE_0000``, ``CASE_0001`` (nnU-Net channel files) whose full stem has
    no mask are channels of the case ``CASE``.
    """
    if not masks_dir.is_dir():
        raise InputError(masks_dir, "masks folder not found")
    masks = {strip_ending(m.name): m for m in _listed_images(masks_dir)}
    by_mask: dict = {}
    for image in _listed_images(images_dir):
        stem = strip_ending(image.name)
        candidates = [(stem, 0)]
        channel_match = _CHANNEL_SUFFIX.match(stem)
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
        jobs.append(_CaseJob(id=_case_id(case_stem, mask), images=[p for _, p in channel_files],
                             mask=mask))
    return _check_unique(jobs)


def _unlabelled_jobs(images_dir: Path) -> list:
    """Images without masks: files and DICOM series folders, nested folders included."""
    if is_dicom_folder(images_dir):
        return [_CaseJob(id=_case_id(images_dir.name, images_dir), images=[images_dir])]
    found = list_image_files(images_dir)
    for folder in sorted(p for p in images_dir.rglob("*") if p.is_dir()):
        relative = folder.relative_to(images_dir)
        inside_series = any(is_dicom_folder(images_dir / parent) for parent in relative.parents
                            if str(parent) != ".")
        if folder.parent != images_dir and is_dicom_folder(folder) and not inside_series:
            found.append(folder)
    if not found:
        _listed_images(images_dir)  # raises the "no images" error
    jobs = []
    for path in found:
        relative = path.relative_to(images_dir)
        stem = "_".join(relative.parts[:-1] + (strip_ending(relative.parts[-1]),))
        match = _CHANNEL_SUFFIX.match(stem)
        if match and match["channel"] == "0000":
            stem = match["case"]     # a single-channel nnU-Net file keeps its case name
        jobs.append(_CaseJob(id=_case_id(stem, path), images=[path]))
    return _check_unique(jobs)


def _read_label_table(csv_path: Path) -> tuple:
    if csv_path.is_dir():
        raise InputError(csv_path, "is a folder; --labels takes a CSV file (one row per image)")
    if not csv_path.is_file():
        raise InputError(csv_path, "labels CSV not found")
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(csv_path, f"is not UTF-8 text (byte 0x{error.object[error.start]:02x} at position "
                                   f"{error.start}; Excel's plain 'CSV' is often latin-1 or cp1252): save it as "
                                   "'CSV UTF-8'") from None
    delimiter = _csv_delimiter(text.split("\n", 1)[0])
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = list(reader)
        columns = reader.fieldnames or []
    except csv.Error as error:
        raise InputError(csv_path, f"cannot read as CSV (columns separated by {delimiter!r}): {error}") from None
    if not rows:
        raise InputError(csv_path, "no rows")
    return rows, columns


def _csv_delimiter(header: str) -> str:
    """',' unless the header line is only split by ';' or tabs (European Excel, TSV exports)."""
    counts = {delimiter: header.count(delimiter) for delimiter in (",", ";", "\t")}
    return max(counts, key=counts.get) if counts[","] == 0 and max(counts.values()) > 0 else ","


def _pick_column(csv_path: Path, columns: list, wanted: str | None, guesses, flag: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(csv_path, f"no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for guess in guesses:
        if guess in columns:
            return guess
    raise InputError(csv_path, f"cannot tell which column to use; give {flag} "
                               f"(columns: {', '.join(columns)})")


def _classification_jobs(images_dir, csv_path, id_column, label_column, group_column, classes):
    rows, columns = _read_label_table(csv_path)
    id_column = _pick_column(csv_path, columns, id_column, _ID_COLUMNS, "--id-column")
    label_column = _pick_column(csv_path, columns, label_column, _LABEL_COLUMNS, "--label-column")
    if group_column is not None:
        _pick_column(csv_path, columns, group_column, (), "--group-column")
    images = {}
    for image in _listed_images(images_dir):
        stem = strip_ending(image.name)
        if stem in images:
            raise InputError(image, f"two images share the name {stem!r} ({images[stem].name})")
        images[stem] = image
    jobs, used = [], set()
    for line, row in enumerate(rows, start=2):   # line 1 is the header
        key = strip_ending((row.get(id_column) or "").strip())
        class_name = (row.get(label_column) or "").strip()
        where = f"line {line} ({id_column}={key!r})"
        if not key:
            raise InputError(csv_path, f"line {line}: empty {id_column}")
        if key not in images:
            raise InputError(csv_path, f"{where}: no image named {key}.* in {images_dir}")
        if key in used:
            raise InputError(csv_path, f"{where}: image listed twice")
        if not class_name:
            raise InputError(csv_path, f"{where}: empty {label_column}")
        if classes is not None and class_name not in classes:
            raise InputError(csv_path, f"{where}: class {class_name!r} is not one of "
                                       f"{', '.join(classes)}")
        group = (row.get(group_column) or "").strip() or None if group_column else None
        used.add(key)
        jobs.append(_CaseJob(id=_case_id(key, images[key]), images=[images[key]],
                             class_name=class_name, group=group))
    missing = sorted(set(images) - used)
    if missing:
        raise InputError(images[missing[0]], f"no row in {csv_path.name} for this image "
                                             f"({len(missing)} image(s) without a row)")
    found_classes = sorted({job.class_name for job in jobs})
    return _check_unique(jobs), list(classes) if classes is not None else found_classes


def _attach_groups(jobs: list, csv_path: Path, id_column, group_column) -> None:
    """Groups (patients) of segmentation cases from a CSV: id column -> group column."""
    rows, columns = _read_label_table(csv_path)
    id_column = _pick_column(csv_path, columns, id_column, _ID_COLUMNS, "--id-column")
    group_column = _pick_column(csv_path, columns, group_column, ("group", "patient_id",
                                                                  "patient"), "--group-column")
    groups = {strip_ending((r.get(id_column) or "").strip()): (r.get(group_column) or "").strip()
              for r in rows}
    for job in jobs:
        stem = strip_ending(job.images[0].name)
        group = groups.get(job.id, groups.get(stem))
        if group is None:
            raise InputError(job.images[0], f"no row in {csv_path.name} for this image")
        job.group = group or None


def _nnunet_jobs(folder: Path) -> tuple:
    """An nnU-Net v2 raw dataset: its own dataset.json decides cases and labels."""
    dataset = load_dataset(folder)
    if dataset.task_type != "classification" and not dataset.cases:
        raise InputError(folder / "imagesTr", f"no *_0000{dataset.file_ending} images")
    jobs = []
    for case in dataset.cases:
        for path in case.images + ([case.label] if case.label else []):
            if not path.exists():
                raise InputError(path, "listed by dataset.json / imagesTr but missing")
        jobs.append(_CaseJob(id=case.id, images=list(case.images), mask=case.label,
                             class_name=case.class_name, group=case.group))
    description = dict(dataset.description)
    description["labels"] = dataset.labels or {"background": 0}
    return jobs, description


# ---------------------------------------------------------------------------- inspection


def _read_mask(path: Path) -> ImageData:
    """A label map: palette PNGs keep their indices, equal-channel colour masks become grey."""
    mask = read_image(path)
    if mask.meta.get("mode") in ("P", "PA"):
        from PIL import Image

        with Image.open(path) as pil:
            mask.array = np.asarray(pil)[None]
    elif mask.n_channels == 3 and (mask.array == mask.array[:1]).all():
        mask.array = mask.array[:1]
    if mask.n_channels != 1:
        raise InputError(path, f"mask has {mask.n_channels} channels; a mask holds one label "
                               "value per pixel")
    return mask


def _same_geometry(image: ImageData, other: ImageData) -> str | None:
    """None when the grids agree, else what differs."""
    if image.spatial_shape != other.spatial_shape:
        return f"size {other.spatial_shape} differs from {image.path.name}'s {image.spatial_shape}"
    if not np.allclose(image.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing {other.spacing} differs from {image.path.name}'s {image.spacing}"
    if len(image.origin) == len(other.origin) and not np.allclose(
        image.origin, other.origin, rtol=0, atol=ORIGIN_ATOL_MM
    ):
        return f"origin {other.origin} differs from {image.path.name}'s {image.origin}"
    if len(image.direction) == len(other.direction) and not np.allclose(
        image.direction, other.direction, rtol=0, atol=DIRECTION_ATOL
    ):
        return f"direction {other.direction} differs from {image.path.name}'s {image.direction}"
    return None


class _InspectTask:
    """Read and check one case; picklable so joblib can ship it to worker processes."""

    def __init__(self, label_map: dict | None):
        self.allowed = None if label_map is None else {0, *label_map}

    def __call__(self, job: _CaseJob) -> _Inspection:
        first, channels = None, 0
        for path in job.images:
            image = read_image(path)
            low, high = image.array.min(), image.array.max()
            if low == high:
                raise InputError(path, f"constant image (every value is {low})")
            if first is None:
                first = image
            elif (problem := _same_geometry(first, image)) is not None:
                raise InputError(path, problem)
            channels += image.n_channels
        values = []
        if job.mask is not None:
            mask = _read_mask(job.mask)
            if (problem := _same_geometry(first, mask)) is not None:
                raise InputError(job.mask, problem)
            values = self._mask_values(job.mask, mask.array, mask.meta.get("file_format") or mask.source_format)
        return _Inspection(id=job.id, channels=channels, dim=first.dim, mask_values=values,
                           first_image=job.images[0])

    def _mask_values(self, path: Path, array: np.ndarray, source_format: str = "") -> list:
        unique = np.unique(array)
        if np.issubdtype(unique.dtype, np.floating) and not np.array_equal(unique, np.round(unique)):
            raise InputError(path, "mask holds fractional values; masks hold whole label values")
        values = [int(v) for v in unique]
        if values and values[0] < 0:
            raise InputError(path, f"mask holds the negative value {values[0]}")
        lossy = (" (JPEG is lossy: edges get values between the labels; save masks as PNG)"
                 if source_format == "jpeg" else "")
        if self.allowed is not None:
            unknown = [v for v in values if v not in self.allowed]
            if unknown:
                raise InputError(path, f"mask value(s) {unknown[:10]} not in the label map "
                                       f"(known: {sorted(self.allowed)}){lossy}")
        elif source_format in NATURAL_FORMATS and len(values) > MAX_UNMAPPED_MASK_VALUES:
            raise InputError(path, f"mask holds {len(values)} different grey values: it looks like a photograph, "
                                   f"not a label map{lossy}; is --masks the images folder? Masks with known "
                                   "values take --label-map")
        return values


def _channel_policy(jobs, inspections, convert_grey: bool) -> tuple:
    """(dim, channels, ids of grey cases to turn into RGB); mixed counts are refused."""
    dims = {i.dim for i in inspections}
    if len(dims) > 1:
        odd = next(i for i in inspections if i.dim != inspections[0].dim)
        raise InputError(odd.first_image, f"is {odd.dim}D but {inspections[0].first_image.name} "
                                          f"is {inspections[0].dim}D")
    counts: dict = {}
    for inspection in inspections:
        counts.setdefault(inspection.channels, []).append(inspection)
    if len(counts) == 1:
        return dims.pop(), next(iter(counts)), set()
    if set(counts) == {1, 3} and convert_grey:
        return dims.pop(), 3, {i.id for i in counts[1]}
    usual = max(counts, key=lambda c: len(counts[c]))
    odd = next(i for i in inspections if i.channels != usual)
    hint = " (pass convert_grey / --convert-grey to turn grey images into RGB)" \
        if set(counts) == {1, 3} else ""
    raise InputError(odd.first_image, f"has {odd.channels} channel(s) but {len(counts[usual])} "
                                      f"of {len(inspections)} images have {usual}{hint}")


def _output_ending(jobs, natural: bool, task_type: str, to_rgb: set) -> tuple:
    """(file ending, whether image files can be linked/copied unchanged)."""
    endings = {file_ending(p) for job in jobs for p in job.images}
    if natural:
        ending = ".png"
        if task_type == "classification" and len(endings) == 1 and not to_rgb:
            ending = endings.pop()  # classification keeps JPEGs as they are: no re-encoding
    else:
        ending = ".nii.gz"
    copyable = {file_ending(p) for job in jobs for p in job.images} == {ending}
    return ending, copyable


def _label_ids_from(label_map: dict | None, inspections, task_type: str) -> tuple:
    """({mask value: label id}, dataset.json labels {name: id})."""
    if task_type == "classification":
        return {}, {}
    if label_map is None:
        values = sorted({v for i in inspections for v in i.mask_values} - {0})
        if len(values) == 1:
            label_map = {values[0]: "foreground"}
        else:
            label_map = {v: f"label_{v}" for v in values}
    names = list(dict.fromkeys(label_map.values()))           # first appearance gives the id
    value_to_id = {value: names.index(name) + 1 for value, name in label_map.items()}
    labels = {"background": 0, **{name: index for index, name in enumerate(names, start=1)}}
    return value_to_id, labels


def _mask_lookup(job: _CaseJob, value_to_id: dict, ending: str) -> dict | None:
    """None where the mask file can be copied unchanged: a volume already holding label ids.

    Natural-image masks are always rewritten: palette or colour PNGs must become grey.
    """
    if job.mask is None:
        return None
    identity = all(value == label for value, label in value_to_id.items())
    if identity and file_ending(job.mask) == ending and ending not in NATURAL_EXTENSIONS:
        return None
    return {0: 0, **value_to_id}


# ---------------------------------------------------------------------------- writing


class _Reporting:
    """Run ``function`` and hand InputError back as a value.

    InputError does not survive pickling (its constructor takes two arguments), so a
    worker process must not raise it across joblib.
    """

    def __init__(self, function):
        self.function = function

    def __call__(self, item):
        try:
            return True, self.function(item)
        except InputError as error:
            return False, (str(error.path) if error.path else None, error.problem)


def _run_cases(function, items: list, desc: str, options: dict) -> list:
    results = parallel_map(_Reporting(function), items, desc=desc, **options)
    for ok, value in results:
        if not ok:
            raise InputError(value[0], value[1])
    return [value for _, value in results]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_case(job: _WriteJob) -> None:
    case = job.case
    channel = 0
    for source in case.images:
        if job.copy_images:
            _link_or_copy(source, job.root / "imagesTr" / f"{case.id}_{channel:04d}{job.ending}")
            channel += 1
            continue
        image = read_image(source)
        array = np.repeat(image.array, 3, axis=0) if job.to_rgb else image.array
        # a 4D volume (MSD's multi-modal NIfTI) becomes one file per channel, nnU-Net's layout;
        # natural colour images stay one RGB file
        parts = [array] if image.source_format in NATURAL_FORMATS else [c[None] for c in array]
        for part in parts:
            target = job.root / "imagesTr" / f"{case.id}_{channel:04d}{job.ending}"
            try:
                write_image(part, target, image)
            except ValueError as error:
                raise InputError(source, f"cannot convert to {job.ending}: {error}") from None
            channel += 1
    if case.mask is None:
        return
    target = job.root / "labelsTr" / f"{case.id}{job.ending}"
    if job.mask_lookup is None:
        _link_or_copy(case.mask, target)
        return
    mask = _read_mask(case.mask)
    lookup = np.zeros(max(job.mask_lookup) + 1, dtype=np.uint16)
    for value, label in job.mask_lookup.items():
        lookup[value] = label
    labels = lookup[mask.array[0].astype(np.int64)]
    dtype = np.uint8 if max(job.mask_lookup.values()) < 256 else np.uint16
    write_image(labels.astype(dtype), target, mask)


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


def _channel_names(given, channels: int, natural: bool) -> dict:
    if given:
        names = list(given)
        if len(names) != channels:
            raise InputError(None, f"{len(names)} channel names given for {channels} channels")
    elif natural and channels == 3:
        names = ["R", "G", "B"]
    elif natural and channels == 1:
        names = ["grey"]
    elif channels == 1:
        names = ["image"]
    else:
        names = [f"channel_{c}" for c in range(channels)]
    return {str(c): name for c, name in enumerate(names)}
