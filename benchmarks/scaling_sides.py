"""Both sides of ``scaling.py``: the shared U-Net layout, running a measuring snippet in either
environment, and nnU-Net v2's side (plans.json of the shared plan, its predictor on one volume,
its command-line tools, in their own environment given by ``--nnunet-venv``)."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

from benchmarks.common import measured_run, nnunet_plans_json


def network_layout(features: list) -> dict:
    n = len(features)
    return {"n_stages": n, "features_per_stage": list(features), "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "kernel_sizes": [[3, 3, 3]] * n, "conv_per_stage": 2}


def run_snippet(python, snippet: str, config: dict, env: dict) -> dict:
    result = measured_run([python, "-c", snippet, json.dumps(config)], env=env)
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in result["output"].splitlines()
             if line.split(" ", 1)[0] in ("SECONDS", "PARTS", "PARAMS")}
    if result["returncode"] != 0 or "SECONDS" not in lines:
        return {"error": result["output"][-1500:]}
    return {"seconds": result["seconds"], "stage_seconds": lines["SECONDS"], "peak_mb": result["peak_mb"],
            "tree_peak_mb": result["tree_peak_mb"], "parts": lines.get("PARTS"), "params": lines.get("PARAMS")}


def nnunet_plans(args, stats: dict, dataset_name: str, shape: tuple) -> dict:
    """nnU-Net v2 plans.json with the same spacing, patch, normalisation and network as autoplan's."""
    working = [int(round(n * s / t)) for n, s, t in zip(shape, args.spacing, args.plan_spacing)]
    return nnunet_plans_json(dataset_name, 2, args.patch, working, args.plan_spacing, "CTNormalization",
                             network_layout(args.features), args.spacing, shape, stats)


NNUNET_PREDICT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    config = json.loads(sys.argv[1])
    torch.set_num_threads(config["threads"])
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    model = config["model"]
    checkpoint = os.path.join(model, "fold_0", "checkpoint_final.pth")
    if not os.path.exists(checkpoint):   # an untrained PlainConvUNet of the shared plan
        plans = PlansManager(os.path.join(model, "plans.json"))
        cm = plans.get_configuration("3d_fullres")
        network = nnUNetTrainer.build_network_architecture(plans, cm, 1, len(config["labels"]),
                                                           enable_deep_supervision=False)
        os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   checkpoint)
        print("PARAMS " + json.dumps(sum(p.numel() for p in network.parameters())))
        print("SECONDS 0")
        sys.exit(0)
    started = time.perf_counter()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=config["tta"],
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files([[config["file"]]], [config["output"]], save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print("SECONDS " + json.dumps(time.perf_counter() - started))
''')


def nnunet_python(venv) -> tuple:
    """(python of an environment with nnunetv2, None) or (None, why not)."""
    if venv is None:
        return None, "no --nnunet-venv given"
    python = Path(venv) / "bin" / "python"
    check = subprocess.run([str(python), "-c", "import nnunetv2"], capture_output=True, text=True) \
        if python.exists() else None
    if check is None or check.returncode != 0:
        return None, f"nnunetv2 does not import in {python} (install: see ../shared/design/environment.md)"
    return str(python), None


def nnunet_env(work: Path, threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "nnUNet_raw": str(work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_results": str(work / "nnUNet_results"),
            "nnUNet_def_n_proc": str(threads), "nnUNet_n_proc_DA": str(threads)}


def nnunet_command(python: str, tool: str, args: list, env: dict) -> dict:
    """A command-line tool of the nnU-Net environment, measured whole (its stage time is its wall time)."""
    result = measured_run([str(Path(python).parent / tool), *args], env=env)
    if result["returncode"] != 0:
        return {"error": result["output"][-1500:]}
    return {"seconds": result["seconds"], "stage_seconds": result["seconds"], "peak_mb": result["peak_mb"],
            "tree_peak_mb": result["tree_peak_mb"]}


