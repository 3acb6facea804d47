"""Benchmark: autoplan's fingerprint against ``nnUNetv2_extract_fingerprint`` on hippocampus.

Both run on the same files: a temporary nnU-Net raw folder ``Dataset004_Hippocampus``
(symlinks to ../shared/datasets/hippocampus with the ``_0000`` channel suffix and a
dataset.json), which autoplan also reads as it is. nnU-Net v2 lives in its own virtual
environment (it is not a dependency of autoplan); the script creates it when missing::

    python benchmarks/fingerprint.py [--nnunet-python /tmp/nnunet_env/bin/python] [--n-jobs 2]

Each side is timed as a whole command (a fresh Python process: start-up, imports,
parallel workers and the JSON written), alternately ``--repeats`` times, the fastest
run counting; one table compares times and values.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HIPPOCAMPUS = REPO.parent / "shared" / "datasets" / "hippocampus"
DEFAULT_NNUNET_ENV = Path("/tmp/nnunet_env")
DATASET_NAME = "Dataset004_Hippocampus"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hippocampus", type=Path, default=DEFAULT_HIPPOCAMPUS)
    parser.add_argument("--nnunet-python", type=Path, default=None,
                        help="python of an environment with nnunetv2 (default: create /tmp/nnunet_env)")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per side, alternating; the fastest counts (the machine is shared)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if not args.hippocampus.is_dir():
        sys.exit(f"{args.hippocampus}: hippocampus dataset not found (see ../shared/datasets/README.md)")

    with tempfile.TemporaryDirectory(prefix="fingerprint_bench_") as scratch:
        work = args.work or Path(scratch)
        raw = build_raw_dataset(args.hippocampus, work / "nnUNet_raw")
        our_times, their_times = [], []
        for _ in range(max(1, args.repeats)):
            ours, seconds = run_ours(raw / DATASET_NAME, work / "autoplan_results", args.n_jobs)
            our_times.append(seconds)
            theirs, seconds, problem = run_nnunet(args.nnunet_python, work, args.n_jobs)
            if seconds is not None:
                their_times.append(seconds)
        print_table(ours, min(our_times), theirs, min(their_times, default=None), problem, args.n_jobs)
        print("all runs (wall s / CPU s): autoplan "
              + ", ".join(f"{w:.1f}/{c:.1f}" for w, c in our_times) + "; nnU-Net "
              + (", ".join(f"{w:.1f}/{c:.1f}" for w, c in their_times) or "-"))


def build_raw_dataset(source: Path, raw: Path) -> Path:
    """nnU-Net's raw layout as symlinks: imagesTr/X_0000.nii.gz, labelsTr/X.nii.gz, dataset.json."""
    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    names = sorted(p.name[: -len(".nii.gz")] for p in (source / "imagesTr").glob("*.nii.gz"))
    for name in names:
        image_link = folder / "imagesTr" / f"{name}_0000.nii.gz"
        label_link = folder / "labelsTr" / f"{name}.nii.gz"
        if not image_link.exists():
            image_link.symlink_to(source / "imagesTr" / f"{name}.nii.gz")
        if not label_link.exists():
            label_link.symlink_to(source / "labelsTr" / f"{name}.nii.gz")
    description = {"name": DATASET_NAME, "channel_names": {"0": "MRI"},
                   "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                   "numTraining": len(names), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(description, indent=2))
    return raw


def timed(command, **kwargs):
    """(completed process, wall seconds, CPU seconds of the process and its reaped children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, wall, cpu


def run_ours(dataset_root: Path, results: Path, n_jobs: int):
    """autoplan's fingerprint in a fresh process, like a user's command."""
    code = ("import sys; from autoplan.datasets import load_dataset; "
            "from autoplan.fingerprint import fingerprint_dataset; "
            "fingerprint_dataset(load_dataset(sys.argv[1]), sys.argv[2], force=True, n_jobs=int(sys.argv[3]))")
    _, wall, cpu = timed([sys.executable, "-c", code, str(dataset_root), str(results), str(n_jobs)],
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((results / DATASET_NAME / "fingerprint.json").read_text()), (wall, cpu)


def ensure_nnunet_python(requested: Path | None):
    """(python, problem): nnU-Net's interpreter, creating its environment when missing."""
    if requested is not None:
        return (requested, None) if requested.exists() else (None, f"{requested} does not exist")
    python = DEFAULT_NNUNET_ENV / "bin" / "python"
    if not (DEFAULT_NNUNET_ENV / "bin" / "nnUNetv2_extract_fingerprint").exists():
        print(f"creating {DEFAULT_NNUNET_ENV} with torch==2.13.0 and nnunetv2 (a few minutes) ...",
              file=sys.stderr)
        steps = [[sys.executable, "-m", "venv", str(DEFAULT_NNUNET_ENV)],
                 [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "nnunetv2"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                return None, f"installing nnunetv2 failed ({' '.join(step[:4])}): {' | '.join(tail)}"
    return python, None


def run_nnunet(requested_python, work: Path, n_jobs: int):
    """nnUNetv2_extract_fingerprint -d 4 on the same raw folder: (fingerprint, seconds, problem)."""
    python, problem = ensure_nnunet_python(requested_python)
    if python is None:
        return None, None, problem
    command = Path(python).parent / "nnUNetv2_extract_fingerprint"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "nnUNet_raw": str(work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results")}
    done, wall, cpu = timed([str(command), "-d", "4", "-np", str(n_jobs), "--clean"],
                            env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return None, None, f"nnUNetv2_extract_fingerprint failed: {' | '.join(tail)}"
    path = work / "nnUNet_preprocessed" / DATASET_NAME / "dataset_fingerprint.json"
    return json.loads(path.read_text()), (wall, cpu), None


def nnunet_axis_order(ours: dict, theirs: dict) -> str:
    """nnU-Net's axis order, found by matching its per-case shapes with ours (same case order)."""
    our_shapes = [tuple(s) for s in ours["cropped_shapes"]]
    their_shapes = [tuple(s) for s in theirs["shapes_after_crop"]]
    if our_shapes == their_shapes:
        return "z,y,x"
    if our_shapes == [tuple(reversed(s)) for s in their_shapes]:
        return "x,y,z"
    return "unknown (shapes differ)"


def print_table(ours, our_times, theirs, their_times, problem, n_jobs):
    """``*_times`` are (wall, CPU) seconds of the fastest run, or None."""
    our_stats = ours["intensity"][0]
    our_seconds, our_cpu = our_times
    their_seconds, their_cpu = their_times or (None, None)
    rows = [("wall time (s), whole command", our_seconds, their_seconds),
            ("CPU time (s), all processes", our_cpu, their_cpu)]
    if theirs is not None:
        order = nnunet_axis_order(ours, theirs)
        their_stats = theirs["foreground_intensity_properties_per_channel"]["0"]
        their_shape = np.median(np.array(theirs["shapes_after_crop"], dtype=float), axis=0).tolist()
        their_spacing = np.median(np.array(theirs["spacings"], dtype=float), axis=0).tolist()
        if order == "x,y,z":  # shown in our order so the columns compare
            their_shape, their_spacing = their_shape[::-1], their_spacing[::-1]
    else:
        order, their_stats, their_shape, their_spacing = "-", {}, None, None
    rows += [
        ("median spacing (z,y,x) mm", ours["median_spacing"], their_spacing),
        ("median shape after crop (z,y,x)", ours["median_cropped_shape"], their_shape),
        ("median relative size after crop", ours["median_relative_size_after_cropping"],
         theirs and theirs["median_relative_size_after_cropping"]),
    ]
    for label, key in [("foreground mean", "mean"), ("foreground std", "std"),
                       ("foreground median", "median"), ("foreground percentile 0.5", "percentile_00_5"),
                       ("foreground percentile 99.5", "percentile_99_5"), ("foreground min", "min"),
                       ("foreground max", "max")]:
        rows.append((label, our_stats[key], their_stats.get(key)))

    print(f"\nFingerprint of hippocampus ({ours['n_cases']} cases), {n_jobs} worker processes, "
          f"{os.cpu_count()} CPUs")
    print(f"Axis order: autoplan z,y,x (array order); nnU-Net's JSON: {order}"
          + (" (shown here reordered to z,y,x)" if order == "x,y,z" else ""))
    print(f"| {'quantity':<34} | {'autoplan':>22} | {'nnU-Net v2':>22} | {'difference':>10} |")
    print(f"|{'-' * 36}|{'-' * 24}|{'-' * 24}|{'-' * 12}|")
    for index, (label, mine, other) in enumerate(rows):
        # the time row shows the speed-up instead of a difference
        change = (f"{other / mine:.2f}x" if other else "-") if index < 2 else difference(mine, other)
        print(f"| {label:<34} | {show(mine):>22} | {show(other):>22} | {change:>10} |")
    if their_seconds:
        print(f"speed: autoplan {our_seconds:.1f} s vs nnU-Net {their_seconds:.1f} s: "
              f"autoplan is {their_seconds / our_seconds:.2f}x faster (the time rows show nnU-Net / autoplan)")
    if problem:
        print(f"nnU-Net side not measured: {problem}")


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return " x ".join(f"{v:g}" for v in value)
    return f"{value:.6g}"


def difference(mine, other) -> str:
    """Relative difference in percent (largest over axes for lists)."""
    if mine is None or other is None:
        return "-"
    a, b = np.atleast_1d(np.asarray(mine, float)), np.atleast_1d(np.asarray(other, float))
    scale = np.maximum(np.abs(b), 1e-12)
    worst = float(np.max(np.abs(a - b) / scale)) * 100
    return f"{worst:.2f} %"


if __name__ == "__main__":
    main()
