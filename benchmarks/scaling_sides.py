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
            "parts": lines.get("PARTS"), "params": lines.get("PARAMS")}


def nnunet_plans(args, stats: dict, dataset_name: str, shape: tuple) -> dict:
    """nnU-Net v2 plans.json with the same spacing, patch, normalisation and network as autoplan's."""
    working = [int(round(n * s / t)) for n, s, t in zip(shape, args.spacing, args.plan_spacing)]
    return nnunet_plans_json(dataset_name, 2, args.patch, working, args.plan_spacing, "CTNormalization",
                             network_layout(args.features), args.spacing, shape, stats)


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
    return {"seconds": result["seconds"], "stage_seconds": result["seconds"], "peak_mb": result["peak_mb"]}


