"""autoplan against nnU-Net v2 on hippocampus: same machine, cores, files, split and time budget.

    python benchmarks/versus_nnunet.py [--budget 20] [--cases 5] [--threads 2] [--nnunet-python PATH]

Both sides start from the same nnU-Net raw folder (``Dataset004_Hippocampus``, symlinks to
../shared/datasets/hippocampus), in a fresh scratch folder under AUTOPLAN_BENCH_DIR/versus:

1. fingerprint + plan + preprocess: ``nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres`` vs
   autoplan's fingerprint, plan (for the CPU and the budget) and preprocessing in one process;
2. the plans side by side (nnU-Net's is for its 8 GB GPU; autoplan's CPU plan and its plan for
   an 8 GB GPU are both shown);
3. training fold 0 within ``--budget`` minutes (final validation included) on autoplan's split,
   which nnU-Net reads as its ``splits_final.json``: autoplan ``train --time-budget`` vs
   ``nnunet_budget_trainer.py`` (nnU-Net's trainer with its schedule fitted to the budget);
4. prediction of ``--cases`` raw volumes with mirroring TTA by each side's trained model
   (whole commands: start-up and model loading count).

Every step is a separate command, timed, with the peak resident memory of its largest
process. nnU-Net runs in its own environment (see fingerprint.py, which creates it).
Prints one table; ratios are autoplan / nnU-Net.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, WORK, fmt, markdown_table, measured_run  # noqa: E402
from fingerprint import DATASET_NAME, build_raw_dataset, ensure_nnunet_python  # noqa: E402

NNUNET_VALIDATION_SECONDS_PER_CASE = 4.0

PREPARE = """
import sys
from autoplan import pipeline
from autoplan.paths import resolve_folders
from autoplan.preprocessing import preprocess_dataset
from autoplan.splits import load_or_create_splits
raw, pre, results, budget, n_jobs = sys.argv[1:]
folders = resolve_folders(raw, pre, results)
dataset = pipeline.open_dataset("Dataset004_Hippocampus", folders)
plan = pipeline.plan(dataset, folders, device="cpu", time_budget_minutes=float(budget), n_jobs=int(n_jobs))
preprocess_dataset(dataset, plan, "3d_fullres", folders.preprocessed, n_jobs=int(n_jobs))
load_or_create_splits(dataset, folders.results)
"""


def checked(result: dict, what: str) -> dict:
    if result["returncode"] != 0:
        sys.exit(f"{what} failed (exit {result['returncode']}):\n{result['output'][-3000:]}")
    return result


def poolings(strides) -> str:
    """Number of stride-2 poolings per axis, e.g. '3x3x3'."""
    counts = [sum(1 for s in strides if s[axis] > 1) for axis in range(len(strides[0]))]
    return "x".join(map(str, counts))


def describe_ours(configuration: dict) -> dict:
    network = configuration["network"]
    return {"patch": "x".join(map(str, configuration["patch_size"])), "batch": configuration["batch_size"],
            "pooling": poolings(network["strides"]),
            "features": f"{network['features_per_stage'][0]}-{network['features_per_stage'][-1]}"}


def describe_nnunet(configuration: dict) -> dict:
    arch = configuration["architecture"]["arch_kwargs"]
    return {"patch": "x".join(map(str, configuration["patch_size"])), "batch": configuration["batch_size"],
            "pooling": poolings(arch["strides"]),
            "features": f"{arch['features_per_stage'][0]}-{arch['features_per_stage'][-1]}"}


def our_gpu_plan(folders) -> dict:
    """autoplan's plan of the same fingerprint for nnU-Net's 8 GB GPU (no measurement, no writing)."""
    from autoplan import pipeline
    from autoplan.jsonio import to_jsonable
    from autoplan.planning import plan_dataset

    dataset = pipeline.open_dataset(DATASET_NAME, folders)
    fingerprint = pipeline.fingerprint(dataset, folders)
    plan = plan_dataset(dataset, fingerprint, device="cuda", gpu_memory_gb=8.0, probe=False)
    return to_jsonable(plan.configurations["3d_fullres"])


def ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}" if ours and theirs else "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0, help="training minutes for each side")
    parser.add_argument("--cases", type=int, default=5, help="volumes predicted in the prediction step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nnunet-python", type=Path, default=None)
    parser.add_argument("--table-only", action="store_true",
                        help="print the table of the last run again (from its measurements.json)")
    args = parser.parse_args()
    if args.table_only:
        print_table(WORK / "versus", json.loads((WORK / "versus" / "measurements.json").read_text()))
        return 0
    if not (SHARED / "hippocampus").is_dir():
        sys.exit(f"{SHARED / 'hippocampus'} not found: see ../shared/datasets/README.md")
    nnunet_python, problem = ensure_nnunet_python(args.nnunet_python)
    if nnunet_python is None:
        sys.exit(f"nnU-Net side unavailable: {problem}")
    nnunet_bin = Path(nnunet_python).parent

    work = WORK / "versus"
    shutil.rmtree(work, ignore_errors=True)
    raw = build_raw_dataset(SHARED / "hippocampus", work / "nnUNet_raw")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "AUTOPLAN_PROGRESS": "0"}
    nnunet_env = {**env, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                  "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": threads,
                  "nnUNet_def_n_proc": threads}
    ours = {"raw": raw, "pre": work / "autoplan_preprocessed", "results": work / "autoplan_results"}
    folder_args = ["--raw", ours["raw"], "--preprocessed", ours["pre"], "--results", ours["results"]]

    print("1/4 fingerprint + plan + preprocess", flush=True)
    our_prep = checked(measured_run([sys.executable, "-c", PREPARE, ours["raw"], ours["pre"], ours["results"],
                                     args.budget, threads], env=env), "autoplan plan + preprocess")
    their_prep = checked(measured_run([nnunet_bin / "nnUNetv2_plan_and_preprocess", "-d", "4", "-c", "3d_fullres",
                                       "-np", threads, "-npfp", threads], env=nnunet_env),
                         "nnUNetv2_plan_and_preprocess")
    split = ours["results"] / DATASET_NAME / "splits.json"
    shutil.copy(split, work / "nnUNet_preprocessed" / DATASET_NAME / "splits_final.json")
    n_val = len(json.loads(split.read_text())[0]["val"])

    print(f"2/4 training, {args.budget:g} min each", flush=True)
    our_train = checked(measured_run([sys.executable, "-m", "autoplan", "train", DATASET_NAME, "--time-budget",
                                      args.budget, "--fold", "0", "--device", "cpu", "--run-name", "versus",
                                      "--overwrite",
                                      *folder_args], env=env), "autoplan train")
    # each side keeps back time for its final validation: autoplan its own estimate, nnU-Net
    # what its validation measured here (about 4 s a case with mirroring on 2 threads)
    their_train = checked(measured_run([nnunet_python, HERE / "nnunet_budget_trainer.py", "4", "3d_fullres", "0",
                                        args.budget, 10 + NNUNET_VALIDATION_SECONDS_PER_CASE * n_val],
                                       env=nnunet_env), "nnU-Net budget trainer")
    theirs = json.loads(next(line for line in their_train["output"].splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    run_dir = ours["results"] / DATASET_NAME / "3d_fullres" / "versus" / "fold_0"

    print(f"3/4 prediction of {args.cases} volumes with TTA", flush=True)
    inputs = work / "predict_input"
    inputs.mkdir()
    for path in sorted((raw / DATASET_NAME / "imagesTr").glob("*.nii.gz"))[: args.cases]:
        (inputs / path.name).symlink_to(path.resolve())
    our_pred = checked(measured_run([sys.executable, "-m", "autoplan", "predict", "--model", run_dir, "--input",
                                     inputs, "--output", work / "predicted_autoplan", "--device", "cpu"], env=env),
                       "autoplan predict")
    their_pred = checked(measured_run([nnunet_bin / "nnUNetv2_predict", "-i", inputs, "-o",
                                       work / "predicted_nnunet", "-d", "4", "-c", "3d_fullres", "-tr",
                                       "nnUNetTrainerBudget", "-f", "0", "-chk", "checkpoint_final.pth",
                                       "-npp", threads, "-nps", threads, "-device", "cpu"], env=nnunet_env),
                         "nnUNetv2_predict")

    measurements = {"budget": args.budget, "cases": args.cases, "threads": args.threads, "n_val": n_val,
                    "theirs": theirs, **{name: {k: v for k, v in result.items() if k != "output"} for name, result in
                                         [("our_prep", our_prep), ("their_prep", their_prep), ("our_train", our_train),
                                          ("their_train", their_train), ("our_pred", our_pred),
                                          ("their_pred", their_pred)]}}
    (work / "measurements.json").write_text(json.dumps(measurements, indent=1))
    print_table(work, measurements)
    return 0


def print_table(work: Path, m: dict) -> None:
    """The table, from the measurements and the files both sides wrote under ``work``."""
    from autoplan.paths import resolve_folders

    ours = {"raw": work / "nnUNet_raw", "pre": work / "autoplan_preprocessed", "results": work / "autoplan_results"}
    run_dir = ours["results"] / DATASET_NAME / "3d_fullres" / "versus" / "fold_0"
    our_run = json.loads((run_dir / "run.json").read_text())
    our_metrics = json.loads((run_dir / "metrics.json").read_text())
    theirs, n_val = m["theirs"], m["n_val"]
    budget, cases, threads = m["budget"], m["cases"], m["threads"]
    our_prep, their_prep, our_train, their_train, our_pred, their_pred = (
        m[k] for k in ("our_prep", "their_prep", "our_train", "their_train", "our_pred", "their_pred"))
    our_plan = json.loads((ours["results"] / DATASET_NAME / "plans.json").read_text())["configurations"]["3d_fullres"]
    their_plan = json.loads((work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json").read_text())
    their_plan = their_plan["configurations"]["3d_fullres"]
    gpu = describe_ours(our_gpu_plan(resolve_folders(ours["raw"], ours["pre"], ours["results"])))
    cpu, nn = describe_ours(our_plan), describe_nnunet(their_plan)
    rows = [["fingerprint + plan + preprocess, wall s", fmt(our_prep["seconds"], 1), fmt(their_prep["seconds"], 1),
             ratio(our_prep["seconds"], their_prep["seconds"])],
            ["  peak memory MB", fmt(our_prep["peak_mb"], 0), fmt(their_prep["peak_mb"], 0),
             ratio(our_prep["peak_mb"], their_prep["peak_mb"])]]
    for key in ("patch", "batch", "pooling", "features"):
        rows.append([f"plan {key} (autoplan: CPU {budget:g} min / 8 GB GPU)",
                     f"{cpu[key]} / {gpu[key]}", nn[key], ""])
    rows += [["training: epochs x iterations/epoch (batch)",
              f"{our_run['epochs_completed']} x {our_plan['iterations_per_epoch']} ({cpu['batch']})",
              f"{theirs['epochs']} x 50 ({theirs['batch_size']})", ""],
             ["training iterations", our_run["iterations"], theirs["iterations"],
              ratio(our_run["iterations"], theirs["iterations"])],
             [f"train + final validation ({n_val} cases), wall min", fmt(our_train["seconds"] / 60, 1),
              fmt(their_train["seconds"] / 60, 1), ratio(our_train["seconds"], their_train["seconds"])],
             ["  peak memory MB", fmt(our_train["peak_mb"], 0), fmt(their_train["peak_mb"], 0),
              ratio(our_train["peak_mb"], their_train["peak_mb"])]]
    our_dice = [our_metrics["mean"][k]["dice"] for k in ("1", "2")]
    their_dice = [theirs["dice"][k] for k in ("1", "2")]
    for index, name in enumerate(("anterior", "posterior")):
        rows.append([f"validation Dice {name}", fmt(our_dice[index]), fmt(their_dice[index]),
                     ratio(our_dice[index], their_dice[index])])
    rows.append(["validation Dice mean", fmt(sum(our_dice) / 2), fmt(sum(their_dice) / 2),
                 ratio(sum(our_dice), sum(their_dice))])
    for index, name in enumerate(("anterior", "posterior")):
        values = our_metrics["mean"][str(index + 1)]
        rows.append([f"ASD / HD95 mm {name}", f"{fmt(values['asd_mm'], 2)} / {fmt(values['hd95_mm'], 2)}",
                     "not in summary.json", ""])
    rows += [[f"predict {cases} volumes with TTA, s/case (whole command)",
              fmt(our_pred["seconds"] / cases, 2), fmt(their_pred["seconds"] / cases, 2),
              ratio(our_pred["seconds"], their_pred["seconds"])],
             ["  peak memory MB", fmt(our_pred["peak_mb"], 0), fmt(their_pred["peak_mb"], 0),
              ratio(our_pred["peak_mb"], their_pred["peak_mb"])]]
    print(f"\nautoplan vs nnU-Net v2 on hippocampus (fold 0: {n_val} validation cases), "
          f"{budget:g}-minute training budget each, {threads} threads, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print(markdown_table(["quantity", "autoplan", "nnU-Net v2", "ratio"], rows))


if __name__ == "__main__":
    sys.exit(main())
