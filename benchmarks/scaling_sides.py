"""Both sides of ``scaling.py``: the shared U-Net layout, running a measuring snippet in either
environment, and nnU-Net v2's side (plans.json of the shared plan, its predictor on one volume,
its command-line tools, in their own environment given by ``--nnunet-venv``)."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

from benchmarks.common import measured_run


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
    layout = network_layout(args.features)
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    working = [int(round(n * s / t)) for n, s, t in zip(shape, args.spacing, args.plan_spacing)]
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(args.patch), "median_image_size_in_voxels": working,
        "spacing": list(args.plan_spacing), "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling, "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": dict(resampling, is_seg=True, order=1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": dict(resampling, order=1),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": layout["n_stages"], "features_per_stage": layout["features_per_stage"],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": layout["kernel_sizes"],
                "strides": layout["strides"], "n_conv_per_stage": [2] * layout["n_stages"],
                "n_conv_per_stage_decoder": [2] * (layout["n_stages"] - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(args.spacing),
            "original_median_shape_after_transp": list(shape), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": configuration}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": stats}}


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
    return {"seconds": result["seconds"], "stage_seconds": result["seconds"], "peak_mb": result["peak_mb"]}


