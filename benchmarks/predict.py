"""Prediction speed: cases per second on hippocampus volumes and JSRT images, with and without TTA.

    .venv/bin/python benchmarks/predict.py [--model RUN_DIR ...] [--cases 10] [--threads 2]
                                           [--nnunet-python PATH [--nnunet-model DIR]]

Our side runs ``autoplan.inference.predict_folder`` on the first ``--cases`` files of
``../shared/datasets/hippocampus/imagesTr`` and ``../shared/datasets/jsrt_lungs/images``
(reading, preprocessing, sliding window, resampling back and writing the masks all
count). A ``--model`` run folder is used for the data of its dimension (3D:
hippocampus, 2D: JSRT). Without one, the network is the planned architecture for that
data (``planning.unet_topology`` / ``unet_network``: for hippocampus patch 40x56x40,
features 32-64-128-256, as nnU-Net's own plan), left untrained: prediction speed does
not depend on the weights.

The nnU-Net side runs nnU-Net v2's ``nnUNetPredictor.predict_from_files`` on the same
hippocampus volumes in the Python given by ``--nnunet-python`` (an environment with
nnunetv2), either with a trained model folder (``--nnunet-model``) or with an untrained
PlainConvUNet of the same plan built there. Both sides use ``--threads`` torch threads
and as many worker processes. Prints one table.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import nnunet_plans_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
HIPPOCAMPUS_LABELS = {"background": 0, "anterior": 1, "posterior": 2}
JSRT_LABELS = {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3}


def planned_run(work: Path, dim: int) -> Path:
    """An untrained run folder with the planned architecture for hippocampus (3D) or JSRT (2D)."""
    import torch

    from autoplan.planning import Configuration, unet_network, unet_topology
    from autoplan.runs import RunSpec, TrainOptions, build_network

    patch, labels, name = ([40, 56, 40], HIPPOCAMPUS_LABELS, "TaskHippocampus") if dim == 3 else \
        ([224, 224], JSRT_LABELS, "TaskXRay")
    spacing = [1.0] * dim
    configuration = Configuration(
        name="3d_fullres" if dim == 3 else "2d", dim=dim, patch_size=patch, batch_size=2, spacing=spacing,
        network=unet_network(unet_topology(spacing, patch), 32, dim),
        normalization=[{"scheme": "zscore"}], estimated_memory_gb=0.0, epochs=1, iterations_per_epoch=1,
        n_input_channels=1, n_outputs=len(labels))
    spec = RunSpec(dataset=name, task_type="segmentation", fold=0, configuration=configuration,
                   options=TrainOptions(), labels=labels, channel_names={"0": "image"},
                   file_ending=".nii.gz" if dim == 3 else ".png")
    fold = work / f"planned_{dim}d" / "fold_0"
    spec.save(fold / "plan.json")
    torch.save({"model": build_network(spec).state_dict()}, fold / "checkpoint_best.pt")
    return fold


def linked_inputs(work: Path, name: str, files: list) -> Path:
    folder = work / f"in_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        (folder / path.name).symlink_to(path)
    return folder


def time_ours(model: Path, inputs: Path, work: Path, tta: bool, threads: int) -> dict:
    from autoplan.inference import predict_folder

    out = work / f"out_{inputs.name}_{'tta' if tta else 'notta'}"
    shutil.rmtree(out, ignore_errors=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = predict_folder(model, inputs, out, tta=tta, n_jobs=threads)
    seconds = time.perf_counter() - started
    return {"cases": summary["n_predicted"], "seconds": seconds, "cpu_seconds": time.process_time() - cpu_started}


NNUNET_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config["threads"])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    model = config["model"]
    if model is None:  # an untrained network of the same plan (speed does not depend on weights)
        from batchgenerators.utilities.file_and_folder_operations import save_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        model = os.path.join(config["work"], "nnunet_model")
        os.makedirs(os.path.join(model, "fold_0"), exist_ok=True)
        save_json(config["plans"], os.path.join(model, "plans.json"), sort_keys=False)
        save_json(config["dataset_json"], os.path.join(model, "dataset.json"), sort_keys=False)
        plans = PlansManager(config["plans"])
        cm = plans.get_configuration("3d_fullres")
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        network = nnUNetTrainer.build_network_architecture(
            cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
            1, plans.get_label_manager(config["dataset_json"]).num_segmentation_heads, enable_deep_supervision=False)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"},
                    "inference_allowed_mirroring_axes": (0, 1, 2)},
                   os.path.join(model, "fold_0", "checkpoint_final.pth"))
    results = {}
    for tta in (True, False):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, use_folds=(0,),
                                                       checkpoint_name=config["checkpoint"])
        out = os.path.join(config["work"], f"nnunet_out_{tta}")
        outputs = [os.path.join(out, os.path.basename(f).replace(".nii.gz", "")) for f in config["files"]]
        started = time.perf_counter()
        predictor.predict_from_files([[f] for f in config["files"]], outputs, save_probabilities=False,
                                     overwrite=True, num_processes_preprocessing=config["threads"],
                                     num_processes_segmentation_export=config["threads"])
        results[str(tta)] = time.perf_counter() - started
    print("RESULT " + json.dumps(results))
''')


def nnunet_plans(network: dict) -> tuple[dict, dict]:
    """nnU-Net v2 plans.json / dataset.json of the hippocampus 3d_fullres plan (its own numbers)."""
    stats = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0,
             "std": 1.0}
    plans = nnunet_plans_json("Dataset004_Hippocampus", 9, [40, 56, 40], [36, 50, 35], [1.0, 1.0, 1.0],
                              "ZScoreNormalization", network, [1.0, 1.0, 1.0], [36, 50, 35], stats)
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                    "numTraining": 260, "file_ending": ".nii.gz"}
    return plans, dataset_json


def time_nnunet(args, files: list, work: Path, network: dict):
    """{tta: seconds} from nnU-Net's predictor, or a string saying why it was not run."""
    if not args.nnunet_python:
        return "no --nnunet-python given (an environment with nnunetv2)"
    python = Path(args.nnunet_python)
    if not python.exists():
        return f"{python} does not exist"
    check = subprocess.run([str(python), "-c", "import nnunetv2"], capture_output=True, text=True)
    if check.returncode != 0:
        return f"nnunetv2 does not import in {python}: {check.stderr.strip().splitlines()[-1:]}"
    plans, dataset_json = nnunet_plans(network)
    config = {"threads": args.threads, "model": args.nnunet_model, "checkpoint": args.nnunet_checkpoint,
              "work": str(work), "files": [str(f) for f in files], "plans": plans, "dataset_json": dataset_json}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), nnUNet_def_n_proc=str(args.threads),
               nnUNet_raw=str(work), nnUNet_preprocessed=str(work), nnUNet_results=str(work))
    result = subprocess.run([str(python), "-c", NNUNET_SCRIPT, json.dumps(config)], capture_output=True,
                            text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        return f"nnU-Net predictor failed: {result.stderr.strip()[-500:]}"
    return {tta == "True": seconds for tta, seconds in json.loads(lines[-1][len("RESULT "):]).items()}


def table(rows: list) -> str:
    header = ["side", "data", "model", "TTA", "cases", "seconds", "s/case", "cases/s", "CPU s/case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cases, seconds = row["cases"], row["seconds"]
        cpu = f"{row['cpu_seconds'] / max(cases, 1):.3f}" if row.get("cpu_seconds") is not None else "n/a"
        lines.append(f"| {row['side']} | {row['data']} | {row['model']} | {'yes' if row['tta'] else 'no'} | "
                     f"{cases} | {seconds:.2f} | {seconds / max(cases, 1):.3f} | {cases / seconds:.3f} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path, default=[],
                        help="run folder (fold_K or parent); 3D runs are timed on hippocampus, 2D on JSRT")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--nnunet-python", default=None, help="python of an environment with nnunetv2")
    parser.add_argument("--nnunet-model", default=None, help="trained nnU-Net model folder (plans.json, fold_0)")
    parser.add_argument("--nnunet-checkpoint", default="checkpoint_final.pth")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from autoplan.paths import fold_folders
    from autoplan.runs import RunSpec

    torch.set_num_threads(args.threads)
    sources = {3: ("hippocampus", sorted((args.datasets / "hippocampus" / "imagesTr").glob("*.nii.gz"))),
               2: ("jsrt", sorted((args.datasets / "jsrt_lungs" / "images").glob("*.png")))}
    if not any(files for _, files in sources.values()):
        print(f"datasets not found under {args.datasets}; nothing to time")
        return 1
    given = {}
    for model in args.model:
        given[RunSpec.load(fold_folders(model)[0] / "plan.json").configuration.dim] = model
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoplan_predict_bench_") as tmp:
        work = Path(tmp)
        for dim, (name, files) in sources.items():
            if not files:
                print(f"{name}: no files under {args.datasets}, skipped")
                continue
            files = files[: args.cases]
            model = given.get(dim) or planned_run(work, dim)
            label = str(given[dim]) if dim in given else "planned, untrained"
            inputs = linked_inputs(work, name, files)
            warmup = linked_inputs(work, f"{name}_warmup", files[:1])
            time_ours(model, warmup, work, False, args.threads)  # first-call costs out of the numbers
            for tta in (True, False):
                rows.append({"side": "autoplan", "data": name, "model": label, "tta": tta,
                             **time_ours(model, inputs, work, tta, args.threads)})
        hippocampus = sources[3][1][: args.cases]
        if hippocampus:
            spec = RunSpec.load(fold_folders(given.get(3) or work / "planned_3d" / "fold_0")[0] / "plan.json")
            outcome = time_nnunet(args, hippocampus, work, spec.configuration.network)
            if isinstance(outcome, str):
                print(f"nnU-Net side not run: {outcome}")
            else:
                label = args.nnunet_model or "same plan, untrained"
                for tta in (True, False):
                    rows.append({"side": "nnU-Net v2", "data": "hippocampus", "model": label, "tta": tta,
                                 "cases": len(hippocampus), "seconds": outcome[tta]})
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nprediction speed, {args.threads} torch threads, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load average {load} (other work slows the wall-clock numbers; CPU s/case counts this process's "
          f"threads), first {args.cases} cases of each dataset (reading, preprocessing, prediction, writing)\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
