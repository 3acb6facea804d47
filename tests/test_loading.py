"""Loaders: patch shapes, foreground oversampling, determinism, workers and their shutdown."""

import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoplan.loading import ClassificationLoader, SegmentationLoader
from autoplan.planning import Configuration
from autoplan.preprocessing import CaseProperties, sample_class_locations
from autoplan.preprocessing.cache import open_case_arrays, save_case_arrays


def configuration(patch_size=(16, 20, 16), dim=3, batch_size=6, name="3d_fullres", channels=1,
                  normalization=None):
    return Configuration(
        name=name, dim=dim, patch_size=list(patch_size), batch_size=batch_size, spacing=[1.0] * dim,
        network={}, normalization=normalization or [{"scheme": "zscore"}] * channels,
        estimated_memory_gb=0.1, epochs=1, iterations_per_epoch=1, n_input_channels=channels, n_outputs=3)


def write_cases(folder, n=5, shape=(20, 24, 22), seed=0, patch_size=(8, 10, 8), uncompressed=False):
    """Preprocessed-looking cases: noise image, a small labelled box (sparse foreground), stored
    as the cache stores them (chunks smaller than the loader's patch, so patches span several),
    or as version 1's uncompressed .npy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        data = rng.normal(size=(1, *shape)).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int16)
        corner = [int(rng.integers(0, s - 3)) for s in shape]
        seg[(0,) + tuple(slice(c, c + 3) for c in corner)] = 1 + i % 2
        case_id = f"case{i}"
        if uncompressed:
            np.save(folder / f"{case_id}.npy", data)
            np.save(folder / f"{case_id}_seg.npy", seg)
        else:
            save_case_arrays(folder, case_id, data, seg, patch_size)
        CaseProperties(case_id=case_id, original_shape=list(shape), original_spacing=[1.0] * len(shape),
                       crop_bbox=[[0, s] for s in shape], shape_after_crop=list(shape),
                       shape_after_resampling=list(shape),
                       class_locations=sample_class_locations(seg[0])).save(folder / f"{case_id}.json")
        ids.append(case_id)
    return ids


def child_pids():
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids |= set((task / "children").read_text().split())
        except OSError:
            pass
    return pids


def wait_for_children(before, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline and child_pids() - before:
        time.sleep(0.05)
    return child_pids() - before


def test_batches_shapes_and_foreground_oversampling(tmp_path):
    ids = write_cases(tmp_path)
    with SegmentationLoader(tmp_path, ids, configuration(), augment="none", n_workers=0) as loader:
        for _ in range(5):
            batch = next(loader)
            assert set(batch) == {"data", "target"}
            assert batch["data"].shape == (6, 1, 16, 20, 16) and batch["data"].dtype == np.float32
            assert batch["target"].shape == (6, 1, 16, 20, 16) and batch["target"].dtype == np.int16
            # the last third of the batch is centred on foreground
            assert all(batch["target"][k].any() for k in (4, 5))


def test_patch_larger_than_image_is_padded(tmp_path):
    ids = write_cases(tmp_path, shape=(10, 12, 8))
    with SegmentationLoader(tmp_path, ids, configuration(), augment="default", n_workers=0) as loader:
        batch = next(loader)
    assert batch["data"].shape == (6, 1, 16, 20, 16)
    assert (batch["data"] == 0).any()  # padding


def test_in_process_loading_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    ids = write_cases(tmp_path)
    np.random.seed(123)
    expected_next = np.random.RandomState(123).random_sample()
    runs = []
    for seed in (0, 0, 1):
        with SegmentationLoader(tmp_path, ids, configuration(), augment="default", n_workers=0,
                                seed=seed) as loader:
            runs.append([next(loader) for _ in range(3)])
    assert np.random.random_sample() == expected_next
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a["data"], b["data"])
        np.testing.assert_array_equal(a["target"], b["target"])
    assert not np.array_equal(runs[0][0]["data"], runs[2][0]["data"])


def test_workers_produce_batches_and_close_cleanly(tmp_path):
    ids = write_cases(tmp_path)
    before = child_pids()
    # joblib's reusable loky workers from earlier tests are not the loader's: leave them out
    earlier = set(multiprocessing.active_children())
    loader = SegmentationLoader(tmp_path, ids, configuration(), augment="default", n_workers=2)
    batches = [next(loader) for _ in range(4)]
    assert len(set(multiprocessing.active_children()) - earlier) >= 2
    assert all(b["data"].shape == (6, 1, 16, 20, 16) for b in batches)
    loader.close()
    loader.close()  # idempotent
    assert not set(multiprocessing.active_children()) - earlier
    assert not wait_for_children(before)
    with pytest.raises(StopIteration):
        next(loader)


def test_worker_error_raises_instead_of_hanging(tmp_path):
    ids = write_cases(tmp_path, n=2)
    before = child_pids()
    (tmp_path / "case1.b2nd").write_bytes(b"not an array")
    loader = SegmentationLoader(tmp_path, ids, configuration(), augment="none", n_workers=2)
    start = time.time()
    with pytest.raises(RuntimeError):
        for _ in range(50):
            next(loader)
    assert time.time() - start < 30
    loader.close()
    assert not wait_for_children(before)


def test_validation_pass_is_ordered_and_repeatable(tmp_path):
    ids = write_cases(tmp_path, n=5)
    passes = {}
    for workers in (0, 2):
        with SegmentationLoader(tmp_path, ids, configuration(), augment="none", batch_size=2,
                                n_workers=workers, infinite=False) as loader:
            passes[workers] = [[b["data"] for b in loader] for _ in range(2)]
    assert [len(b) for b in passes[0][0]] == [2, 2, 1]
    for workers in (0, 2):
        for a, b in zip(passes[workers][0], passes[workers][1]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(passes[0][0], passes[2][0]):
        np.testing.assert_array_equal(a, b)


def test_2d_configuration_on_volumes_samples_slices(tmp_path):
    ids = write_cases(tmp_path, shape=(6, 24, 22))
    with SegmentationLoader(tmp_path, ids, configuration(patch_size=(20, 16), dim=2, name="2d"),
                            augment="default", n_workers=0) as loader:
        batch = next(loader)
    assert batch["data"].shape == (6, 1, 20, 16) and batch["target"].shape == (6, 1, 20, 16)
    assert batch["target"][5].any()


@pytest.mark.parametrize("dim, shape, patch", [(3, (20, 24, 22), (16, 20, 16)), (3, (10, 12, 8), (16, 20, 16)),
                                                (2, (6, 24, 22), (20, 16)), (2, (30, 26), (20, 16))])
def test_compressed_cases_give_the_same_patches_as_arrays(tmp_path, dim, shape, patch):
    """Patches cut from the compressed cache (chunks smaller than the patch, windows that leave
    the image, 2D slices of volumes) equal those cut from the same arrays uncompressed."""
    config = configuration(patch_size=patch, dim=dim, name=f"{dim}d")
    ids = write_cases(tmp_path / "compressed", shape=shape)
    write_cases(tmp_path / "arrays", shape=shape, uncompressed=True)
    assert not list((tmp_path / "compressed").glob("*.npy"))
    batches = {}
    for folder in ("compressed", "arrays"):
        with SegmentationLoader(tmp_path / folder, ids, config, augment="none", n_workers=0, seed=7) as loader:
            batches[folder] = [next(loader) for _ in range(4)]
        with SegmentationLoader(tmp_path / folder, ids, config, augment="none", n_workers=0,
                                infinite=False) as loader:
            batches[folder] += list(loader)
    for compressed, arrays in zip(batches["compressed"], batches["arrays"]):
        np.testing.assert_array_equal(compressed["data"], arrays["data"])
        np.testing.assert_array_equal(compressed["target"], arrays["target"])
        assert compressed["target"].dtype == np.int16
    assert any(b["target"].any() for b in batches["compressed"])


def classifier_configuration(batch_size=8):
    return configuration(patch_size=(24, 24), dim=2, batch_size=batch_size, name="classifier", channels=3,
                         normalization=[{"scheme": "rgb", "mean": 0.5, "std": 0.25}] * 3)


def test_classification_loader(tmp_path):
    from autoplan.preprocessing import normalize_classification_batch

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 24, 24, 3), dtype=np.uint8)
    labels = np.array([0] * 36 + [1] * 4)
    np.save(tmp_path / "images.npy", images)
    config = classifier_configuration()
    indices = np.arange(40)
    with ClassificationLoader(images, labels, indices, config, augment="default", n_workers=0) as loader:
        batch = next(loader)
    assert batch["data"].shape == (8, 3, 24, 24) and batch["data"].dtype == np.float32
    assert batch["target"].dtype == np.int64

    with ClassificationLoader(tmp_path / "images.npy", labels, indices[5:25], config, batch_size=8,
                              n_workers=2, infinite=False) as loader:
        batches = list(loader)
    assert [len(b["target"]) for b in batches] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([b["target"] for b in batches]), labels[5:25])
    np.testing.assert_allclose(batches[0]["data"], normalize_classification_batch(images[5:13], config),
                               atol=1e-6)


def test_classification_workers_close(tmp_path):
    images = np.zeros((10, 24, 24, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    before = child_pids()
    loader = ClassificationLoader(tmp_path / "images.npy", np.arange(10) % 2, np.arange(10),
                                  classifier_configuration(), n_workers=2)
    assert next(loader)["data"].shape == (8, 3, 24, 24)
    loader.close()
    assert not wait_for_children(before)


CTRL_C_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)   # as on a terminal, even when launched in background
sys.path.insert(0, {tests!r})
from test_loading import child_pids, configuration
from autoplan.loading import SegmentationLoader
folder = Path({folder!r})
ids = sorted(p.stem for p in folder.glob("*.json"))
try:
    with SegmentationLoader(folder, ids, configuration(), augment="default", n_workers=2) as loader:
        for k in range(1000):
            next(loader)
            if k == 3:
                os.killpg(os.getpgid(0), signal.SIGINT)   # Ctrl-C reaches the whole process group
            time.sleep(0.01)
except KeyboardInterrupt:
    print("interrupted")
deadline = time.time() + 5
while child_pids() and time.time() < deadline:
    time.sleep(0.05)
print("children", len(child_pids()))
"""


@pytest.mark.slow
def test_ctrl_c_stops_workers(tmp_path):
    import subprocess
    import sys

    write_cases(tmp_path / "cases")
    script = CTRL_C_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "cases"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    assert "interrupted" in result.stdout, result.stderr[-2000:]
    assert "children 0" in result.stdout, result.stdout + result.stderr[-2000:]


def _image_positions(loader, n_batches=6) -> set:
    """Where the (nonzero) image sits in each sampled window, before augmentation: its top-left."""
    positions = set()
    for _ in range(n_batches):
        for sample in loader._source.generate_train_batch()["data"][:, 0]:
            rows, cols = np.nonzero(sample)
            positions.add((int(rows.min()), int(cols.min())))
    return positions


def test_field_of_view_plans_shift_whole_images_inside_the_patch(tmp_path):
    """An image exactly the patch size sits in the centre of every window (nnU-Net's window
    cannot move); plans that resize whole images shift it by up to 10 % of the patch, as
    other sites centre patients differently. Validation windows never move."""
    ids = write_cases(tmp_path, n=4, shape=(32, 32))
    for case_id in ids:   # a nonzero image: its position is visible after padding
        save_case_arrays(tmp_path, case_id, np.ones((1, 32, 32), dtype=np.float32),
                         open_case_arrays(tmp_path, case_id)[1][:], (32, 32))
    plain = configuration(patch_size=(32, 32), dim=2, name="2d", batch_size=4)
    fitted = configuration(patch_size=(32, 32), dim=2, name="2d", batch_size=4)
    fitted.field_of_view = {"mode": "fit", "working_size": [32, 32]}
    with SegmentationLoader(tmp_path, ids, plain, augment="default", n_workers=0, seed=3) as loader:
        centred = _image_positions(loader)
    assert len(centred) == 1
    centre = next(iter(centred))
    with SegmentationLoader(tmp_path, ids, fitted, augment="default", n_workers=0, seed=3) as loader:
        shifted = _image_positions(loader)
    assert len(shifted) > 8
    assert max(abs(r - centre[0]) for r, _ in shifted) == max(abs(c - centre[1]) for _, c in shifted) == 3
    with SegmentationLoader(tmp_path, ids, fitted, augment="none", n_workers=0, seed=3) as loader:
        assert len(_image_positions(loader)) == 1


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_loading import child_pids, configuration
from autoplan.loading import SegmentationLoader
folder = Path({folder!r})
ids = sorted(p.stem for p in folder.glob("*.json"))
loader = SegmentationLoader(folder, ids, configuration(), augment="default", n_workers=2)
next(loader)
print("workers", " ".join(sorted(child_pids())), flush=True)
time.sleep(600)
"""


def _alive(pid: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"          # a zombie has exited; only its parent has not reaped it yet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_kill_minus_nine_of_the_trainer_ends_its_loader_workers(tmp_path):
    """Workers re-parented to PID 1 after kill -9 of training lived on (issue 24)."""
    import signal
    import subprocess

    write_cases(tmp_path / "cases")
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "cases"))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    line = process.stdout.readline()
    workers = line.split()[1:]
    assert line.startswith("workers") and len(workers) >= 2, line
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 5          # the bound: no worker survives 5 s
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
