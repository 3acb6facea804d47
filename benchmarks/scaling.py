"""Growth with volume size: time and peak memory of fingerprint, preprocessing and prediction on
CT-like volumes from 64^3 to 512 x 512 x 400, the fitted exponent of time against voxels, and
nnU-Net v2 on the same volumes side by side (issue 26, part 5).

    .venv/bin/python benchmarks/scaling.py [--sizes 64x64x64,128x192x192,200x320x320,400x512x512]
        [--volumes 2] [--predict-sizes ...] [--tta both|on|off] [--nnunet-venv /work/nnunet_env]
        [--work /work/scaling_bench] [--threads 2] [--stages fingerprint,preprocess,predict]
    .venv/bin/python benchmarks/scaling.py --table-only       # the last run's table again

Data: ``--volumes`` CT-like volumes per size (``synthetic_ct.ct_volume``: body, lungs, spine,
three labelled organs, noise; int16 HU, ``--spacing`` mm, default 1.0 x 0.8 x 0.8), written once
as an nnU-Net raw folder (``DatasetNNN_CT<size>``) that both sides read; generating them is not
timed. Both sides get the same plan, written by hand rather than planned: target spacing
``--plan-spacing`` (default 2.0 x 1.6 x 1.6, so the working grid has 1/8 of the voxels and
prediction resamples back 8x: the case where nnU-Net's export takes longest), CT normalisation
(clip to the foreground's 0.5-99.5 percentiles, z-score by its mean and std, from the first
64^3 volume), patch ``--patch`` (64x128x128), and the same U-Net: ``--features`` per stage
(8,16,32,64), 3x3x3 kernels, stride 2 on every axis after the first stage, 2 convolutions per
stage, instance norm, LeakyReLU (autoplan's UNet and nnU-Net's PlainConvUNet are the same
design; the table gives both parameter counts). The networks are left untrained (random
weights): time and memory do not depend on the weights.

Stages, each its own process (``common.measured_run``: wall seconds, the peak resident memory of
the largest process, and in brackets of all its processes together, workers included):
- fingerprint: ``fingerprint_dataset`` of the ``--volumes`` volumes / ``nnUNetv2_extract_fingerprint``;
- preprocess: ``preprocess_dataset`` of them / ``nnUNetv2_preprocess -c 3d_fullres``, and the cache
  on disk;
- predict (one volume, with and without mirroring TTA): reading, preprocessing, sliding window,
  back to the input grid, post-processing and writing the mask, as ``autoplan predict`` does,
  with the time of each part / ``nnUNetPredictor.predict_from_files`` (one worker for
  preprocessing and one for export).
- loader (autoplan only, in this process, on the cache the preprocess stage left): batches per
  second of the training loader (``--threads`` workers, default augmentation) against training
  steps per second of the shared U-Net on the same batch (``benchmarks/loader.py``'s measures).
``--threads`` torch threads and workers on both sides. The exponent is the slope of
log(seconds per volume) against log(voxels) over the sizes, of the in-process stage time
(interpreter and import start-up, about 2 s, left out so they do not flatten the slope).
"""

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.revert_methods import compare_reverts  # noqa: E402
from benchmarks.scaling_sides import (NNUNET_PREDICT, network_layout, nnunet_command, nnunet_env,  # noqa: E402
                                      nnunet_plans, nnunet_python, run_snippet)
from benchmarks.synthetic_ct import CT_LABELS, ct_volume, write_ct_dataset  # noqa: E402

DEFAULT_SIZES = "64x64x64,128x192x192,200x320x320,400x512x512"

# ============================================================================ the shared plan


def parse_shape(text: str) -> tuple:
    return tuple(int(v) for v in text.lower().split("x"))


def ct_statistics() -> dict:
    """Foreground intensity statistics (nnU-Net's names) of a 64^3 volume: both sides' CT window."""
    image, labels = ct_volume((64, 64, 64), seed=0)
    foreground = image[labels > 0].astype(np.float64)
    low, high = np.percentile(foreground, [0.5, 99.5])
    clipped = np.clip(foreground, low, high)
    return {"mean": float(clipped.mean()), "std": float(clipped.std()), "percentile_00_5": float(low),
            "percentile_99_5": float(high), "min": float(foreground.min()), "max": float(foreground.max()),
            "median": float(np.median(foreground))}


def autoplan_configuration(args, stats: dict) -> dict:
    return {"name": "3d_fullres", "dim": 3, "patch_size": list(args.patch), "batch_size": 2,
            "spacing": list(args.plan_spacing), "network": network_layout(args.features),
            "normalization": [{"scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                               "mean": stats["mean"], "std": stats["std"]}],
            "estimated_memory_gb": 0.0, "epochs": 1, "iterations_per_epoch": 1, "n_input_channels": 1,
            "n_outputs": len(CT_LABELS)}


# ============================================================================ autoplan's side

OURS = textwrap.dedent('''
    import json, sys, time
    import torch
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config["threads"])
    from autoplan.datasets import load_dataset
    from autoplan.planning import Configuration, Plan
    started = time.perf_counter()
    if config["stage"] == "fingerprint":
        from autoplan.fingerprint import fingerprint_dataset
        fingerprint_dataset(load_dataset(config["raw"]), config["results"], force=True, n_jobs=config["threads"])
    elif config["stage"] == "preprocess":
        from autoplan.preprocessing import preprocess_dataset
        configuration = Configuration(**config["configuration"])
        plan = Plan(dataset=config["name"], task_type="segmentation", device="cpu", gpu_memory_gb=None,
                    time_budget_minutes=None, configurations={"3d_fullres": configuration},
                    default_configuration="3d_fullres")
        preprocess_dataset(load_dataset(config["raw"]), plan, "3d_fullres", config["preprocessed"],
                           n_jobs=config["threads"])
    else:
        from autoplan.inference.inputs import read_case
        from autoplan.inference.predictor import Predictor
        from autoplan.io import write_image
        started, clock = time.perf_counter(), {}     # imports are start-up, not prediction
        image = read_case([config["file"]], 1)
        clock["read"] = time.perf_counter() - started
        predictor = Predictor.load(config["model"], "cpu", config["tta"])
        predictor.keep_probabilities, predictor.clock = False, clock
        before = time.perf_counter()
        labels, _ = predictor.segment(image, "case")
        clock["postprocess"] = time.perf_counter() - before - sum(clock[k] for k in ("preprocess", "network", "revert"))
        before = time.perf_counter()
        write_image(labels, config["output"], reference=image)
        clock["write"] = time.perf_counter() - before
        print("PARTS " + json.dumps(clock))
    print("SECONDS " + json.dumps(time.perf_counter() - started))
''')


def untrained_autoplan_run(work: Path, configuration: dict) -> tuple:
    """(fold folder of an untrained run of the shared plan, its parameter count)."""
    import torch

    from autoplan.planning import Configuration
    from autoplan.runs import RunSpec, TrainOptions, build_network

    spec = RunSpec(dataset="SyntheticCT", task_type="segmentation", fold=0,
                   configuration=Configuration(**configuration), options=TrainOptions(), labels=dict(CT_LABELS),
                   channel_names={"0": "CT"}, file_ending=".nii.gz", postprocessing={"1": True})
    fold = work / "autoplan_model" / "fold_0"
    spec.save(fold / "plan.json")
    network = build_network(spec)
    torch.save({"model": network.state_dict()}, fold / "checkpoint_best.pt")
    return fold, sum(p.numel() for p in network.parameters())


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


# ============================================================================ the run


def dataset_id(work: Path, shape: tuple) -> int:
    """nnU-Net's dataset id of a size: the same in every run that shares ``--work``."""
    registry = work / "dataset_ids.json"
    ids = json.loads(registry.read_text()) if registry.is_file() else {}
    key = "x".join(map(str, shape))
    if key not in ids:
        ids[key] = 501 + len(ids)
        registry.write_text(json.dumps(ids, indent=1))
    return ids[key]


def prepare_dataset(args, work: Path, shape: tuple) -> dict:
    """The raw folder of one size (made once, reused), both sides' names for it."""
    index = dataset_id(work, shape)
    name = f"Dataset{index:03d}_CT{'x'.join(map(str, shape))}"
    raw = work / "nnUNet_raw" / name
    n = max(args.volumes, 1)
    for folder, pattern in (("imagesTr", "ct_*_0000.nii.gz"), ("labelsTr", "ct_*.nii.gz")):
        for path in sorted((raw / folder).glob(pattern))[n:]:      # cases of an earlier, larger run
            path.unlink()
    started = time.perf_counter()
    write_ct_dataset(raw, n_cases=n, shape=shape, spacing=args.spacing, name=name)
    made = time.perf_counter() - started
    if made > 1:
        print(f"{name}: {n} volumes generated in {made:.0f} s", flush=True)
    return {"name": name, "id": index, "raw": raw, "shape": list(shape), "voxels": int(np.prod(shape)),
            "files": sorted((raw / "imagesTr").glob("*.nii.gz")), "labels": sorted((raw / "labelsTr").glob("*.nii.gz"))}


def measure_size(args, work: Path, dataset: dict, models: dict, configuration: dict, stats: dict) -> dict:
    """Every stage asked for on one size, by each side asked for: {stage: {side: measurement}}."""
    out = measure_ours(args, work, dataset, models, configuration) if "autoplan" in args.sides else {}
    for stage, sides in measure_nnunet(args, work, dataset, models, stats).items():
        out.setdefault(stage, {}).update(sides)
    return out


def measure_ours(args, work: Path, dataset: dict, models: dict, configuration: dict) -> dict:
    """autoplan's measurements of a size ({stage: {"autoplan": ...}}; "revert": {way: ...})."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "AUTOPLAN_PROGRESS": "0",
           "PYTHONPATH": str(ROOT)}
    base, out = {"threads": args.threads, "raw": str(dataset["raw"]), "name": dataset["name"]}, {}
    if "fingerprint" in args.stages:
        out["fingerprint"] = {"autoplan": run_snippet(sys.executable, OURS, {
            **base, "stage": "fingerprint", "results": str(work / "results")}, env)}
    if "preprocess" in args.stages:
        folder = work / "preprocessed" / dataset["name"]
        shutil.rmtree(folder, ignore_errors=True)
        ours = run_snippet(sys.executable, OURS, {**base, "stage": "preprocess", "configuration": configuration,
                                                  "preprocessed": str(work / "preprocessed")}, env)
        out["preprocess"] = {"autoplan": {**ours, "disk_mb": folder_mb(folder / "3d_fullres")}}
    predicted = list(dataset["shape"]) in [list(s) for s in args.predict_sizes]
    if "predict" in args.stages and predicted:
        for tta in args.tta_modes:
            stage = f"predict_{'tta' if tta else 'notta'}"
            out[stage] = {"autoplan": run_snippet(sys.executable, OURS, {
                **base, "stage": "predict", "file": str(dataset["files"][0]), "model": str(models["autoplan"]),
                "tta": tta, "output": str(work / "out" / f"{dataset['name']}_{stage}.nii.gz")}, env)}
    if "revert" in args.stages and predicted:
        out["revert"] = compare_reverts(args, work, dataset, configuration, env)
    if "loader" in args.stages:
        out["loader"] = {"autoplan": loader_against_training(args, work, dataset, configuration)}
    return out


def loader_against_training(args, work: Path, dataset: dict, configuration: dict) -> dict:
    """Batches per second of the training loader on autoplan's cache of this size (``--threads``
    workers, default augmentation) against training steps per second of the shared U-Net on the
    same batch (``benchmarks/loader.py``'s measurements), or why not."""
    from autoplan.planning import Configuration
    from benchmarks.loader import loader_rate, training_rate

    folder = work / "preprocessed" / dataset["name"] / "3d_fullres"
    case_ids = [Path(path).name[: -len("_0000.nii.gz")] for path in dataset["files"]]
    if not all((folder / f"{case_id}.json").is_file() for case_id in case_ids):
        return {"error": f"no complete cache in {folder}: run the preprocess stage first"}
    plan = Configuration(**configuration)
    loader, batch = loader_rate(folder, case_ids, plan, args.threads, 8)
    training = training_rate(plan, batch, 2, args.threads)
    return {"loader_batches_per_s": loader, "train_steps_per_s": training, "stage_seconds": None}


def measure_nnunet(args, work: Path, dataset: dict, models: dict, stats: dict) -> dict:
    """nnU-Net's measurements of a size ({stage: {"nnunet": ...}}), when its environment is given."""
    python, name, out = models.get("nnunet_python"), dataset["name"], {}
    if not python:
        return out
    their_env = nnunet_env(work, args.threads)
    if "fingerprint" in args.stages:
        out["fingerprint"] = {"nnunet": nnunet_command(python, "nnUNetv2_extract_fingerprint", [
            "-d", str(dataset["id"]), "-np", str(args.threads), "--clean"], their_env)}
    if "preprocess" in args.stages:
        out["preprocess"] = {"nnunet": nnunet_preprocess(args, work, dataset, python, stats, their_env)}
    if "predict" in args.stages and list(dataset["shape"]) in [list(s) for s in args.predict_sizes]:
        for tta in args.tta_modes:
            stage = f"predict_{'tta' if tta else 'notta'}"
            out[stage] = {"nnunet": run_snippet(python, NNUNET_PREDICT, {
                "threads": args.threads, "model": str(models["nnunet"]), "tta": tta, "labels": CT_LABELS,
                "file": str(dataset["files"][0]), "output": str(work / "nnunet_out" / f"{name}_{stage}")}, their_env)}
    return out


def nnunet_preprocess(args, work: Path, dataset: dict, python: str, stats: dict, env: dict) -> dict:
    """nnUNetv2_preprocess of one size with the shared plan, and its cache on disk."""
    folder = work / "nnUNet_preprocessed" / dataset["name"]
    shutil.rmtree(folder / "nnUNetPlans_3d_fullres", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(nnunet_plans(args, stats, dataset["name"], dataset["shape"]),
                                                        indent=1))
    shutil.copyfile(dataset["raw"] / "dataset.json", folder / "dataset.json")
    result = nnunet_command(python, "nnUNetv2_preprocess", [
        "-d", str(dataset["id"]), "-c", "3d_fullres", "-np", str(args.threads), "-plans_name", "nnUNetPlans"], env)
    result["disk_mb"] = folder_mb(folder / "nnUNetPlans_3d_fullres")
    return result


def prepare_models(args, work: Path, configuration: dict, stats: dict) -> dict:
    """autoplan's untrained run, nnU-Net's untrained model folder of the same plan (and both sizes)."""
    fold, params = untrained_autoplan_run(work, configuration)
    models = {"autoplan": fold, "autoplan_params": params}
    python, problem = nnunet_python(args.nnunet_venv)
    if python is None:
        print(f"nnU-Net side not run: {problem}", flush=True)
        return models
    folder = work / "nnunet_model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(nnunet_plans(args, stats, "Dataset500_CT", (64, 64, 64)), indent=1))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": CT_LABELS,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    built = run_snippet(python, NNUNET_PREDICT, {"threads": args.threads, "model": str(folder), "tta": False,
                                                 "labels": CT_LABELS, "file": "", "output": ""},
                        nnunet_env(work, args.threads))
    if "error" in built:
        print(f"nnU-Net side not run: building its network failed: {built['error']}", flush=True)
        return models
    return {**models, "nnunet_python": python, "nnunet": folder, "nnunet_params": built["params"]}


# ============================================================================ the tables

STAGES = ("fingerprint", "preprocess", "predict_notta", "predict_tta")


def exponent(points: list):
    """Slope of log(seconds) against log(voxels), or None with fewer than two sizes."""
    points = [(v, s) for v, s in points if s and s > 0]
    if len(points) < 2:
        return None
    voxels, seconds = zip(*points)
    return float(np.polyfit(np.log(voxels), np.log(seconds), 1)[0])


def per_volume(stage: str, result: dict, volumes: int):
    seconds = (result or {}).get("stage_seconds")
    if seconds is None:
        return None
    return seconds / volumes if stage in ("fingerprint", "preprocess") else seconds


def _cell(result: dict | None, key: str, digits: int = 1) -> str:
    if not result:
        return "not run"
    if "error" in result:
        return "failed"
    value = result.get(key)
    return "n/a" if value is None else f"{value:.{digits}f}"


def _memory(result: dict | None) -> str:
    """Peak RSS of the largest process, and of all its processes together where that was sampled."""
    largest, tree = _cell(result, "peak_mb", 0), (result or {}).get("tree_peak_mb")
    return largest if tree is None or "error" in result else f"{largest} ({tree:.0f})"


def _ratio(ours, theirs, key) -> str:
    a, b = (ours or {}).get(key), (theirs or {}).get(key)
    return f"{a / b:.2f}" if a and b else ""


def _notes(stage: str, ours: dict, theirs: dict) -> str:
    if stage == "preprocess" and ours.get("disk_mb") is not None:
        text = f"cache {ours['disk_mb']:.2f} MB"
        if theirs and theirs.get("disk_mb"):
            text += f" vs {theirs['disk_mb']:.2f} MB ({ours['disk_mb'] / theirs['disk_mb']:.2f}x)"
        return text
    parts = ours.get("parts")
    if stage.startswith("predict") and parts:
        share = (parts.get("revert", 0) + parts.get("write", 0)) / ours["stage_seconds"]
        shown = ", ".join(f"{k} {parts[k]:.1f}" for k in ("read", "preprocess", "network", "revert", "postprocess",
                                                             "write") if k in parts)
        return f"{shown} s; back to input grid + writing {100 * share:.1f} %"
    return ""


def print_tables(measurements: dict) -> None:
    """Long because it prints four tables (stages, exponents, the four ways back, done-when)."""
    meta, sizes = measurements["meta"], measurements["sizes"]
    order = sorted(sizes, key=lambda n: sizes[n]["voxels"])
    print(f"\n{meta['description']}\n")
    rows = []
    for name in order:
        size = sizes[name]
        for stage in STAGES:
            if stage not in size["stages"]:
                continue
            ours, theirs = size["stages"][stage].get("autoplan", {}), size["stages"][stage].get("nnunet")
            rows.append(["x".join(map(str, size["shape"])), stage.replace("_", " "), size.get("volumes", 1)
                         if stage in ("fingerprint", "preprocess") else 1,
                         _cell(ours, "seconds"), _cell(ours, "stage_seconds", 2), _memory(ours),
                         _cell(theirs, "seconds"), _memory(theirs), _ratio(ours, theirs, "seconds"),
                         _ratio(ours, theirs, "peak_mb"), _ratio(ours, theirs, "tree_peak_mb"),
                         _notes(stage, ours, theirs)])
    print(markdown_table(["size (z x y x x)", "stage", "volumes", "autoplan s", "of it the stage s",
                          "autoplan peak MB (all processes)", "nnU-Net s", "nnU-Net peak MB (all processes)",
                          "time ratio", "memory ratio", "all-process memory ratio", "notes"], rows))
    print("\nfitted exponent of time per volume against voxels (autoplan: in-process stage time; "
          "nnU-Net: whole command for fingerprint/preprocess, in-process for predict)\n")
    rows = []
    for stage in STAGES:
        cells = [stage.replace("_", " ")]
        for side in ("autoplan", "nnunet"):
            points = [(sizes[n]["voxels"], per_volume(stage, sizes[n]["stages"].get(stage, {}).get(side),
                                                      sizes[n].get("volumes", 1))) for n in order]
            value = exponent(points)
            cells.append("n/a" if value is None else f"{value:.2f} ({sum(1 for _, s in points if s)} sizes)")
        rows.append(cells)
    print(markdown_table(["stage", "autoplan", "nnU-Net v2"], rows))
    reverts = [(n, sizes[n]["stages"]["revert"]) for n in order
               if any(method != "error" for method in sizes[n]["stages"].get("revert", {}))]
    if reverts:
        print("\nback to the input grid, four ways (from the same working-grid probabilities: the true labels "
              "as signed distances, softmax; peak MB of the whole process, which loads them)\n")
        rows = []
        for name, results in reverts:
            for method, result in results.items():
                if method == "error":
                    continue
                rows.append(["x".join(map(str, sizes[name]["shape"])), method, _cell(result, "stage_seconds", 2),
                             _cell(result, "peak_mb", 0), _cell(result, "dice_vs_full", 5),
                             _cell(result, "dice_vs_truth", 4), result.get("voxels_differing", "")])
        print(markdown_table(["size", "method", "seconds", "peak MB", "Dice vs whole-array path",
                              "Dice vs truth", "voxels differing"], rows))
    print("\nissue 26's done-when, at the largest size measured\n")
    print(markdown_table(["check", "measured", "target", "met"], done_when_rows(sizes, order)))


def done_when_rows(sizes: dict, order: list) -> list:
    """[check, measured, target, met] for the figures issue 26 asks of this benchmark."""
    rows = []

    def check(name, value, target, met):
        rows.append([name, value, target, "yes" if met else "no"])

    def largest_with(stage, side="autoplan"):
        found = [n for n in order if "error" not in sizes[n]["stages"].get(stage, {}).get(side, {"error": 1})]
        return (found[-1], sizes[found[-1]]["stages"][stage]) if found else (None, None)

    name, predict = largest_with("predict_tta")
    if name:
        ours = predict["autoplan"]
        share = sum(ours["parts"].get(k, 0) for k in ("revert", "write")) / ours["stage_seconds"]
        check(f"prediction with TTA, {name}: peak RSS", f"{ours['peak_mb']:.0f} MiB", "<= 3 GB", ours["peak_mb"] <= 3000)
        check(f"prediction with TTA, {name}: back to input grid + writing", f"{100 * share:.1f} %", "<= 15 %",
              share <= 0.15)
    name, preprocess = largest_with("preprocess", "nnunet")
    if name and "error" not in preprocess.get("autoplan", {"error": 1}):
        ours, theirs = preprocess["autoplan"], preprocess["nnunet"]
        volumes = sizes[name].get("volumes", 1)
        for key, label in (("seconds", "time"), ("peak_mb", "peak RSS"), ("tree_peak_mb", "peak RSS, all processes")):
            if ours.get(key) and theirs.get(key):
                ratio = ours[key] / theirs[key]
                check(f"preprocessing {volumes} x {name}: {label} vs nnU-Net", f"{ratio:.2f}x", "<= 0.5x", ratio <= 0.5)
        if ours.get("disk_mb") and theirs.get("disk_mb"):
            ratio = ours["disk_mb"] / theirs["disk_mb"]
            check(f"cache of {volumes} x {name} vs nnU-Net's", f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
    name, loader = largest_with("loader")
    if name:
        ours = loader["autoplan"]
        ratio = ours["loader_batches_per_s"] / ours["train_steps_per_s"]
        check(f"loader on the cache of {name} vs training", f"{ours['loader_batches_per_s']:.2f} batches/s against "
              f"{ours['train_steps_per_s']:.3f} steps/s ({ratio:.0f}x)", "> 1x", ratio > 1)
    for stage in STAGES:
        points = [(sizes[n]["voxels"], per_volume(stage, sizes[n]["stages"].get(stage, {}).get("autoplan"),
                                                  sizes[n].get("volumes", 1))) for n in order]
        value = exponent(points)
        if value is not None:
            check(f"{stage.replace('_', ' ')}: exponent of time against voxels", f"{value:.2f}", "<= 1.1",
                  value <= 1.1)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="z x y x x sizes, comma-separated")
    parser.add_argument("--predict-sizes", default=None, help="sizes to predict (default: all of --sizes)")
    parser.add_argument("--volumes", type=int, default=2, help="volumes per size for fingerprint and preprocessing")
    parser.add_argument("--tta", choices=("both", "on", "off"), default="both")
    parser.add_argument("--stages", default="fingerprint,preprocess,predict,revert",
                        help="of fingerprint,preprocess,predict,revert,loader (loader: on the cache preprocess left)")
    parser.add_argument("--spacing", default="1.0x0.8x0.8")
    parser.add_argument("--plan-spacing", default="2.0x1.6x1.6")
    parser.add_argument("--patch", default="64x128x128")
    parser.add_argument("--features", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", default="autoplan,nnunet", help="autoplan,nnunet or one of them (nnunet "
                                                                    "needs --nnunet-venv)")
    parser.add_argument("--nnunet-venv", default=None, help="a virtual environment with nnunetv2 (e.g. /work/nnunet_env)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("AUTOPLAN_BENCH_DIR", "/tmp")) / "scaling_bench")
    parser.add_argument("--table-only", action="store_true", help="print the tables of the measurements kept in --work")
    args = parser.parse_args(argv)
    store = args.work / "measurements.json"
    if args.table_only:
        print_tables(json.loads(store.read_text()))
        return 0
    args.sizes = [parse_shape(s) for s in args.sizes.split(",")]
    args.predict_sizes = [parse_shape(s) for s in args.predict_sizes.split(",")] if args.predict_sizes else args.sizes
    args.tta_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.tta]
    args.stages, args.sides = set(args.stages.split(",")), set(args.sides.split(","))
    if "nnunet" not in args.sides:
        args.nnunet_venv = None
    args.spacing, args.plan_spacing, args.patch = (tuple(float(v) for v in args.spacing.split("x")),
                                                   tuple(float(v) for v in args.plan_spacing.split("x")),
                                                   parse_shape(args.patch))
    args.features = [int(f) for f in args.features.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stats = ct_statistics()
    configuration = autoplan_configuration(args, stats)
    models = prepare_models(args, args.work, configuration, stats)
    measurements = json.loads(store.read_text()) if store.is_file() else {"sizes": {}}
    for shape in args.sizes:
        dataset = prepare_dataset(args, args.work, shape)
        stages = measure_size(args, args.work, dataset, models, configuration, stats)
        entry = measurements["sizes"].setdefault(dataset["name"], {"shape": list(shape), "voxels": dataset["voxels"],
                                                                   "stages": {}})
        for stage, sides in stages.items():     # a side not run keeps its earlier measurement
            entry["stages"].setdefault(stage, {}).update(sides)
        if {"fingerprint", "preprocess"} & set(stages):
            entry["volumes"] = max(args.volumes, 1)
        measurements["meta"] = {"description": describe(args, models)}
        store.write_text(json.dumps(measurements, indent=1, default=str))
        print(f"{dataset['name']} measured ({time.perf_counter() - started:.0f} s so far)", flush=True)
    print_tables(measurements)
    print(f"\n({time.perf_counter() - started:.0f} s; measurements kept in {store})")
    return 0


def describe(args, models: dict) -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    import torch

    theirs = f", nnU-Net's PlainConvUNet {models['nnunet_params']:,} parameters" if models.get("nnunet_params") else ""
    return (f"CT-like volumes at {'x'.join(map(str, args.spacing))} mm, one plan for both sides: spacing "
            f"{'x'.join(map(str, args.plan_spacing))} mm, patch {'x'.join(map(str, args.patch))}, U-Net features "
            f"{'-'.join(map(str, args.features))} (autoplan {models['autoplan_params']:,} parameters{theirs}), "
            f"untrained; {args.threads} threads, torch {torch.__version__}, {os.cpu_count()} cores, "
            f"load average at the last size {load}")


if __name__ == "__main__":
    sys.exit(main())
