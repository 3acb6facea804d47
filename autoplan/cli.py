"""Command line: parse, call the stage, print. No logic here."""

import argparse
import sys
from pathlib import Path

from autoplan.errors import InputError
from autoplan.paths import resolve_folders
from autoplan.runs import TrainOptions


# One meaning everywhere: how many CPU cores a command may keep busy.
N_JOBS_HELP = ("CPU cores to use: parallel workers for per-case work (import, fingerprint, preprocessing), "
               "torch threads in predict and evaluate (default: all cores, at most 8 workers)")
NAME_HELP = "dataset name: the folder RAW/NAME (e.g. TaskXRay)"
EXAMPLES = {
    "import": "autoplan import TaskXRay --images jsrt/images --masks jsrt/masks "
              "--label-map 150=right_lung,200=left_lung,250=heart",
    "fingerprint": "autoplan fingerprint TaskXRay",
    "plan": "autoplan plan TaskXRay --time-budget 10     # or: --device cuda --gpu-memory 24",
    "train": "autoplan train TaskXRay --loss dice --dropout 0.2 --time-budget 10",
    "plan-and-train": "autoplan plan-and-train TaskXRay --time-budget 10",
    "predict": "autoplan predict --model results/TaskXRay/2d/RUN/fold_0 --input new/ --output masks/",
    "evaluate": "autoplan evaluate --model results/TaskXRay/2d/RUN --dataset TaskXRayExternal",
    "compare": "autoplan compare results/TaskXRay/2d/*/fold_0",
    "sweep": "autoplan sweep TaskXRay --loss ce,dice --dropout 0,0.2 --time-budget 5",
    "demo": "autoplan demo --time-budget 0.5",
}


def _command(commands, name: str, help_text: str):
    return commands.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {EXAMPLES[name]}",
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_folders(parser, raw=True, preprocessed=True, results=True):
    if raw:
        parser.add_argument("--raw", help="raw datasets folder (env AUTOPLAN_RAW, default ./datasets_raw)")
    if preprocessed:
        parser.add_argument("--preprocessed", help="preprocessed cache (env AUTOPLAN_PREPROCESSED, default ./preprocessed)")
    if results:
        parser.add_argument("--results", help="results folder (env AUTOPLAN_RESULTS, default ./results)")
    parser.add_argument("--n-jobs", type=int, default=None, help=N_JOBS_HELP)


def _add_plan_options(parser):
    parser.add_argument("--gpu-memory", type=float, default=None, help="GPU memory budget in GB to plan for")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="device to plan/train for")
    parser.add_argument("--time-budget", type=float, default=None, help="minutes (wall clock) for training and "
                        "final validation; the planner sizes network and schedule to it")
    parser.add_argument("--field-of-view", choices=["auto", "fit", "pixels"], default="auto",
                        help="2D images without a pixel size: resize each whole image to the working size "
                             "(fit; auto does so for PNG/JPEG-like data) or keep 1 pixel = 1 mm (pixels)")


def _add_train_options(parser):
    parser.add_argument("--config", default=None, help="configuration from plans.json (default: the plan's)")
    parser.add_argument("--fold", default="0", help="fold 0-4, or 'all'")
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
    parser.add_argument("--pretrained", default=None, help="local state dict in torchvision ResNet layout")
    parser.add_argument("--epochs", type=int, default=None, help="default: the plan's (fitted to the budget)")
    parser.add_argument("--iterations-per-epoch", type=int, default=None, help="default: the plan's")
    parser.add_argument("--run-name", default=None, help="folder name of the run (default: built from the options)")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run of the same name")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="autocast precision (default: the plan's; fp16 needs CUDA, bf16 on CPU "
                             "needs native bfloat16, else fp32 is used)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes")


def _train_options(args) -> TrainOptions:
    return TrainOptions(configuration=args.config, fold=args.fold, loss=args.loss, dropout=args.dropout,
                        label_smoothing=args.label_smoothing,
                        base_features=args.base_features, norm=args.norm, augment=args.augment,
                        optimizer=args.optimizer, lr=args.lr, batch_size=args.batch_size,
                        pretrained=args.pretrained, epochs=args.epochs,
                        iterations_per_epoch=args.iterations_per_epoch,
                        time_budget_minutes=args.time_budget, run_name=args.run_name, resume=args.resume,
                        overwrite=args.overwrite,
                        device=args.device or "auto", seed=args.seed, n_jobs=args.n_jobs,
                        n_workers=args.workers, precision=args.precision)


def build_parser() -> argparse.ArgumentParser:
    from autoplan import __version__

    parser = argparse.ArgumentParser(prog="autoplan", description=(
        "Automated planning, training, prediction and reporting for medical image "
        "segmentation and classification."))
    parser.add_argument("--version", action="version", version=f"autoplan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(commands, "import", "bring a dataset from its publisher's layout into RAW/NAME")
    p.add_argument("name", help=NAME_HELP)
    p.add_argument("--images", required=True, type=Path, help="folder of images (or an nnU-Net raw dataset folder)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--masks", type=Path, help="folder of masks (segmentation)")
    source.add_argument("--labels", type=Path, help="CSV of per-image labels (classification)")
    p.add_argument("--label-map", default=None, help="grey value=name,... e.g. 150=right_lung,200=left_lung")
    p.add_argument("--id-column", default=None, help="CSV column naming the image (default: guessed)")
    p.add_argument("--label-column", default=None, help="CSV column holding the class (default: guessed)")
    p.add_argument("--group-column", default=None, help="patient/lesion column: kept on one side of every split")
    p.add_argument("--classes", default=None, help="comma-separated class names (unknown classes are refused)")
    p.add_argument("--convert-grey", action="store_true", help="convert grey images to RGB in a mixed dataset")
    p.add_argument("--overwrite", action="store_true", help="replace RAW/NAME if it exists")
    _add_folders(p, preprocessed=False, results=False)

    p = _command(commands, "fingerprint", "inspect a dataset -> RESULTS/NAME/fingerprint.json")
    p.add_argument("name", help=NAME_HELP)
    p.add_argument("--force", action="store_true", help="recompute even when cached")
    _add_folders(p, preprocessed=False)

    p = _command(commands, "plan", "plan configurations -> RESULTS/NAME/plans.json")
    p.add_argument("name", help=NAME_HELP)
    p.add_argument("--base-features", type=int, default=None, help="U-Net features of the first stage")
    _add_plan_options(p)
    _add_folders(p, preprocessed=False)

    p = _command(commands, "train", "train a configuration -> RESULTS/NAME/CFG/RUN/fold_K")
    p.add_argument("name", help=NAME_HELP)
    _add_train_options(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the GPU when there is one")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes (wall clock) for training and final validation")
    _add_folders(p)

    p = _command(commands, "plan-and-train", "fingerprint, plan, preprocess, train, validate, report")
    p.add_argument("name", help=NAME_HELP)
    _add_train_options(p)
    _add_plan_options(p)
    _add_folders(p)

    p = _command(commands, "predict", "predict a folder of new images (masks + qc.csv, or predictions.csv)")
    p.add_argument("--model", required=True, type=Path, help="fold_K folder, or its parent (ensemble)")
    p.add_argument("--input", required=True, type=Path, help="folder of images and DICOM series folders")
    p.add_argument("--output", required=True, type=Path, help="folder for the masks or predictions.csv")
    p.add_argument("--no-tta", action="store_true", help="switch off test-time augmentation")
    p.add_argument("--save-probabilities", action="store_true", help="also write STEM_probabilities.npz")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the network runs")
    p.add_argument("--n-jobs", type=int, default=None, help=N_JOBS_HELP)

    p = _command(commands, "evaluate", "predict a labelled dataset and write metrics.json + report.html")
    p.add_argument("--model", required=True, type=Path, help="fold_K folder, or its parent (ensemble)")
    p.add_argument("--dataset", required=True, help="imported labelled dataset: " + NAME_HELP)
    p.add_argument("--output", type=Path, default=None, help="default: MODEL/DATASET")
    p.add_argument("--no-tta", action="store_true", help="switch off test-time augmentation")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the network runs")
    _add_folders(p, preprocessed=False, results=False)

    p = _command(commands, "compare", "side-by-side Markdown table of runs")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (fold_K)")
    p.add_argument("--output", type=Path, default=None, help="also write the table to this file")

    p = _command(commands, "sweep", "train every combination of options, then compare")
    p.add_argument("name", help=NAME_HELP)
    for option, kind in (("loss", str), ("dropout", str), ("base-features", str), ("norm", str),
                         ("augment", str), ("optimizer", str), ("lr", str), ("batch-size", str),
                         ("label-smoothing", str)):
        p.add_argument(f"--{option}", default=None, help="comma-separated values")
    for option in ("config", "fold", "pretrained", "seed", "epochs", "iterations-per-epoch", "time-budget",
                   "workers"):
        p.add_argument(f"--{option}", default=None, help=f"as in train --{option} (one value)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the GPU when there is one")
    p.add_argument("--overwrite", action="store_true", help="replace earlier runs of the same names")
    p.add_argument("--output", type=Path, default=None, help="folder for compare.md and curves.png")
    _add_folders(p)

    p = _command(commands, "demo", "synthetic datasets through the whole pipeline, in minutes on a CPU")
    p.add_argument("--workdir", type=Path, default=Path("demo_workdir"), help="where the demo writes everything")
    p.add_argument("--time-budget", type=float, default=1.0, help="minutes of training per demo dataset")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
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


def _folders(args):
    return resolve_folders(getattr(args, "raw", None), getattr(args, "preprocessed", None),
                           getattr(args, "results", None))


def cmd_import(args):
    from autoplan.datasets import import_dataset, parse_label_map

    dataset = import_dataset(
        args.name, args.images, _folders(args).raw, masks_dir=args.masks, labels_csv=args.labels,
        label_map=parse_label_map(args.label_map) if args.label_map else None,
        id_column=args.id_column, label_column=args.label_column, group_column=args.group_column,
        classes=args.classes.split(",") if args.classes else None, n_jobs=args.n_jobs,
        convert_grey=args.convert_grey, overwrite=args.overwrite)
    kinds = f"classes {', '.join(dataset.classes)}" if dataset.classes else \
        f"labels {', '.join(f'{v}={k}' for k, v in dataset.labels.items())}"
    print(f"imported {dataset.name}: {len(dataset.cases)} cases, {kinds} -> {dataset.root}")


def cmd_fingerprint(args):
    from autoplan.fingerprint import format_fingerprint_summary
    from autoplan.pipeline import fingerprint, open_dataset

    folders = _folders(args)
    result = fingerprint(open_dataset(args.name, folders), folders, force=args.force, n_jobs=args.n_jobs)
    print(format_fingerprint_summary(result))
    print(f"wrote {folders.dataset_results(args.name) / 'fingerprint.json'}")


def cmd_plan(args):
    from autoplan.pipeline import open_dataset, plan, plans_path
    from autoplan.planning import format_plan_table

    folders = _folders(args)
    dataset = open_dataset(args.name, folders)
    result = plan(dataset, folders, device=args.device, gpu_memory_gb=args.gpu_memory,
                  time_budget_minutes=args.time_budget, base_features=args.base_features, n_jobs=args.n_jobs,
                  field_of_view=args.field_of_view)
    print(format_plan_table(result))
    print(f"wrote {plans_path(dataset, folders)}")


def _print_runs(runs):
    for run in runs:
        headline = ", ".join(f"{k} {v:.4f}" for k, v in run.headline.items() if isinstance(v, float))
        print(f"{run.run_dir}: {run.epochs_completed} epochs ({run.stopped_by}), {headline}")
        print(f"  report: {Path(run.run_dir) / 'report.html'} (also report.md, metrics.json)")


def cmd_train(args):
    from autoplan.pipeline import open_dataset, train

    folders = _folders(args)
    _print_runs(train(open_dataset(args.name, folders), folders, _train_options(args)))


def cmd_plan_and_train(args):
    from autoplan.pipeline import open_dataset, plan_and_train

    folders = _folders(args)
    runs = plan_and_train(open_dataset(args.name, folders), folders, _train_options(args),
                          device=args.device, gpu_memory_gb=args.gpu_memory, field_of_view=args.field_of_view)
    _print_runs(runs)


def cmd_predict(args):
    from autoplan.inference import predict_folder

    summary = predict_folder(args.model, args.input, args.output, tta=not args.no_tta, device=args.device,
                             save_probabilities=args.save_probabilities, n_jobs=args.n_jobs)
    line = f"predicted {summary.get('n_cases', '?')} cases -> {args.output}"
    if summary.get("qc"):
        line += f"; {summary['n_flagged']} of {summary['n_predicted']} cases flagged, see {summary['qc']}"
    print(line)


def cmd_evaluate(args):
    from autoplan.inference import evaluate_dataset
    from autoplan.pipeline import open_dataset

    dataset = open_dataset(args.dataset, _folders(args))
    metrics = evaluate_dataset(args.model, dataset, args.output, tta=not args.no_tta, device=args.device,
                               n_jobs=args.n_jobs)
    from autoplan.training import headline_metrics

    print(", ".join(f"{k} {v:.4f}" for k, v in headline_metrics(metrics).items() if isinstance(v, float)))


def cmd_compare(args):
    from autoplan.jsonio import atomic_write_text
    from autoplan.report import compare_runs

    table = compare_runs(args.runs)
    if args.output:
        atomic_write_text(args.output, table)
    print(table)


def cmd_sweep(args):
    from autoplan.pipeline import open_dataset, sweep, sweep_grid

    folders = _folders(args)
    grid = sweep_grid({"loss": args.loss, "dropout": args.dropout, "base_features": args.base_features,
                       "norm": args.norm, "augment": args.augment, "optimizer": args.optimizer,
                       "lr": args.lr, "batch_size": args.batch_size,
                       "label_smoothing": args.label_smoothing})
    options = TrainOptions(
        configuration=args.config, fold=args.fold or "0", pretrained=args.pretrained,
        seed=int(args.seed or 0), epochs=int(args.epochs) if args.epochs else None,
        iterations_per_epoch=int(args.iterations_per_epoch) if args.iterations_per_epoch else None,
        time_budget_minutes=float(args.time_budget) if args.time_budget else None,
        device=args.device or "auto", n_jobs=args.n_jobs, overwrite=args.overwrite,
        n_workers=int(args.workers) if args.workers else None)
    table, output = sweep(open_dataset(args.name, folders), folders, options, grid, args.output)
    print(table)
    print(f"wrote {output / 'compare.md'} and {output / 'curves.png'}")


def cmd_demo(args):
    from autoplan.demo import run_demo

    run_demo(args.workdir, time_budget_minutes=args.time_budget)


COMMANDS = {"import": cmd_import, "fingerprint": cmd_fingerprint, "plan": cmd_plan, "train": cmd_train,
            "plan-and-train": cmd_plan_and_train, "predict": cmd_predict, "evaluate": cmd_evaluate,
            "compare": cmd_compare, "sweep": cmd_sweep, "demo": cmd_demo}
