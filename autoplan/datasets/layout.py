"""A raw dataset: the dataset.json contract, and ``load_dataset`` reading one back.

A dataset is ``RAW/NAME/`` with ``dataset.json`` and nnU-Net v2's layout:
``imagesTr/CASE_0000.ext`` (one file per channel; one RGB file counts as the
three channels R, G, B) and, for segmentation, ``labelsTr/CASE.ext``.
Classification datasets list their cases with class and optional group in
``dataset.json["cases"]``.
"""

from dataclasses import dataclass, field
from pathlib import Path

from autoplan.errors import InputError
from autoplan.io import FIRST_CHANNEL_SUFFIX, channel_file_name
from autoplan.jsonio import read_json


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
    description = _read_description(root / "dataset.json")
    task_type = description.get("task_type", "segmentation")
    channel_names = {str(k): v for k, v in description.get("channel_names", {"0": "image"}).items()}
    find_cases = _CASES.get(task_type, _segmentation_cases)
    cases, labels = find_cases(root, description, _files_per_case(channel_names))
    return Dataset(
        name=description.get("name", root.name),
        root=root,
        task_type=task_type,
        channel_names=channel_names,
        labels=labels,
        file_ending=description.get("file_ending", ""),
        cases=cases,
        classes=description.get("classes"),
        description=description,
    )


def _read_description(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "dataset.json not found (import the dataset first)")
    try:
        return read_json(path)
    except ValueError as error:
        raise InputError(path, f"not valid JSON ({error})") from None


def _classification_cases(root: Path, description: dict, n_files: int) -> tuple:
    """(cases as dataset.json lists them, with class and group; no labels)."""
    ending = description.get("file_ending", "")
    cases = [
        Case(
            id=entry["case"],
            images=[root / "imagesTr" / channel_file_name(entry["case"], c, ending) for c in range(n_files)],
            class_name=entry["label"],
            group=entry.get("group"),
        )
        for entry in description.get("cases", [])
    ]
    return cases, {}


def _segmentation_cases(root: Path, description: dict, n_files: int) -> tuple:
    """(a case per first channel file in imagesTr, with its mask unless unlabelled; label ids)."""
    ending = description.get("file_ending", "")
    groups = description.get("groups", {})
    first_channel = FIRST_CHANNEL_SUFFIX + ending
    case_ids = sorted({p.name[: -len(first_channel)] for p in (root / "imagesTr").glob(f"*{first_channel}")})
    cases = [
        Case(
            id=case_id,
            images=[root / "imagesTr" / channel_file_name(case_id, c, ending) for c in range(n_files)],
            label=None if description.get("unlabelled") else root / "labelsTr" / f"{case_id}{ending}",
            group=groups.get(case_id),
        )
        for case_id in case_ids
    ]
    return cases, _label_ids(description.get("labels", {"background": 0}))


# How each task finds its cases; any other task type is read as segmentation (the fingerprint
# refuses unknown task types with a message).
_CASES = {"classification": _classification_cases, "segmentation": _segmentation_cases}


def _files_per_case(channel_names: dict) -> int:
    """An RGB natural image is one file holding three channels."""
    names = [str(v).upper() for v in channel_names.values()]
    if names[:3] == ["R", "G", "B"]:
        return 1
    return len(channel_names)
