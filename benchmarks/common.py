"""Shared helpers for the benchmark scripts: where the real data is, importing it once, tables."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
WORK = Path(os.environ.get("AUTOPLAN_BENCH_DIR", ROOT / "benchmarks" / "work"))

IMPORTS = {
    "TaskXRay": ["--images", SHARED / "jsrt_lungs/images", "--masks", SHARED / "jsrt_lungs/masks",
                 "--label-map", "150=right_lung,200=left_lung,250=heart"],
    "TaskDerm": ["--images", SHARED / "ham10000/images", "--labels", SHARED / "ham10000/HAM10000_metadata.csv",
                 "--id-column", "image_id", "--label-column", "dx", "--group-column", "lesion_id"],
    "TaskHippocampus": ["--images", SHARED / "hippocampus/imagesTr", "--masks", SHARED / "hippocampus/labelsTr",
                        "--label-map", "1=anterior,2=posterior"],
}


def folders_args(work=WORK):
    return ["--raw", str(work / "raw"), "--preprocessed", str(work / "preprocessed"),
            "--results", str(work / "results")]


def autoplan(*args, check=True) -> float:
    """Run the CLI in a subprocess (as a user would); returns wall seconds."""
    started = time.monotonic()
    command = [sys.executable, "-m", "autoplan", *map(str, args)]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=check)
    return time.monotonic() - started


def ensure_imported(name, work=WORK):
    if not SHARED.is_dir():
        sys.exit(f"real datasets not found at {SHARED}: see ../shared/datasets/README.md")
    if not (work / "raw" / name / "dataset.json").is_file():
        autoplan("import", name, *IMPORTS[name], "--raw", work / "raw")


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def measured_run(command, env=None, cwd=None) -> dict:
    """Run a command; wall seconds, peak resident memory (MB) of its largest process
    (``peak_mb``), the peak of its whole process tree's sum (``tree_peak_mb``: parallel workers
    together), output.

    The tree is sampled every 50 ms (psutil): each process's own high-water mark (``VmHWM``,
    so short peaks between samples count) and the sum of the current RSS. ``os.wait4``'s
    ``ru_maxrss`` is not used where sampling works: Linux carries the parent's high-water mark
    into a child started by vfork/exec, so a benchmark that grew to 3 GB making its data
    reported 3 GB for every command it ran after; and it misses workers nobody reaps (loky).
    """
    started = time.monotonic()
    process = subprocess.Popen([str(c) for c in command], env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peaks, done = {"largest": 0, "tree": 0, "sampled": False}, threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(process.pid, peaks, done), daemon=True)
    sampler.start()
    output = process.stdout.read()
    done.set()          # before the wait: a reaped pid cannot be sampled any more
    sampler.join()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    fallback = usage.ru_maxrss / 1024
    return {"seconds": time.monotonic() - started,
            "peak_mb": peaks["largest"] / 2 ** 20 if peaks["sampled"] else fallback,
            "tree_peak_mb": max(peaks["tree"], peaks["largest"]) / 2 ** 20 if peaks["sampled"] else fallback,
            "returncode": process.returncode, "output": output}


def _sample_tree(pid: int, peaks: dict, done) -> None:
    """Largest high-water mark and largest sum of RSS over ``pid`` and its descendants, until ``done``."""
    try:
        import psutil
        root = psutil.Process(pid)
    except (ImportError, Exception):     # no psutil, or the process is gone: wait4's figure then
        return
    while True:
        current = 0
        for member in [root, *_children(root)]:
            try:
                current += member.memory_info().rss
                peaks["largest"] = max(peaks["largest"], _high_water_bytes(member.pid))
                peaks["sampled"] = True
            except psutil.Error:
                pass
        peaks["tree"] = max(peaks["tree"], current)
        if done.wait(0.05):
            return


def _high_water_bytes(pid: int) -> int:
    """The process's peak resident set so far (``VmHWM`` of /proc/PID/status), 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(process) -> list:
    try:
        return process.children(recursive=True)
    except Exception:       # the process ended between two samples
        return []


def nnunet_plans_json(dataset_name: str, batch_size: int, patch_size, median_shape, spacing, normalization: str,
                      layout: dict, original_spacing, original_shape, intensity_stats: dict) -> dict:
    """nnU-Net v2 plans.json with one 3d_fullres configuration: a PlainConvUNet of ``layout``
    (n_stages, features_per_stage, kernel_sizes, strides), nnU-Net's default resampling; what
    the benchmarks give nnU-Net so both sides run the same plan."""
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    n_stages = layout["n_stages"]
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": list(patch_size), "median_image_size_in_voxels": list(median_shape),
        "spacing": list(spacing), "normalization_schemes": [normalization], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(resampling, order=1),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages, "features_per_stage": layout["features_per_stage"],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": layout["kernel_sizes"],
                "strides": layout["strides"], "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(original_spacing),
            "original_median_shape_after_transp": list(original_shape), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": intensity_stats}}
