"""CSV tables beside the images: the class (and group) of each image for classification, or the
group (patient) of each segmentation case."""

import csv
import io
from pathlib import Path

from autoplan.datasets.sources import CaseJob, check_unique, listed_images, make_case_id
from autoplan.errors import InputError
from autoplan.io import strip_ending

_ID_COLUMNS = ("image_id", "image", "id", "case", "filename", "file", "name")
_LABEL_COLUMNS = ("label", "class", "dx", "diagnosis", "target", "category")


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


def classification_jobs(images_dir, csv_path, id_column, label_column, group_column, classes):
    rows, columns = _read_label_table(csv_path)
    id_column = _pick_column(csv_path, columns, id_column, _ID_COLUMNS, "--id-column")
    label_column = _pick_column(csv_path, columns, label_column, _LABEL_COLUMNS, "--label-column")
    if group_column is not None:
        _pick_column(csv_path, columns, group_column, (), "--group-column")
    images = {}
    for image in listed_images(images_dir):
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
        jobs.append(CaseJob(id=make_case_id(key, images[key]), images=[images[key]],
                             class_name=class_name, group=group))
    missing = sorted(set(images) - used)
    if missing:
        raise InputError(images[missing[0]], f"no row in {csv_path.name} for this image "
                                             f"({len(missing)} image(s) without a row)")
    found_classes = sorted({job.class_name for job in jobs})
    return check_unique(jobs), list(classes) if classes is not None else found_classes


def attach_groups(jobs: list, csv_path: Path, id_column, group_column) -> None:
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
