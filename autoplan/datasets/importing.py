"""``autoplan import``: a dataset from its publisher's layout into ``RAW/NAME``.

It runs in two passes over the cases, both in parallel: the inspection reads and validates
every image and mask (nothing is written), then, once the whole dataset is known (label
values, channel counts, file endings), each case is linked, copied or converted into a
temporary folder that is renamed to ``RAW/NAME`` at the end.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from autoplan.datasets.inspection import InspectTask, OutputFormat, output_format
from autoplan.datasets.layout import Dataset, load_dataset
from autoplan.datasets.sources import Collected, nnunet_jobs, segmentation_jobs, unlabelled_jobs
from autoplan.datasets.tables import attach_groups, classification_jobs
from autoplan.datasets.writing import write_dataset
from autoplan.errors import InputError
from autoplan.io import CHANNEL_FILE, strip_ending
from autoplan.parallel import parallel_map

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
    images_dir = Path(images_dir)
    _check_request(name, images_dir, raw_root, overwrite)
    if label_map is not None:
        label_map = parse_label_map(label_map)
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    source = _Source(images_dir, masks_dir, labels_csv, id_column, label_column, group_column)
    found = _collect_jobs(source, label_map, classes)
    inspections = parallel_map(InspectTask(found.label_map), found.jobs, n_jobs=n_jobs,
                               desc="checking cases", quiet=quiet)
    output = output_format(found, inspections, convert_grey)
    description = _description(name, source, found, output, channel_names)
    write_dataset(Path(raw_root), name, overwrite, found.jobs, output, description, n_jobs, quiet)
    return load_dataset(Path(raw_root) / name)


def _check_request(name, images_dir: Path, raw_root, overwrite: bool) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", str(name)):
        raise InputError(None, f"dataset name {name!r}: use letters, digits, _, - and .")
    target = Path(raw_root) / name
    if target.exists() and not overwrite:
        raise InputError(target, "already exists (remove it or import with overwrite)")
    if not images_dir.is_dir():
        raise InputError(images_dir, "images folder not found")


@dataclass
class _Source:
    images: Path
    masks: Path | None
    labels_csv: Path | None
    id_column: str | None
    label_column: str | None
    group_column: str | None


def _collect_jobs(source: _Source, label_map, classes) -> Collected:
    """The source's layout and cases; an nnU-Net raw folder brings its labels and classes."""
    images = source.images
    masks = Path(source.masks) if source.masks is not None else None
    table = Path(source.labels_csv) if source.labels_csv is not None else None
    if (images / "dataset.json").is_file():
        jobs, given = nnunet_jobs(images)
        if label_map is None:
            by_id = sorted(given["labels"].items(), key=lambda kv: kv[1])
            label_map = {v: k for k, v in by_id if v != 0}
        return Collected("nnunet_raw", given.get("task_type", "segmentation"), jobs, given, label_map,
                         classes or given.get("classes"))
    if table is not None and masks is None:
        jobs, classes = classification_jobs(images, table, source.id_column,
                                            source.label_column, source.group_column, classes)
        return Collected("classification_csv", "classification", jobs, {}, label_map, classes)
    if masks is not None:
        jobs = segmentation_jobs(images, masks)
        if table is not None:  # a CSV beside masks only says which patient each case is
            attach_groups(jobs, table, source.id_column, source.group_column)
        return Collected("images_and_masks", "segmentation", jobs, {}, label_map, classes)
    return Collected("images_only", "segmentation", unlabelled_jobs(images), {}, label_map, classes)


def _description(name: str, source: _Source, found: Collected, output: OutputFormat, channel_names) -> dict:
    """dataset.json of the imported dataset, with where it came from."""
    given = found.given
    description = {
        **{k: v for k, v in given.items() if k not in ("name", "numTraining")},
        "name": name,
        "task_type": found.task_type,
        "channel_names": given.get("channel_names")
        or _channel_names(channel_names, output.channels, output.natural),
        "labels": output.labels,
        "numTraining": len(found.jobs),
        "file_ending": output.ending,
        **_case_listing(found.jobs, found.task_type, found.classes, found.layout),
        "source": {
            "layout": found.layout,
            **{k: str(Path(v).resolve()) if v else None for k, v in
               (("images", source.images), ("masks", source.masks), ("labels_csv", source.labels_csv))},
            "label_map": {str(k): v for k, v in output.value_to_id.items()} if output.value_to_id else None,
            "converted_grey_to_rgb": sorted(output.to_rgb),
            # which file each case came from, where its id is not simply the file's stem
            "renamed": {job.id: [Path(p).name for p in job.images] for job in found.jobs
                        if job.id not in {strip_ending(Path(p).name) for p in job.images}
                        and not CHANNEL_FILE.match(strip_ending(Path(job.images[0]).name))} or None,
        },
    }
    citation = known_citation(source.images)
    if citation:
        description["citation"] = citation
    return description


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
