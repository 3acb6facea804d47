"""Training: the shared loop on demo data (options, resume, seeds, DDP) and on real images."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoplan import pipeline
from autoplan.datasets import import_dataset
from autoplan.nets import resolve_precision
from autoplan.demo import write_demo_sources
from autoplan.paths import resolve_folders
from autoplan.runs import RunSpec, TrainOptions
from tests.conftest import shared_dataset

TINY = dict(epochs=2, iterations_per_epoch=3, n_workers=0, device="cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo datasets imported and planned once for the module (CPU plan, 2-minute budget)."""
    root = tmp_path_factory.mktemp("demo")
    sources = write_demo_sources(root / "sources", n_xray=16, n_derm_per_class=12)
    folders = resolve_folders(root / "raw", root / "preprocessed", root / "results")
    xray = import_dataset("DemoXRay", sources["xray_images"], folders.raw, masks_dir=sources["xray_masks"],
                          label_map="128=lung,255=heart", quiet=True)
    derm = import_dataset("DemoDerm", sources["derm_images"], folders.raw, labels_csv=sources["derm_labels"],
                          id_column="image_id", label_column="dx", group_column="patient", quiet=True)
    for dataset in (xray, derm):
        pipeline.plan(dataset, folders, time_budget_minutes=2)
    return {"folders": folders, "xray": xray, "derm": derm, "root": root, "sources": sources}


def read_log(run_dir: Path) -> list:
    with open(run_dir / "log.csv") as handle:
        return list(csv.DictReader(handle))


def train(demo, dataset, **options):
    runs = pipeline.train(demo[dataset], demo["folders"], TrainOptions(**{**TINY, **options}))
    return Path(runs[0].run_dir), runs[0]


@pytest.mark.slow
def test_run_folder_holds_everything_the_contract_lists(demo):
    run_dir, run = train(demo, "xray", run_name="contract")
    for name in ("plan.json", "checkpoint_best.pt", "checkpoint_final.pt", "log.csv", "curves.png",
                 "metrics.json", "report.html", "report.md", "run.json"):
        assert (run_dir / name).is_file(), name
    assert run_dir == demo["folders"].results / "DemoXRay" / "2d" / "contract" / "fold_0"
    rows = read_log(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_dice", "lr", "seconds"} <= set(rows[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"1", "2"} and metrics["labels"] == {"1": "lung", "2": "heart"}
    spec = RunSpec.load(run_dir / "plan.json")
    assert spec.fold == 0 and spec.configuration.name == "2d" and set(spec.postprocessing) <= {"1", "2"}


@pytest.mark.slow
def test_ablation_options_each_get_their_own_run_folder(demo):
    variants = [dict(loss="ce"), dict(loss="dice"), dict(dropout=0.2), dict(base_features=8),
                dict(norm="batch"), dict(augment="light"), dict(optimizer="adam")]
    run_dirs = [train(demo, "xray", epochs=1, iterations_per_epoch=2, **variant)[0] for variant in variants]
    assert len(set(run_dirs)) == len(variants)
    for run_dir in run_dirs:
        assert (run_dir / "metrics.json").is_file()
    batch_norm = torch.load(run_dirs[4] / "checkpoint_final.pt", weights_only=False)["model"]
    assert any(key.endswith("running_mean") for key in batch_norm)
    narrow = RunSpec.load(run_dirs[3] / "plan.json").configuration.network["features_per_stage"]
    assert narrow[:2] == [8, 16]
    assert RunSpec.load(run_dirs[2] / "plan.json").dropout == 0.2
    assert RunSpec.load(run_dirs[1] / "plan.json").configuration.loss == "dice"


@pytest.mark.slow
def test_same_seed_same_losses_on_cpu(demo):
    first = read_log(train(demo, "xray", run_name="seed_a", seed=3)[0])
    second = read_log(train(demo, "xray", run_name="seed_b", seed=3)[0])
    assert [r["train_loss"] for r in first] == [r["train_loss"] for r in second]


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "autoplan", *map(str, args)], **kwargs)


@pytest.mark.slow
def test_kill_minus_nine_then_resume_loses_at_most_one_epoch(demo):
    folders = demo["folders"]
    args = ["train", "DemoXRay", "--epochs", "6", "--iterations-per-epoch", "4", "--workers", "0",
            "--run-name", "crash", "--device", "cpu", "--raw", folders.raw, "--results", folders.results,
            "--preprocessed", folders.preprocessed]
    run_dir = folders.results / "DemoXRay" / "2d" / "crash" / "fold_0"
    process = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "log.csv").is_file() and len(read_log(run_dir)) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = torch.load(run_dir / "checkpoint_latest.pt", weights_only=True)["epoch"]   # pure data
    assert 1 <= done < 6
    assert process.returncode != 0
    resumed = _cli(*args, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming {run_dir} after epoch {done}" in output
    assert "epoch 6/6: train loss" in output     # one line an epoch, also with no terminal
    rows = read_log(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["epochs_completed"] == 6
    assert run["total_seconds"] >= run["train_seconds"]     # both count the crashed session too
    # a finished fold keeps one full checkpoint (final) and the best weights alone
    assert not (run_dir / "checkpoint_latest.pt").exists()
    assert "optimizer" in torch.load(run_dir / "checkpoint_final.pt", weights_only=True)
    assert set(torch.load(run_dir / "checkpoint_best.pt", weights_only=True)) == {
        "model", "epoch", "best_ema", "best_epoch"}
    again = _cli(*args, "--resume", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and f"resuming {run_dir} after epoch 6" in output, output
    assert [int(r["epoch"]) for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_naming_it(demo, monkeypatch, capsys):
    import autoplan.training
    from autoplan import cli

    def full_disk(state, path):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(autoplan.training.torch, "save", full_disk)
    folders = demo["folders"]
    code = cli.main(["train", "DemoXRay", "--epochs", "2", "--iterations-per-epoch", "2", "--workers", "0",
                     "--run-name", "full-disk", "--device", "cpu", "--raw", str(folders.raw),
                     "--results", str(folders.results), "--preprocessed", str(folders.preprocessed)])
    run_dir = folders.results / "DemoXRay" / "2d" / "full-disk" / "fold_0"
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {run_dir / 'checkpoint_best.pt'}: could not write a checkpoint")
    assert not list(run_dir.glob("*.pt")) and not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_time_budget_is_honoured(demo):
    started = time.monotonic()
    # fp32: bf16's first steps build oneDNN kernels (seconds), which leaves a 24 s budget one epoch
    run_dir, run = train(demo, "xray", epochs=1000, iterations_per_epoch=5, time_budget_minutes=0.4,
                         run_name="budget", precision="fp32")
    elapsed = time.monotonic() - started
    assert run.stopped_by == "time_budget"
    assert elapsed < 0.4 * 60 * 1.25 + 5      # validation and report included
    lrs = [float(r["lr"]) for r in read_log(run_dir)]
    # the schedule follows the budget, not the epoch cap: by epochs alone (k of 1000) the poly
    # schedule would have lowered the rate by under 1 %; how far the clock took it depends on
    # the machine's load, so only the direction and a clear margin are checked
    by_epochs_alone = lrs[0] * (1 - (len(lrs) - 1) / 1000) ** 0.9
    assert len(lrs) >= 2 and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 0.9 * by_epochs_alone


def _train_planned(demo, run_name, **planned):
    """Train the xray demo with the plan's own epochs (no --epochs) under a 5-minute budget."""
    from dataclasses import replace

    plan = pipeline.load_plan(demo["xray"], demo["folders"])
    configuration = replace(plan.configurations["2d"], epochs=2, iterations_per_epoch=2, **planned)
    plan = replace(plan, configurations={**plan.configurations, "2d": configuration})
    options = TrainOptions(**{**TINY, "epochs": None, "iterations_per_epoch": None},
                           time_budget_minutes=5, run_name=run_name)
    return pipeline.train(demo["xray"], demo["folders"], options, plan_result=plan)[0]


@pytest.mark.slow
def test_a_faster_machine_than_planned_uses_the_budget_up_to_the_headroom(demo):
    from autoplan.training import EPOCH_HEADROOM

    # planned at 60 s per iteration, two epochs fill the budget; the machine is far faster
    run = _train_planned(demo, "headroom", expected_seconds_per_iteration=60.0)
    assert run.epochs_completed == int(np.ceil(2 * EPOCH_HEADROOM)) == 3
    assert run.stopped_by == "epochs"
    lrs = [float(r["lr"]) for r in read_log(Path(run.run_dir))]
    assert lrs[-1] < lrs[0]


@pytest.mark.slow
def test_epochs_capped_below_the_budget_stay_as_planned(demo):
    # planned at 0.1 s per iteration, two epochs take seconds: a maximum capped them, not the budget
    run = _train_planned(demo, "capped", expected_seconds_per_iteration=0.1)
    assert run.epochs_completed == 2


def test_two_cores_keep_classifier_augmentation_in_process(monkeypatch):
    from autoplan.tasks import _default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert (_default_workers("classification"), _default_workers("segmentation")) == (0, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert (_default_workers("classification"), _default_workers("segmentation")) == (2, 2)


@pytest.mark.slow
def test_classification_runs_through_the_same_loop(demo):
    run_dir, run = train(demo, "derm", epochs=2, iterations_per_epoch=4, loss="ce_focal", run_name="cls")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task_type"] == "classification" and metrics["classes"] == ["blob", "ring", "speckle"]
    assert (run_dir / "gradcam.png").is_file() and (run_dir / "roc.png").is_file()
    assert "val_balanced_accuracy" in read_log(run_dir)[0]
    assert run.precision == resolve_precision(RunSpec.load(run_dir / "plan.json").configuration.precision, "cpu")


@pytest.mark.slow
def test_curves_are_redrawn_by_the_clock_not_every_epoch(demo, monkeypatch):
    """Drawing curves.png costs ~0.4 s: a short run draws it once (in its report), and only a
    run past CURVES_EVERY_SECONDS redraws it between epochs."""
    import autoplan.report
    import autoplan.training

    drawn = []
    draw = autoplan.report.plot_learning_curves
    monkeypatch.setattr(autoplan.report, "plot_learning_curves", lambda *a: drawn.append(a) or draw(*a))
    # an hour, not the minute: on a loaded machine three tiny epochs can pass 60 s (a guess at
    # the one failure of this test, never reproduced), and the clock is not what this half tests
    monkeypatch.setattr(autoplan.training, "CURVES_EVERY_SECONDS", 3600.0)
    run_dir, _ = train(demo, "derm", epochs=3, iterations_per_epoch=2, run_name="curves-by-clock")
    assert drawn == [], drawn                                      # the report draws its own
    assert (run_dir / "curves.png").is_file()
    monkeypatch.setattr(autoplan.training, "CURVES_EVERY_SECONDS", 0.0)
    train(demo, "derm", epochs=3, iterations_per_epoch=2, run_name="curves-every-epoch")
    assert len(drawn) == 3, drawn


@pytest.mark.slow
def test_precision_option_overrides_the_plan_and_names_the_run(demo):
    run_dir, run = train(demo, "derm", epochs=1, iterations_per_epoch=2, precision="fp32")
    assert run_dir.parent.name.endswith("-fp32") and run.precision == "fp32"
    assert RunSpec.load(run_dir / "plan.json").configuration.precision == "fp32"
    assert "precision" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_label_smoothing_reaches_the_classification_loss(demo):
    from autoplan.tasks import make_task

    run_dir, _ = train(demo, "derm", epochs=1, iterations_per_epoch=2, label_smoothing=0.1)
    assert "-ls0.1" in run_dir.parent.name
    spec = RunSpec.load(run_dir / "plan.json")
    assert spec.options.label_smoothing == 0.1
    folders = demo["folders"]
    split = json.loads((folders.results / "DemoDerm" / "splits.json").read_text())[0]
    task = make_task(spec, folders.preprocessed / "DemoDerm" / "classifier", split, demo["derm"], n_workers=0)
    assert task.build_loss().label_smoothing == 0.1


@pytest.mark.slow
def test_torchrun_two_gloo_processes_stay_in_sync(demo):
    folders = demo["folders"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               "29531", "-m", "autoplan", "train", "DemoXRay", "--epochs", "2", "--iterations-per-epoch", "3",
               "--workers", "0", "--run-name", "ddp", "--device", "cpu", "--raw", str(folders.raw),
               "--results", str(folders.results), "--preprocessed", str(folders.preprocessed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = list((folders.results / "DemoXRay" / "2d").glob("ddp*"))
    assert len(runs) == 1
    run = json.loads((runs[0] / "fold_0" / "run.json").read_text())
    assert run["world_size"] == 2
    assert run["parameter_checksums"][0] == pytest.approx(run["parameter_checksums"][1], rel=0, abs=0)


@pytest.mark.slow
@pytest.mark.realdata
def test_jsrt_training_lowers_the_loss_and_segments_the_lungs(jsrt_trained):
    """40 real chest X-rays, 90 s of CPU (the session's shared run): the loss falls and lung
    Dice exceeds 0.8."""
    assert jsrt_trained["dataset"].labels == {"background": 0, "lung": 1, "heart": 2}
    run_dir = jsrt_trained["run_dir"]
    losses = [float(r["train_loss"]) for r in read_log(run_dir)]
    assert losses[-1] < losses[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mean"]["1"]["dice"] > 0.8, metrics["mean"]


@pytest.mark.slow
@pytest.mark.realdata
def test_ham10000_training_beats_the_majority_class(tmp_path):
    """A few hundred real dermoscopy images: the loss falls, balanced accuracy beats 1/7."""
    import csv as csv_module

    root = shared_dataset("ham10000")
    with open(root / "HAM10000_metadata.csv") as handle:
        rows = list(csv_module.DictReader(handle))
    rng = np.random.default_rng(0)
    chosen = []
    for label in sorted({r["dx"] for r in rows}):
        of_class = [r for r in rows if r["dx"] == label]
        chosen += [of_class[i] for i in rng.permutation(len(of_class))[:50]]
    images = tmp_path / "images"
    images.mkdir()
    for row in chosen:
        (images / f"{row['image_id']}.jpg").symlink_to(root / "images" / f"{row['image_id']}.jpg")
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as handle:
        writer = csv_module.DictWriter(handle, fieldnames=["image_id", "dx", "lesion_id"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("image_id", "dx", "lesion_id")} for r in chosen)
    folders = resolve_folders(tmp_path / "raw", tmp_path / "pre", tmp_path / "results")
    dataset = import_dataset("TaskDerm", images, folders.raw, labels_csv=table, id_column="image_id",
                             label_column="dx", group_column="lesion_id", quiet=True)
    pipeline.plan(dataset, folders, time_budget_minutes=1.5)
    runs = pipeline.train(dataset, folders, TrainOptions(time_budget_minutes=1.5, device="cpu"))
    run_dir = Path(runs[0].run_dir)
    losses = [float(r["train_loss"]) for r in read_log(run_dir)]
    assert losses[-1] < losses[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["balanced_accuracy"] > 1 / 7 + 0.1, metrics["balanced_accuracy"]


@pytest.mark.slow
def test_sweep_trains_every_combination_and_compares(demo, capsys):
    from autoplan.cli import main

    folders = demo["folders"]
    # --overwrite: the ablation test above trained the same `ce` run in this shared folder
    code = main(["sweep", "DemoXRay", "--loss", "ce,dice", "--epochs", "1", "--iterations-per-epoch", "2",
                 "--overwrite",
                 "--workers", "0", "--device", "cpu", "--raw", str(folders.raw), "--results", str(folders.results),
                 "--preprocessed", str(folders.preprocessed)])
    assert code == 0
    table = (folders.results / "DemoXRay" / "sweep" / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 4                 # header, rule, one row per loss
    assert "loss" in rows[0] and "ce" in rows[2] and "dice" in rows[3]
    assert (folders.results / "DemoXRay" / "sweep" / "curves.png").is_file()


def test_per_epoch_classification_check_caps_each_class():
    from types import SimpleNamespace

    from autoplan.tasks import EPOCH_VALIDATION_PER_CLASS, ClassificationTask

    labels = np.array([0] * 500 + [1] * 30 + [2] * 150)
    task = SimpleNamespace(labels=labels, val_indices=np.arange(len(labels)))
    chosen = ClassificationTask.epoch_val_indices.fget(task)
    counts = np.bincount(labels[chosen])
    assert counts.tolist() == [EPOCH_VALIDATION_PER_CLASS, 30, EPOCH_VALIDATION_PER_CLASS]
    assert np.array_equal(chosen, ClassificationTask.epoch_val_indices.fget(task))   # fixed subset
