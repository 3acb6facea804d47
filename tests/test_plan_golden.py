"""Plans do not drift: the analytic GPU plans of the shared datasets equal the recorded ones.

``tests/data/golden_plans`` was written before the planner became a package (issue 25) from
the plans of JSRT, MSD hippocampus and HAM10000 (imported and fingerprinted from
../shared/datasets) and of the synthetic CT fingerprint of test_planning, for GPUs of 8, 24 and
80 GB, with no probe. A refactor that changes any field of any plan fails here; a deliberate
planning change rewrites the files (``python tests/test_plan_golden.py --rewrite``) and says so.
"""

import json
import sys
from pathlib import Path

import pytest

from autoplan.planning import plan_dataset

GOLDEN = Path(__file__).parent / "data" / "golden_plans"
GPU_BUDGETS_GB = (8, 24, 80)


def gpu_plans(dataset, fingerprint) -> dict:
    """The analytic GPU plans of one dataset, as JSON-ready dicts keyed by budget."""
    return {f"cuda_{gb}gb": plan_dataset(dataset, fingerprint, device="cuda", gpu_memory_gb=gb, probe=False).to_dict()
            for gb in GPU_BUDGETS_GB}


def _as_json(plans: dict) -> dict:
    return json.loads(json.dumps(plans, sort_keys=True))


def _real_dataset(name: str, tmp_path: Path, imported=None):
    """Import (unless given ``imported``) and fingerprint one shared dataset as the recorded
    plans were made."""
    from autoplan.datasets import import_dataset
    from autoplan.fingerprint import fingerprint_dataset
    from conftest import shared_dataset

    raw, results = tmp_path / "raw", tmp_path / "results"
    if name == "TaskXRay":
        root = shared_dataset("jsrt_lungs")
        dataset = import_dataset(name, root / "images", raw, masks_dir=root / "masks", quiet=True,
                                 label_map="150=right_lung,200=left_lung,250=heart", n_jobs=2)
    elif name == "TaskHippocampus":
        root = shared_dataset("hippocampus")
        dataset = import_dataset(name, root / "imagesTr", raw, masks_dir=root / "labelsTr", quiet=True,
                                 label_map="1=anterior,2=posterior", n_jobs=2)
    elif imported is not None:
        dataset = imported
    else:
        root = shared_dataset("ham10000")
        dataset = import_dataset(name, root / "images", raw, labels_csv=root / "HAM10000_metadata.csv",
                                 id_column="image_id", label_column="dx", group_column="lesion_id",
                                 quiet=True, n_jobs=2)
    return dataset, fingerprint_dataset(dataset, results, n_jobs=2)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", ["TaskXRay", "TaskHippocampus", "TaskDerm"])
def test_gpu_plans_of_shared_datasets_are_unchanged(name, tmp_path, request):
    # HAM10000 is the session's import (shared with the import-time test), not a second one
    imported = request.getfixturevalue("ham10000_imported")["dataset"] if name == "TaskDerm" else None
    dataset, fingerprint = _real_dataset(name, tmp_path, imported)
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    assert _as_json(gpu_plans(dataset, fingerprint)) == expected


def test_gpu_plans_of_synthetic_ct_are_unchanged():
    from test_planning import ct_fingerprint

    expected = json.loads((GOLDEN / "TaskCT_synthetic.json").read_text())
    assert _as_json(gpu_plans("TaskCT", ct_fingerprint())) == expected


if __name__ == "__main__" and "--rewrite" in sys.argv:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from test_planning import ct_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("TaskXRay", "TaskHippocampus", "TaskDerm"):
            (GOLDEN / f"{name}.json").write_text(json.dumps(gpu_plans(*_real_dataset(name, Path(tmp) / name)),
                                                            indent=1, sort_keys=True) + "\n")
    (GOLDEN / "TaskCT_synthetic.json").write_text(json.dumps(gpu_plans("TaskCT", ct_fingerprint()),
                                                             indent=1, sort_keys=True) + "\n")
