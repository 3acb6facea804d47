"""Raw datasets: the dataset.json contract, loading a dataset, and ``autoplan import``.

A dataset is ``RAW/NAME/`` with ``dataset.json`` and nnU-Net v2's layout:
``imagesTr/CASE_0000.ext`` (one file per channel; one RGB file counts as the
three channels R, G, B) and, for segmentation, ``labelsTr/CASE.ext``.
Classification datasets list their cases with class and optional group in
``dataset.json["cases"]``.
"""

from dataclasses import dataclass, field
from pathlib import Path

from autoplan.errors import InputError
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
                label=root / "labelsTr" / f"{case_id}{ending}",
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
