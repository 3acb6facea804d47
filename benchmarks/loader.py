"""Is data loading faster than training consumes it?

Prints one table: for hippocampus ``3d_fullres`` (patch 40x56x40, batch 4) and JSRT ``2d``
(patch 224x224, batch 10), the preprocessing time (all cases, ``--n-jobs``; and the rerun
that finds everything cached), batches per second of ``SegmentationLoader`` with the
``default`` augmentation (2 background workers, and in-process on one core), and training
iterations per second of the configuration's U-Net (forward + backward + SGD step) on
the CPU.

    .venv/bin/python benchmarks/loader.py [--work /tmp/autoplan_loader_bench] [--n-jobs 2]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"

from autoplan.datasets import load_dataset  # noqa: E402
from autoplan.loading import SegmentationLoader  # noqa: E402
from autoplan.planning import Configuration, Plan  # noqa: E402
from autoplan.preprocessing import preprocess_dataset  # noqa: E402

JSRT_LABELS = {150: 1, 200: 2, 250: 3}    # right lung, left lung, heart (README)


def unet_network(n_stages, dim):
    return {"n_stages": n_stages, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(n_stages)],
            "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "kernel_sizes": [[3] * dim] * n_stages, "conv_per_stage": 2}


def hippocampus(work: Path):
    source = SHARED / "hippocampus"
    root = work / "raw" / "Hippocampus"
    if not (root / "dataset.json").is_file():
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        for path in sorted((source / "imagesTr").glob("*.nii.gz")):
            case_id = path.name[: -len(".nii.gz")]
            (root / "imagesTr" / f"{case_id}_0000.nii.gz").symlink_to(path)
            (root / "labelsTr" / path.name).symlink_to(source / "labelsTr" / path.name)
        (root / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
            "file_ending": ".nii.gz", "task_type": "segmentation", "name": "Hippocampus"}))
    configuration = Configuration(
        name="3d_fullres", dim=3, patch_size=[40, 56, 40], batch_size=4, spacing=[1.0, 1.0, 1.0],
        network=unet_network(4, 3), normalization=[{"scheme": "zscore"}], estimated_memory_gb=0,
        epochs=1, iterations_per_epoch=1, n_input_channels=1, n_outputs=3)
    return load_dataset(root), configuration


def jsrt(work: Path):
    source = SHARED / "jsrt_lungs"
    root = work / "raw" / "JSRT"
    if not (root / "dataset.json").is_file():
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        for path in sorted((source / "images").glob("*.png")):
            (root / "imagesTr" / f"{path.stem}_0000.png").symlink_to(path)
            grey = np.asarray(Image.open(source / "masks" / path.name).convert("L"))
            labels = np.zeros(grey.shape, dtype=np.uint8)
            for value, label in JSRT_LABELS.items():
                labels[grey == value] = label
            Image.fromarray(labels).save(root / "labelsTr" / path.name)
        (root / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "xray"}, "file_ending": ".png", "task_type": "segmentation",
            "labels": {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3}, "name": "JSRT"}))
    configuration = Configuration(
        name="2d", dim=2, patch_size=[224, 224], batch_size=10, spacing=[1.0, 1.0],
        network=unet_network(6, 2), normalization=[{"scheme": "zscore"}], estimated_memory_gb=0,
        epochs=1, iterations_per_epoch=1, n_input_channels=1, n_outputs=4)
    return load_dataset(root), configuration


def preprocess(dataset, configuration, work, n_jobs):
    plan = Plan(dataset=dataset.name, task_type="segmentation", device="cpu", gpu_memory_gb=None,
                time_budget_minutes=None, configurations={configuration.name: configuration},
                default_configuration=configuration.name)
    pre = work / "preprocessed"
    cached = pre / dataset.name / configuration.name
    if cached.exists():
        for path in cached.iterdir():
            path.unlink()
    start = time.perf_counter()
    out = preprocess_dataset(dataset, plan, configuration.name, pre, n_jobs=n_jobs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    preprocess_dataset(dataset, plan, configuration.name, pre, n_jobs=n_jobs)
    return out, first, time.perf_counter() - start


def loader_rate(out, case_ids, configuration, n_workers, n_batches):
    with SegmentationLoader(out, case_ids, configuration, augment="default", n_workers=n_workers) as loader:
        for _ in range(3):                      # start-up and first batches
            next(loader)
        start = time.perf_counter()
        for _ in range(n_batches):
            batch = next(loader)
        rate = n_batches / (time.perf_counter() - start)
    return rate, batch


def training_rate(configuration, batch, n_steps, threads):
    import torch

    from autoplan.nets.unet import build_unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = build_unet(configuration, deep_supervision=False)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    data = torch.from_numpy(batch["data"])
    target = torch.from_numpy(batch["target"][:, 0].astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(network(data), target)
        loss.backward()
        optimiser.step()

    step()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "autoplan_loader_bench")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"real datasets not found at {SHARED}")
    load_before = os.getloadavg()[0]
    rows = []
    for build in (hippocampus, jsrt):
        dataset, configuration = build(args.work)
        out, first, rerun = preprocess(dataset, configuration, args.work, args.n_jobs)
        case_ids = [case.id for case in dataset.cases]
        workers, batch = loader_rate(out, case_ids, configuration, args.workers, args.batches)
        in_process, _ = loader_rate(out, case_ids, configuration, 0, max(5, args.batches // 3))
        train = training_rate(configuration, batch, args.train_steps, threads=args.workers)
        rows.append([f"{dataset.name} {configuration.name}", len(case_ids),
                     "x".join(map(str, configuration.patch_size)), configuration.batch_size,
                     f"{first:.1f} / {rerun:.1f}", f"{workers:.2f}", f"{in_process:.2f}", f"{train:.2f}",
                     f"{workers / train:.1f}x"])
    header = ["dataset / config", "cases", "patch", "batch", "preprocess s (first / rerun)",
              f"loader batch/s ({args.workers} workers)", "loader batch/s (in-process)",
              f"train it/s (CPU, {args.workers} threads)", "loader / train"]
    print(f"cpu cores: {os.cpu_count()}, load average at start: {load_before:.1f} "
          f"(other processes share these cores)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
