"""Command line: parse, call the stage, print. No logic here.

Every command is one row of COMMANDS: its help line, an example, the function that adds its
arguments and the function that runs it (which calls autoplan.pipeline or a stage's entry
function and prints the summary pipeline gives).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autoplan import __version__, parallel, pipeline
from autoplan.calibration import OBJECTIVES, calibrate_run, describe_calibration
from autoplan.datasets import import_dataset
from autoplan.errors import InputError
from autoplan.fingerprint import format_fingerprint_summary
from autoplan.paths import fingerprint_file, plans_file, resolve_folders
from autoplan.runs import TrainOptions
from autoplan.test_split import TEST_SPLIT_SEED, create_test_split, describe_test_split, development_dataset

# One meaning everywhere: how many CPU cores a command may keep busy.
N_JOBS_HELP = ("CPU cores to use: parallel workers for per-case work (import, fingerprint, preprocessing), "
               "torch threads in predict and evaluate (default: all cores, at most 8 workers)")
NAME_HELP = "dataset name: the folder RAW/NAME (e.g. TaskXRay)"
DEVICE_CHOICES = ["cpu", "cuda"]


# --------------------------------------------------------------------------------------
# arguments shared by several commands

def _add_folders(parser, raw=True, preprocessed=True, results=True):
    if raw:
        parser.add_argument("--raw", help="raw datasets folder (env AUTOPLAN_RAW, default ./datasets_raw)")
    if preprocessed:
        parser.add_argument("--preprocessed", help="preprocessed cache (env AUTOPLAN_PREPROCESSED, default ./preprocessed)")
    if results:
        parser.add_argument("--results", help="results folder (env AUTOPLAN_RESULTS, default ./results)")
    parser.add_argument("--n-jobs", type=int, default=None, help=N_JOBS_HELP)
    parser.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                        help="Dask scheduler for per-case work (env AUTOPLAN_SCHEDULER; needs autoplan[cluster])")


def _add_plan_options(parser):
    parser.add_argument("--gpu-memory", type=float, default=None, help="GPU memory budget in GB to plan for")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="device to plan/train for")
    parser.add_argument("--plan-from", default=None, metavar="RUN",
                        help="keep this run's configuration (network, patch, normalisation) so --init-from RUN fits")
    parser.add_argument("--time-budget", type=float, default=None, help="minutes (wall clock) for training and "
                        "final validation; the planner sizes network and schedule to it")
    parser.add_argument("--field-of-view", choices=["auto", "fit", "pixels"], default="auto",
                        help="2D images without a pixel size: resize each whole image to the working size "
                             "(fit; auto does so for PNG/JPEG-like data) or keep 1 pixel = 1 mm (pixels)")


def _add_device_and_budget(parser):
    """train and sweep: the plan is made already, the budget only bounds the training."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="default: the GPU when there is one")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes (wall clock) for training and final validation")


def _add_model_options(parser):
    """The options `sweep` takes as lists (pipeline.SWEEPABLE); here one value each."""
    parser.add_argument("--loss", choices=["ce", "bce", "dice", "dice_ce", "focal", "ce_focal"],
                        help="loss (default: the plan's, dice_ce for U-Nets, ce for classifiers)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout probability (0-1)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="classification: cross-entropy label smoothing (0-1)")
    parser.add_argument("--base-features", type=int, default=None, help="U-Net features of the first stage")
    parser.add_argument("--norm", choices=["instance", "batch"], default=None, help="normalisation layers")
    parser.add_argument("--augment", choices=["default", "light", "none"], default=None,
                        help="augmentation preset (docs/preprocessing.md)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None, help="default: the plan's")
    parser.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the plan's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plan's")
    parser.add_argument("--imbalance", choices=["weighted_loss", "logit_adjusted"], default=None,
                        help="classification, imbalanced classes: class-weighted loss (the plan's default) or "
                             "logit-adjusted loss (docs/training.md)")


def _add_run_options(parser):
    """What train and sweep share, one value each: which configuration and fold, how long, seeds."""
    parser.add_argument("--config", default=None, help="configuration from plans.json (default: the plan's)")
    parser.add_argument("--fold", default="0", help="fold 0-4, or 'all'")
    parser.add_argument("--pretrained", default=None, help="local state dict in torchvision ResNet layout")
    parser.add_argument("--init-from", default=None, metavar="RUN",
                        help="start from this run's weights (run, fold_K folder or model .zip; fine-tuning)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the plan's (fitted to the budget)")
    parser.add_argument("--iterations-per-epoch", type=int, default=None, help="default: the plan's")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes")


def _add_train_options(parser):
    parser.add_argument("name", help=NAME_HELP)
    _add_model_options(parser)
    _add_run_options(parser)
    parser.add_argument("--run-name", default=None, help="folder name of the run (default: built from the options)")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt or _final.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run of the same name")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="autocast precision (default: the plan's; fp16 needs CUDA, bf16 on CPU "
                             "needs native bfloat16, else fp32 is used)")


def _add_model_folder(parser):
    """predict and evaluate: the trained model and how it runs."""
    parser.add_argument("--model", required=True, type=Path,
                        help="fold_K folder, its parent (ensemble), or a model package .zip (export-model)")
    parser.add_argument("--no-tta", action="store_true", help="switch off test-time augmentation")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where the network runs")


# --------------------------------------------------------------------------------------
# each command's own arguments

def _import_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of images (or an nnU-Net raw dataset folder)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--masks", type=Path, help="folder of masks (segmentation)")
    source.add_argument("--labels", type=Path, help="CSV of per-image labels (classification)")
    parser.add_argument("--label-map", default=None, help="grey value=name,... e.g. 150=right_lung,200=left_lung")
    parser.add_argument("--id-column", default=None, help="CSV column naming the image (default: guessed)")
    parser.add_argument("--label-column", default=None, help="CSV column holding the class (default: guessed)")
    parser.add_argument("--group-column", default=None, help="patient/lesion column: kept on one side of every split")
    parser.add_argument("--classes", default=None, help="comma-separated class names (unknown classes are refused)")
    parser.add_argument("--convert-grey", action="store_true", help="convert grey images to RGB in a mixed dataset")
    parser.add_argument("--overwrite", action="store_true", help="replace RAW/NAME if it exists")
    _add_folders(parser, preprocessed=False, results=False)


def _split_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--test-fraction", type=float, default=0.15,
                        help="share of the cases set aside, whole lesions/patients, per class (default 0.15)")
    parser.add_argument("--seed", type=int, default=TEST_SPLIT_SEED, help="which cases (same seed, same split)")
    parser.add_argument("--overwrite", action="store_true",
                        help="make or change the split although trained runs exist (they have seen its cases)")
    _add_folders(parser, preprocessed=False)


def _fingerprint_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--force", action="store_true", help="recompute even when cached")
    _add_folders(parser, preprocessed=False)


def _plan_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--base-features", type=int, default=None, help="U-Net features of the first stage")
    _add_plan_options(parser)
    _add_folders(parser, preprocessed=False)


def _train_arguments(parser):
    _add_train_options(parser)
    _add_device_and_budget(parser)
    _add_folders(parser)


def _plan_and_train_arguments(parser):
    _add_train_options(parser)
    _add_plan_options(parser)
    parser.add_argument("--find-best", action="store_true",
                        help="train every configuration on the folds the budget allows, then find-best")
    _add_folders(parser)


def _fold_list(text: str) -> list:
    folds = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in folds):
        raise argparse.ArgumentTypeError(f"{text!r}: give fold numbers separated by commas, e.g. 0,1,2")
    return [int(part) for part in folds]


def _find_best_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--folds", default=None, type=_fold_list,
                        help="comma-separated folds to compare on (default: every fold of splits.json)")
    parser.add_argument("--train-missing", action="store_true",
                        help="first train the folds a run lacks, with that run's options")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="minutes for each fold --train-missing trains (default: the run's own)")
    parser.add_argument("--no-tta", action="store_true", help="switch off test-time augmentation")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where the networks run")
    _add_folders(parser)


def _calibrate_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    parser.add_argument("--config", default="classifier", help="configuration folder of the run (default classifier)")
    parser.add_argument("--run", default=None, help="run folder under RESULTS/NAME/CONFIG (default: the only one)")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="mean",
                        help="what the rule maximises on out-of-fold predictions: mean of accuracy and "
                             "balanced accuracy (default), balanced_accuracy or accuracy")
    parser.add_argument("--no-tta", action="store_true", help="switch off test-time augmentation")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu", help="where the networks run")
    _add_folders(parser)


def _predict_arguments(parser):
    _add_model_folder(parser)
    parser.add_argument("--input", required=True, type=Path, help="folder of images and DICOM series folders")
    parser.add_argument("--output", required=True, type=Path, help="folder for the masks or predictions.csv")
    parser.add_argument("--save-probabilities", action="store_true", help="also write STEM_probabilities.npz")
    parser.add_argument("--n-jobs", type=int, default=None, help=N_JOBS_HELP)


def _evaluate_arguments(parser):
    _add_model_folder(parser)
    parser.add_argument("--dataset", required=True, help="imported labelled dataset: " + NAME_HELP)
    parser.add_argument("--split", choices=["all", "test"], default="all",
                        help="all: every case of the dataset (default); test: exactly its untouched test split "
                             "(autoplan split)")
    parser.add_argument("--output", type=Path, default=None, help="default: MODEL/DATASET (MODEL/DATASET_test)")
    _add_folders(parser, preprocessed=False)


def _compare_arguments(parser):
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (fold_K)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")


def _sweep_arguments(parser):
    parser.add_argument("name", help=NAME_HELP)
    for name in pipeline.SWEEPABLE:     # the sweep's axes: one definition, in pipeline
        flag = name.replace("_", "-")
        parser.add_argument(f"--{flag}", dest=name, default=None, help=f"comma-separated values of train --{flag}")
    _add_run_options(parser)
    _add_device_and_budget(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace earlier runs of the same names")
    parser.add_argument("--output", type=Path, default=None, help="folder for compare.md and curves.png")
    _add_folders(parser)


def _demo_arguments(parser):
    parser.add_argument("--workdir", type=Path, default=Path("demo_workdir"), help="where the demo writes everything")
    parser.add_argument("--time-budget", type=float, default=1.0, help="minutes of training per demo dataset")


# --------------------------------------------------------------------------------------
# each command's run: call the stage, print

def _folders(args):
    return resolve_folders(getattr(args, "raw", None), getattr(args, "preprocessed", None),
                           getattr(args, "results", None))


def _development_dataset(args, folders):
    """The dataset without its untouched test split: what every command that chooses gets."""
    return development_dataset(pipeline.open_dataset(args.name, folders), folders.results)


def _run_options(args) -> dict:
    """TrainOptions fields from the options train and sweep share."""
    return dict(configuration=args.config, fold=args.fold, pretrained=args.pretrained, init_from=args.init_from,
                epochs=args.epochs,
                iterations_per_epoch=args.iterations_per_epoch, time_budget_minutes=args.time_budget,
                overwrite=args.overwrite, device=args.device or "auto", seed=args.seed, n_jobs=args.n_jobs,
                n_workers=args.workers)


def _train_options(args) -> TrainOptions:
    model = {name: getattr(args, name) for name in pipeline.SWEEPABLE}
    return TrainOptions(**_run_options(args), **model, run_name=args.run_name, resume=args.resume,
                        precision=args.precision)


def run_import(args):
    dataset = import_dataset(     # import_dataset reads the label map and class list as typed
        args.name, args.images, _folders(args).raw, masks_dir=args.masks, labels_csv=args.labels,
        label_map=args.label_map or None, id_column=args.id_column, label_column=args.label_column,
        group_column=args.group_column, classes=args.classes or None, n_jobs=args.n_jobs,
        convert_grey=args.convert_grey, overwrite=args.overwrite)
    print(pipeline.describe_import(dataset))


def run_split(args):
    folders = _folders(args)
    split, notes = create_test_split(pipeline.open_dataset(args.name, folders), folders.results,
                                     args.test_fraction, seed=args.seed, overwrite=args.overwrite)
    print("\n".join([describe_test_split(split, folders.results), *notes]))


def run_fingerprint(args):
    folders = _folders(args)
    result = pipeline.fingerprint(_development_dataset(args, folders), folders, force=args.force,
                                  n_jobs=args.n_jobs)
    print(format_fingerprint_summary(result))
    print(f"wrote {fingerprint_file(folders.results, args.name)}")


def run_plan(args):
    from autoplan.planning import format_plan_table

    folders = _folders(args)
    result = pipeline.plan(_development_dataset(args, folders), folders, device=args.device,
                           gpu_memory_gb=args.gpu_memory, time_budget_minutes=args.time_budget,
                           base_features=args.base_features, n_jobs=args.n_jobs, field_of_view=args.field_of_view,
                           plan_from=args.plan_from)
    print(format_plan_table(result))
    print(f"wrote {plans_file(folders.results, args.name)}")


def run_train(args):
    folders = _folders(args)
    print(pipeline.describe_runs(pipeline.train(_development_dataset(args, folders), folders,
                                                _train_options(args))))


def run_plan_and_train(args):
    folders = _folders(args)
    if args.find_best:
        return run_plan_train_and_find_best(args, folders)
    runs = pipeline.plan_and_train(_development_dataset(args, folders), folders, _train_options(args),
                                   device=args.device, gpu_memory_gb=args.gpu_memory,
                                   field_of_view=args.field_of_view, plan_from=args.plan_from)
    print(pipeline.describe_runs(runs))


def run_plan_train_and_find_best(args, folders):
    split, runs, choice = pipeline.plan_train_and_find_best(
        _development_dataset(args, folders), folders, _train_options(args), device=args.device,
        gpu_memory_gb=args.gpu_memory, field_of_view=args.field_of_view)
    print(f"budget: {split.reason}")
    print(pipeline.describe_runs(runs))
    print(pipeline.describe_choice(choice, folders))


def run_find_best(args):
    folders = _folders(args)
    choice = pipeline.find_best(_development_dataset(args, folders), folders, folds=args.folds,
                                tta=not args.no_tta, device=args.device, train_missing=args.train_missing,
                                time_budget_minutes=args.time_budget, n_jobs=args.n_jobs)
    print(pipeline.describe_choice(choice, folders))


def run_calibrate(args):
    folders = _folders(args)
    calibration = calibrate_run(_development_dataset(args, folders), folders, args.config, args.run,
                                objective=args.objective, tta=not args.no_tta, device=args.device,
                                n_jobs=args.n_jobs)
    print(describe_calibration(calibration))


def run_predict(args):
    from autoplan.inference import predict_folder

    summary = predict_folder(args.model, args.input, args.output, tta=not args.no_tta, device=args.device,
                             save_probabilities=args.save_probabilities, n_jobs=args.n_jobs)
    print(pipeline.describe_prediction(summary, args.output))


def run_evaluate(args):
    from autoplan.inference import evaluate_dataset
    from autoplan.evaluation import headline_metrics

    folders = _folders(args)
    metrics = evaluate_dataset(args.model, pipeline.open_dataset(args.dataset, folders), args.output,
                               tta=not args.no_tta, device=args.device, n_jobs=args.n_jobs, split=args.split,
                               results_dir=folders.results)
    print(f"scored: {metrics.get('split', 'all cases')}")
    print(pipeline.describe_headline(headline_metrics(metrics)))


def _export_arguments(parser):
    parser.add_argument("model", type=Path, help="run folder (every fold_K inside it), one fold_K folder, or "
                                                 "RESULTS/NAME with find-best's best.json (its choice)")
    parser.add_argument("output", type=Path, help="the package to write, OUT.zip")
    parser.add_argument("--weights", choices=["best", "final"], default="best",
                        help="best: the checkpoint with the best smoothed validation score (default); final: the last")


def _import_model_arguments(parser):
    parser.add_argument("package", type=Path, help="a model package .zip written by export-model")
    parser.add_argument("--overwrite", action="store_true", help="replace a run folder of the same name")
    _add_folders(parser, raw=False, preprocessed=False)


def run_export_model(args):
    from autoplan.inference.package import export_model

    manifest = export_model(args.model, args.output, weights=args.weights)
    print(pipeline.describe_package(manifest, args.output))


def run_import_model(args):
    from autoplan.inference.package import import_model

    run_dir = import_model(args.package, _folders(args).results, overwrite=args.overwrite)
    print(f"imported {args.package} -> {run_dir} (autoplan predict --model {run_dir} ...)")


def run_compare(args):
    print(pipeline.compare(args.runs, args.output))


def run_sweep(args):
    folders = _folders(args)
    grid = pipeline.sweep_grid({name: getattr(args, name) for name in pipeline.SWEEPABLE})
    table, output = pipeline.sweep(_development_dataset(args, folders), folders,
                                   TrainOptions(**_run_options(args)), grid, args.output)
    print(table)
    print(f"wrote {output / 'compare.md'} and {output / 'curves.png'}")


def run_demo(args):
    from autoplan.demo import run_demo as demo

    demo(args.workdir, time_budget_minutes=args.time_budget)


# --------------------------------------------------------------------------------------
# the table of commands, the parser built from it, and main

@dataclass(frozen=True)
class Command:
    help: str
    example: str
    add_arguments: Callable
    run: Callable


COMMANDS = {
    "import": Command("bring a dataset from its publisher's layout into RAW/NAME",
                      "autoplan import TaskXRay --images jsrt/images --masks jsrt/masks "
                      "--label-map 150=right_lung,200=left_lung,250=heart", _import_arguments, run_import),
    "split": Command("set aside an untouched test split -> RESULTS/NAME/test_split.json",
                     "autoplan split TaskDerm --test-fraction 0.15", _split_arguments, run_split),
    "fingerprint": Command("inspect a dataset -> RESULTS/NAME/fingerprint.json",
                           "autoplan fingerprint TaskXRay", _fingerprint_arguments, run_fingerprint),
    "plan": Command("plan configurations -> RESULTS/NAME/plans.json",
                    "autoplan plan TaskXRay --time-budget 10     # or: --device cuda --gpu-memory 24",
                    _plan_arguments, run_plan),
    "train": Command("train a configuration -> RESULTS/NAME/CFG/RUN/fold_K",
                     "autoplan train TaskXRay --loss dice --dropout 0.2 --time-budget 10", _train_arguments, run_train),
    "plan-and-train": Command("fingerprint, plan, preprocess, train, validate, report",
                              "autoplan plan-and-train TaskXRay --time-budget 10",
                              _plan_and_train_arguments, run_plan_and_train),
    "find-best": Command("compare configurations and pairwise ensembles on out-of-fold predictions "
                         "-> RESULTS/NAME/best.json", "autoplan find-best TaskHippocampus",
                         _find_best_arguments, run_find_best),
    "calibrate": Command("choose a classifier's decision rule on out-of-fold predictions -> RUN/calibration.json",
                         "autoplan calibrate TaskDerm --run RUN", _calibrate_arguments, run_calibrate),
    "predict": Command("predict a folder of new images (masks + qc.csv, or predictions.csv)",
                       "autoplan predict --model results/TaskXRay/2d/RUN/fold_0 --input new/ --output masks/",
                       _predict_arguments, run_predict),
    "evaluate": Command("predict a labelled dataset and write metrics.json + report.html",
                        "autoplan evaluate --model results/TaskXRay/2d/RUN --dataset TaskXRayExternal",
                        _evaluate_arguments, run_evaluate),
    "export-model": Command("write a trained run as one model package .zip (plans, weights, checksums)",
                            "autoplan export-model results/TaskXRay/2d/RUN xray_model.zip",
                            _export_arguments, run_export_model),
    "import-model": Command("unpack a model package into RESULTS/NAME/CFG/RUN",
                            "autoplan import-model xray_model.zip --results results/",
                            _import_model_arguments, run_import_model),
    "compare": Command("side-by-side Markdown table of runs", "autoplan compare results/TaskXRay/2d/*/fold_0",
                       _compare_arguments, run_compare),
    "sweep": Command("train every combination of options, then compare",
                     "autoplan sweep TaskXRay --loss ce,dice --dropout 0,0.2 --time-budget 5",
                     _sweep_arguments, run_sweep),
    "demo": Command("synthetic datasets through the whole pipeline, in minutes on a CPU",
                    "autoplan demo --time-budget 0.5", _demo_arguments, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoplan", description=(
        "Automated planning, training, prediction and reporting for medical image "
        "segmentation and classification."))
    parser.add_argument("--version", action="version", version=f"autoplan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(
            name, help=command.help, description=command.help, epilog=f"example:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parallel.use_scheduler(getattr(args, "scheduler", None))   # connects now: a bad address fails first
        return COMMANDS[args.command].run(args) or 0
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:     # not about a file or folder the user named: a bug, show it
            raise
        # a folder that is not writable, an output path that is a file, a full disk...
        print(f"error: {error.filename}: {error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
