"""Per-case work on a Dask cluster (autoplan.parallel): a real LocalCluster of 2 worker processes.

The stages run once on local joblib workers and once on the cluster, and must write the same
cases, fingerprint, preprocessed arrays and evaluation metrics; bad input must come back as the
InputError of the first failing case in order; an unreachable scheduler, workers without
autoplan or a missing dask is one InputError.
"""

import json
import os
import sys
import time

import blosc2
import numpy as np
import pytest
from PIL import Image

from conftest import write_png_pairs

from autoplan import parallel
from autoplan.datasets import import_dataset
from autoplan.errors import InputError
from autoplan.evaluation import segmentation_metrics
from autoplan.fingerprint import fingerprint_dataset
from autoplan.jsonio import dumps
from autoplan.planning import Configuration, Plan
from autoplan.preprocessing import preprocess_dataset

distributed = pytest.importorskip("distributed", reason="the cluster extra: pip install 'autoplan[cluster]'")


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes (about 1 s to start on 2 cores)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local_cluster:
        yield local_cluster


def _plan_2d() -> Plan:
    configuration = Configuration(
        name="2d", dim=2, patch_size=[32, 32], batch_size=2, spacing=[0.5, 0.5], network={},
        normalization=[{"scheme": "zscore"}], estimated_memory_gb=0.1, epochs=1,
        iterations_per_epoch=1, n_input_channels=1, n_outputs=2)
    return Plan(dataset="Pairs", task_type="segmentation", device="cpu", gpu_memory_gb=None,
                time_budget_minutes=None, configurations={"2d": configuration}, default_configuration="2d")


def _run_stages(sources, root):
    """Import, fingerprint and preprocess (spacing 1 -> 0.5: a real resampling) under ``root``."""
    images, masks = sources
    dataset = import_dataset("Pairs", images, root / "raw", masks_dir=masks, n_jobs=2, quiet=True)
    fingerprint = fingerprint_dataset(dataset, root / "results", n_jobs=2)
    preprocessed = preprocess_dataset(dataset, _plan_2d(), "2d", root / "preprocessed", n_jobs=2)
    return fingerprint, preprocessed


def _folder_contents(folder) -> dict:
    """{relative path: array (.npy, .b2nd), parsed JSON or bytes} of every file under ``folder``."""
    contents = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.suffix == ".npy":
            contents[key] = np.load(path)
        elif path.suffix == ".b2nd":            # the cache's compressed arrays
            contents[key] = blosc2.open(str(path))[:]
        elif path.suffix == ".json":
            contents[key] = json.loads(path.read_text())
        else:
            contents[key] = path.read_bytes()
    return contents


def _assert_same_files(local_folder, cluster_folder, ignored_keys=()):
    """Equal files; ``ignored_keys`` of JSON files may differ (stamps of source mtimes)."""
    local, remote = _folder_contents(local_folder), _folder_contents(cluster_folder)
    assert sorted(local) == sorted(remote)
    for key, value in local.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, remote[key], err_msg=key)
        elif isinstance(value, dict):
            assert ({name: v for name, v in value.items() if name not in ignored_keys}
                    == {name: v for name, v in remote[key].items() if name not in ignored_keys}), key
        else:
            assert value == remote[key], key


def _worker_pid(item):
    return os.getpid()


@pytest.mark.slow
def test_stages_on_the_cluster_write_what_local_workers_write(cluster, tmp_path):
    sources = write_png_pairs(tmp_path / "sources", n=8, size=48)
    started = time.perf_counter()
    local_fingerprint, local_preprocessed = _run_stages(sources, tmp_path / "local")
    print(f"import + fingerprint + preprocess on local joblib workers: {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    with parallel.use_scheduler(cluster.scheduler_address):
        # the work really leaves this process: every item ran in one of the two workers
        worker_pids = set(parallel.parallel_map(_worker_pid, range(8)))
        cluster_fingerprint, cluster_preprocessed = _run_stages(sources, tmp_path / "cluster")
    print(f"import + fingerprint + preprocess on the cluster: {time.perf_counter() - started:.2f} s")
    assert os.getpid() not in worker_pids and 1 <= len(worker_pids) <= 2
    _assert_same_files(tmp_path / "local" / "raw", tmp_path / "cluster" / "raw")
    local_json, cluster_json = local_fingerprint.to_dict(), cluster_fingerprint.to_dict()
    local_json.pop("source_hash"), cluster_json.pop("source_hash")   # mtimes of the written cases
    assert local_json == cluster_json
    assert len(list(cluster_preprocessed.glob("c*.json"))) == 8           # every case preprocessed
    _assert_same_files(local_preprocessed, cluster_preprocessed, ignored_keys={"stamp"})
    assert parallel.scheduler_address() is None          # the with block's choice ended with it


def test_environment_variable_selects_the_cluster(cluster, monkeypatch):
    monkeypatch.setenv(parallel.SCHEDULER_VARIABLE, cluster.scheduler_address)
    worker_pids = set(parallel.parallel_map(_worker_pid, range(6), n_jobs=1))
    assert os.getpid() not in worker_pids
    monkeypatch.delenv(parallel.SCHEDULER_VARIABLE)
    assert parallel.parallel_map(_worker_pid, range(3), n_jobs=1) == [os.getpid()] * 3


def test_evaluation_metrics_on_the_cluster_equal_local(cluster):
    # the label maps travel to the workers as scattered data, not inside the task graph
    rng = np.random.default_rng(0)
    cases = []
    for index in range(6):
        reference = np.zeros((20, 40, 40), np.uint8)
        reference[5:15, 10:30, 10 + index:30] = 1
        reference[8:12, 15:20, 15:20] = 2
        prediction = np.where(rng.random(reference.shape) < 0.02, 1, reference).astype(np.uint8)
        cases.append({"case": f"c{index}", "prediction": prediction, "reference": reference,
                      "spacing": (3.0, 0.8, 0.8)})
    labels = {"1": "organ", "2": "lesion"}
    local = segmentation_metrics(cases, labels, n_jobs=2)
    with parallel.use_scheduler(cluster.scheduler_address):
        remote = segmentation_metrics(cases, labels, n_jobs=2)
    assert [case["case"] for case in remote["per_case"]] == [f"c{index}" for index in range(6)]
    assert dumps(remote) == dumps(local)


def _late_or_early_failure(item):
    # item 3 fails late, item 5 at once: the error reported must still be item 3's
    if item == 3:
        time.sleep(0.5)
        raise InputError(f"case_{item}.png", "unreadable")
    if item == 5:
        raise InputError(f"case_{item}.png", "unreadable")
    return item


def test_first_failing_item_in_order_comes_back_through_dask(cluster, tmp_path):
    with pytest.raises(InputError, match="case_3.png: unreadable"):      # as on local workers
        parallel.parallel_map(_late_or_early_failure, range(8), n_jobs=2)
    with parallel.use_scheduler(cluster.scheduler_address):
        with pytest.raises(InputError, match="case_3.png: unreadable"):
            parallel.parallel_map(_late_or_early_failure, range(8))
        # a real stage: two masks of the wrong size; the first in case order is named
        images, masks = write_png_pairs(tmp_path / "sources", n=6, size=32)
        for stem in ("c4", "c2"):
            Image.fromarray(np.zeros((20, 20), np.uint8)).save(masks / f"{stem}.png")
        with pytest.raises(InputError) as caught:
            import_dataset("Bad", images, tmp_path / "raw", masks_dir=masks, quiet=True)
    assert "c2" in str(caught.value) and "c4" not in str(caught.value)


BLOCK_AUTOPLAN = """
import sys

class Block:   # a worker environment without autoplan
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "autoplan":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
for name in [name for name in sys.modules if name.split(".")[0] == "autoplan"]:
    del sys.modules[name]
"""


def test_workers_without_autoplan_are_refused_before_any_work(tmp_path):
    preload = tmp_path / "block_autoplan.py"
    preload.write_text(BLOCK_AUTOPLAN)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  preload=[str(preload)]) as bare_cluster:
        with pytest.raises(InputError, match="1 of 1 workers cannot import autoplan"):
            parallel.use_scheduler(bare_cluster.scheduler_address)
    assert parallel.scheduler_address() is None


def test_unreachable_scheduler_is_one_input_error_naming_it(monkeypatch):
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_SECONDS", 1)
    address = "tcp://127.0.0.1:9"          # the discard port: nothing listens there
    with pytest.raises(InputError) as caught:
        parallel.use_scheduler(address)
    message = str(caught.value)
    assert address in message and "cannot connect" in message and "\n" not in message
    monkeypatch.setenv(parallel.SCHEDULER_VARIABLE, address)   # the same through the variable
    with pytest.raises(InputError, match="cannot connect"):
        parallel.parallel_map(_worker_pid, range(2))


def test_missing_dask_is_one_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)      # what `import distributed` sees without it
    with pytest.raises(InputError, match=r"tcp://scheduler:8786.*autoplan\[cluster\]"):
        parallel.use_scheduler("tcp://scheduler:8786")
