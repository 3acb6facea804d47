"""One training loop for segmentation and classification (the task object holds the differences).

Schedules are *progress*-based: progress is the larger of the epoch fraction and the
elapsed fraction of the time budget, so the learning rate reaches its floor when the
budget runs out even if the machine is slower than the planner expected.
"""

import csv
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from autoplan import distributed
from autoplan.datasets import Dataset
from autoplan.errors import InputError
from autoplan.evaluation import headline_metrics
from autoplan.fingerprint import Fingerprint
from autoplan.jsonio import JsonDataclass, atomic_torch_save, atomic_write_text, to_jsonable
from autoplan.parallel import progress_enabled
from autoplan.paths import Folders
from autoplan.nets import autocast, memory_format, resolve_precision
from autoplan.artifacts import Configuration, Plan
from autoplan.planning.classification import imbalance_with_strategy
from autoplan.planning.schedule import epochs_fill_budget, final_validation_seconds, training_seconds
from autoplan.planning.topology import MAX_FEATURES
from autoplan.qc import qc_reference
from autoplan.recipe import TrainStep, build_optimizer
from autoplan.runs import (RunSpec, TrainOptions, load_checkpoint, resume_checkpoint, run_name,
                          unused_imbalance_option)
from autoplan.splits import load_or_create_splits
from autoplan.tasks import make_task

EMA_DECAY = 0.9          # nnU-Net smooths the pseudo-Dice before picking the best checkpoint
# Where the time budget set the plan's epoch count, that count comes from a probe of a machine
# whose speed drifts (+-20 % between days on the shared 2-core box). The run may then train up to
# this many times the planned epochs, its schedule following the clock, so a faster machine uses
# the budget instead of stopping early. Epochs capped by a maximum, or set with --epochs, stay.
EPOCH_HEADROOM = 1.5
# curves.png is redrawn after an epoch only when this long has passed since its last drawing (the
# report draws it once more at the end). Drawing takes ~0.4 s on 2 cores: every epoch, that was 5 %
# of a 30-minute HAM10000 run's budget (220 epochs of ~7.6 s).
CURVES_EVERY_SECONDS = 60.0


@dataclass
class Run(JsonDataclass):
    """What one trained fold produced (run.json in the fold folder)."""

    run_dir: str
    dataset: str
    configuration: str
    fold: int
    epochs_completed: int
    iterations: int
    best_epoch: int
    best_ema_metric: float
    train_seconds: float
    total_seconds: float
    stopped_by: str               # 'epochs' | 'time_budget'
    headline: dict                # the metrics a reader looks at first
    world_size: int = 1           # processes under torchrun
    parameter_checksums: list = None   # one per process: equal when they stayed in sync
    # CUDA only: the planner's estimate next to torch's measured peak (both without the CUDA
    # context), so every GPU run checks the memory model that chose its batch size
    estimated_memory_gb: float | None = None
    peak_gpu_memory_gb: float | None = None
    precision: str = ""           # the autocast precision training ran with (fp32 | bf16 | fp16)


# --------------------------------------------------------------------------------------
# options → effective configuration and run name
# --------------------------------------------------------------------------------------
def effective_configuration(configuration: Configuration, options: TrainOptions) -> Configuration:
    """The plan's configuration with the user's overrides applied."""
    changes = {}
    network = dict(configuration.network)
    if options.base_features:
        if configuration.is_classifier:
            network["width"] = int(options.base_features)
        else:
            cap = MAX_FEATURES[configuration.dim]
            network["features_per_stage"] = [min(options.base_features * 2**i, cap)
                                             for i in range(network["n_stages"])]
    changes["network"] = network
    for field_name in ("loss", "optimizer", "augment", "batch_size", "epochs", "iterations_per_epoch",
                       "precision"):
        value = getattr(options, field_name)
        if value is not None:
            changes[field_name] = value
    if options.imbalance and configuration.is_classifier:
        changes["imbalance"] = imbalance_with_strategy(configuration.imbalance or {}, options.imbalance)
    if options.lr is not None:
        changes["lr"] = options.lr
    elif options.optimizer and options.optimizer != configuration.optimizer:
        changes["lr"] = 1e-2 if options.optimizer == "sgd" else 1e-3
    return replace(configuration, **changes)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
def train(dataset: Dataset, plan: Plan, options: TrainOptions, folders: Folders) -> list:
    """Train the requested fold(s); returns one :class:`Run` per fold."""
    from autoplan.preprocessing import preprocess_dataset

    configuration_name = options.configuration or plan.default_configuration
    if configuration_name not in plan.configurations:
        raise InputError(None, f"configuration {configuration_name!r} is not in plans.json of {dataset.name} "
                               f"(it has {', '.join(plan.configurations)})")
    distributed.setup(_pick_device(options.device).type)
    if not distributed.is_main():
        distributed.barrier()          # rank 0 preprocesses and splits first; the others then reuse it
    splits = load_or_create_splits(dataset, folders.results)
    folds = folds_to_train(options.fold, len(splits))   # before preprocessing: a typo costs nothing
    if options.init_from:
        from autoplan.finetune import source_spec

        source_spec(options.init_from)     # a missing or unreadable source fails before preprocessing too
    configuration, previous_stage = plan.configurations[configuration_name], None
    if configuration.previous_stage:      # a cascade trains on its first stage's out-of-fold predictions
        from autoplan.inference.cascade import previous_stage_inputs

        configuration, previous_stage = previous_stage_inputs(dataset, configuration, folders.results, splits)
    refuse_earlier_runs(dataset, configuration, options, folders, folds)
    if unused := unused_imbalance_option(configuration, options):
        print(unused)
    plan = replace(plan, configurations={**plan.configurations, configuration_name: configuration})
    preprocessed_dir = preprocess_dataset(dataset, plan, configuration_name, folders.preprocessed,
                                          n_jobs=options.n_jobs, previous_stage=previous_stage)
    if distributed.is_main():
        distributed.barrier()
    return [train_fold(dataset, configuration, options, folders, preprocessed_dir, splits[fold], fold)
            for fold in folds]


def folds_to_train(fold: str, n_folds: int) -> list:
    """The fold indices ``--fold`` names: 'all', or one of 0 .. n_folds - 1."""
    if str(fold) == "all":
        return list(range(n_folds))
    if not str(fold).isdigit() or int(fold) >= n_folds:
        raise InputError(None, f"--fold {fold!r}: choose 'all' or a fold from 0 to {n_folds - 1}")
    return [int(fold)]


def run_folder(dataset, configuration, options, folders, fold) -> Path:
    """RESULTS/NAME/CFG/RUN_NAME/fold_K of ``configuration`` (already adjusted by the options)."""
    name = run_name(options, configuration, options.norm or "instance")
    return folders.results / dataset.name / configuration.name / name / f"fold_{fold}"


def refuse_earlier_runs(dataset, configuration, options, folders, folds) -> None:
    """A fold folder that already holds a run is neither mixed with a new one nor silently
    replaced: --resume continues it, --overwrite replaces it whole."""
    if options.resume or options.overwrite:
        return
    configuration = effective_configuration(configuration, options)
    for fold in folds:
        run_dir = run_folder(dataset, configuration, options, folders, fold)
        if (run_dir / "plan.json").is_file() or (run_dir / "log.csv").is_file():
            raise InputError(run_dir, "holds an earlier run: add --resume to continue it, --overwrite to "
                                      "replace it, or --run-name for a new one")


def _pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _gpu_memory(device, configuration) -> dict:
    if device.type != "cuda":
        return {}
    from autoplan.planning import CUDA_CONTEXT_GB, estimate_training_memory_gb

    return {"estimated_memory_gb": round(estimate_training_memory_gb(configuration) - CUDA_CONTEXT_GB, 3),
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)}


def _numpy_rng_state() -> list:
    """NumPy's global RNG state as plain values and a tensor, so checkpoints load as data."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _numpy_rng_from(state) -> tuple:
    name, keys, position, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(position), int(has_gauss), float(cached)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_fold(dataset, configuration, options, folders, preprocessed_dir, split, fold) -> Run:
    started = time.monotonic()
    device = distributed.setup(_pick_device(options.device).type)
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    configuration = effective_configuration(configuration, options)
    norm = options.norm or "instance"
    run_dir = run_folder(dataset, configuration, options, folders, fold)
    if options.overwrite and not options.resume and distributed.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)   # the whole earlier run, not a mix of two
    spec = RunSpec(dataset=dataset.name, task_type=dataset.task_type, fold=fold,
                   configuration=configuration, options=options, labels=dataset.labels,
                   classes=dataset.classes, channel_names=dataset.channel_names,
                   file_ending=dataset.file_ending, norm=norm, dropout=options.dropout,
                   qc_reference=_qc_reference(folders, dataset, configuration))
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        spec.save(run_dir / "plan.json")
    _seed_everything(options.seed + fold)
    task = make_task(spec, preprocessed_dir, split, dataset, options.n_workers)
    loop = TrainingLoop(task, spec, run_dir, device, options.time_budget_minutes, started)
    loop.fit(resume=options.resume)
    checksums = distributed.parameter_checksums(loop.network)
    metrics = loop.finish() if distributed.is_main() else {}
    distributed.barrier()
    run = Run(run_dir=str(run_dir), dataset=dataset.name, configuration=configuration.name, fold=fold,
              epochs_completed=loop.epoch, iterations=loop.iterations, best_epoch=loop.best_epoch,
              best_ema_metric=loop.best_ema, train_seconds=loop.train_seconds,
              # loop.started moved back by the elapsed time of a resumed run's earlier sessions
              total_seconds=time.monotonic() - loop.started, stopped_by=loop.stopped_by,
              headline=headline_metrics(metrics) if metrics else {},
              world_size=distributed.world_size(), parameter_checksums=checksums, precision=loop.precision,
              **_gpu_memory(device, configuration))
    if distributed.is_main():
        run.save(run_dir / "run.json")
    return run


def _qc_reference(folders, dataset, configuration) -> dict:
    """What prediction compares new cases with (autoplan.qc), from the dataset's fingerprint;
    empty when there is none readable (the run then predicts without quality flags)."""
    path = folders.results / dataset.name / "fingerprint.json"
    try:
        fingerprint = Fingerprint.load(path)
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    return qc_reference(fingerprint, configuration).to_dict()


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
class TrainingLoop:
    def __init__(self, task, spec: RunSpec, run_dir: Path, device, time_budget_minutes, started):
        self.task, self.spec, self.run_dir, self.device = task, spec, Path(run_dir), device
        self.configuration = spec.configuration
        self.memory_format = memory_format(self.configuration.dim)
        network = task.build_network().to(device, memory_format=self.memory_format)
        self.network = distributed.wrap(network, device)
        self.loss = task.build_loss().to(device)
        self.optimizer = build_optimizer(self.configuration.optimizer, self.network.parameters(),
                                         self.configuration.lr, spec.task_type)
        self.precision = resolve_precision(self.configuration.precision, device.type)
        self.step = TrainStep(self.network, self.loss, self.optimizer, device.type, self.precision)
        self.started = started
        self.deadline = None if not time_budget_minutes else started + 60 * time_budget_minutes
        self.max_epochs = self.configuration.epochs
        if not spec.options.epochs and epochs_fill_budget(self.configuration, time_budget_minutes,
                                                          self.reserve_seconds()):
            self.max_epochs = math.ceil(self.configuration.epochs * EPOCH_HEADROOM)
        self.epoch, self.iterations, self.train_seconds = 0, 0, 0.0
        self.ema, self.best_ema, self.best_epoch = None, -math.inf, 0
        self.stopped_by = "epochs"
        self.log_path = self.run_dir / "log.csv"
        self._curves_drawn_at = time.monotonic()

    # -- optimiser and schedule -------------------------------------------------------------
    def progress(self) -> float:
        fraction = self.epoch / max(1, self.max_epochs)
        if self.deadline is not None:
            available = self.deadline - self.started - self.reserve_seconds()
            fraction = max(fraction, (time.monotonic() - self.started) / max(1.0, available))
        return min(1.0, fraction)

    def learning_rate(self) -> float:
        base, progress = self.configuration.lr, self.progress()
        if self.configuration.optimizer == "sgd":
            return base * (1 - progress) ** 0.9            # nnU-Net's poly schedule
        warmup = 0.05                                      # Adam(W): linear warm-up, then cosine
        if progress < warmup:
            return base * max(progress / warmup, 0.05)
        return base * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))

    def reserve_seconds(self) -> float:
        """Time kept back for final validation and the report: the planner's model
        (``planning.schedule.final_validation_seconds``) for this fold's validation cases."""
        if not hasattr(self, "_reserve"):
            budget = (self.deadline - self.started) / 60 if self.deadline is not None else None
            reserve = final_validation_seconds(self.configuration, len(self.task.split["val"]), self.device.type)
            self._reserve = budget * 60 - training_seconds(budget, reserve) if budget else reserve
        return self._reserve

    # -- epochs -------------------------------------------------------------------------------
    def fit(self, resume=False):
        if resume:
            self._load_latest()
        elif distributed.is_main():
            self._write_log_header()
        seed = self.spec.options.seed * 1000 + self.spec.fold * 100 + self.epoch + 7919 * distributed.rank()
        with self.task.train_loader(seed) as train_batches:
            while self.epoch < self.max_epochs:
                # the first epoch always starts (and stops after a few steps if the budget is
                # already spent): reporting an untrained network would be worse than a small overrun
                if self.epoch > 0 and distributed.agree(self._out_of_time()):
                    self.stopped_by = "time_budget"
                    break
                epoch_started = time.monotonic()
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate()
                train_loss = self._train_epoch(train_batches)
                val_loss, scores = self._validate_epoch()
                self.epoch += 1
                self._epoch_seconds = time.monotonic() - epoch_started
                self.train_seconds += self._epoch_seconds
                self._after_epoch(train_loss, val_loss, scores)

    def _budget_spent(self) -> bool:
        return self.deadline is not None and time.monotonic() + self.reserve_seconds() > self.deadline

    def _out_of_time(self) -> bool:
        if self.deadline is None:
            return False
        return time.monotonic() + getattr(self, "_epoch_seconds", 0.0) + self.reserve_seconds() > self.deadline

    def _train_epoch(self, batches) -> float:
        from tqdm.auto import tqdm

        self.network.train()
        losses = []
        steps = range(self.configuration.iterations_per_epoch)
        for step in tqdm(steps, desc=f"epoch {self.epoch}", leave=False, disable=not progress_enabled()):
            if step and step % 5 == 0 and distributed.agree(self._budget_spent()):
                break           # a slower machine than planned: end the epoch, keep the budget
            data, target = self.task.to_device(next(batches), self.device)
            data = data.contiguous(memory_format=self.memory_format)
            losses.append(self.step(data, target).item())
            self.iterations += 1
        return float(np.mean(losses))

    @torch.no_grad()
    def _validate_epoch(self):
        self.network.eval()
        tally, losses = self.task.new_tally(), []
        n_batches = self.configuration.val_iterations_per_epoch or 5
        with self.task.val_loader(seed=1234) as batches:
            for i, batch in enumerate(batches):
                if self.spec.task_type == "segmentation" and i >= n_batches:
                    break
                data, target = self.task.to_device(batch, self.device)
                with autocast(self.device.type, self.precision):
                    outputs = self.network(data)
                    losses.append(self.task.validation_loss(outputs, target).item())
                self.task.tally(tally, outputs, target)
        return float(np.mean(losses)) if losses else float("nan"), self.task.scores(tally)

    def _after_epoch(self, train_loss, val_loss, scores):
        if not distributed.is_main():
            return
        metric = scores[f"val_{self.task.metric}"]
        self.ema = metric if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * metric
        row = {"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss, **scores,
               f"ema_{self.task.metric}": self.ema, "lr": self.optimizer.param_groups[0]["lr"],
               "seconds": round(self._epoch_seconds, 2)}
        self._append_log(row)
        self._print_epoch(train_loss, val_loss, metric)
        if self.ema > self.best_ema:
            self.best_ema, self.best_epoch = self.ema, self.epoch
            self._save_checkpoint("checkpoint_best.pt", self._weights())
        self._save_checkpoint("checkpoint_latest.pt", self._state())   # after best: resume never loses a best
        if time.monotonic() - self._curves_drawn_at >= CURVES_EVERY_SECONDS:
            self._draw_curves()

    def _draw_curves(self):
        from autoplan.report import plot_learning_curves

        try:
            plot_learning_curves(self.log_path, self.run_dir / "curves.png")
        except Exception as error:  # a plotting failure must not kill a training run
            print(f"warning: could not draw curves.png: {error}")
        self._curves_drawn_at = time.monotonic()

    def _print_epoch(self, train_loss, val_loss, metric):
        """One line per epoch, as nnU-Net prints: with no terminal (nohup, SLURM, CI) the bars
        are off and this is what shows a long run is alive."""
        from tqdm.auto import tqdm

        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
        else:
            left = (self.max_epochs - self.epoch) * self._epoch_seconds
        tqdm.write(f"epoch {self.epoch}/{self.max_epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                   f"val {self.task.metric} {metric:.4f}, {self._epoch_seconds:.0f} s, "
                   f"about {left / 60:.1f} min left", file=sys.stdout)
        sys.stdout.flush()

    # -- log and checkpoints --------------------------------------------------------------------
    def _write_log_header(self):
        self.log_path.unlink(missing_ok=True)

    def _append_log(self, row: dict):
        rows = _read_log(self.log_path)[: self.epoch - 1] + [row]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(fields)] + [",".join(_csv_value(r.get(k)) for k in fields) for r in rows]
        atomic_write_text(self.log_path, "\n".join(lines) + "\n")

    def _state(self) -> dict:
        return {"model": distributed.unwrap(self.network).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.step.scaler.state_dict(), "epoch": self.epoch, "iterations": self.iterations,
                "train_seconds": self.train_seconds, "ema": self.ema, "best_ema": self.best_ema,
                "best_epoch": self.best_epoch, "elapsed": time.monotonic() - self.started,
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(),
                        "python": random.getstate()}}

    def _weights(self) -> dict:
        """What predicting and fine-tuning read: the weights and when they were best. Adam's
        two moments would triple the file, and only resuming needs them."""
        return {"model": distributed.unwrap(self.network).state_dict(), "epoch": self.epoch,
                "best_ema": self.best_ema, "best_epoch": self.best_epoch}

    def _save_checkpoint(self, name: str, state: dict):
        atomic_torch_save(self.run_dir / name, state)

    def _load_latest(self):
        path = resume_checkpoint(self.run_dir)
        if path is None:
            print(f"no checkpoint_latest.pt or checkpoint_final.pt in {self.run_dir}: starting from scratch")
            self._write_log_header()
            return
        state = load_checkpoint(path, self.device)
        distributed.unwrap(self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iterations = state["epoch"], state["iterations"]
        self.train_seconds, self.ema = state["train_seconds"], state["ema"]
        self.best_ema, self.best_epoch = state["best_ema"], state["best_epoch"]
        # the time budget continues where the crashed run left it
        self.started -= state["elapsed"]
        if self.deadline is not None:
            self.deadline -= state["elapsed"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(_numpy_rng_from(state["rng"]["numpy"]))
        random.setstate(state["rng"]["python"])
        print(f"resuming {self.run_dir} after epoch {self.epoch}")

    def finish(self) -> dict:
        """Final checkpoint, best weights back in, full validation, metrics.json and report.

        The final checkpoint keeps the whole training state, so it replaces checkpoint_latest.pt
        (as nnU-Net does): a finished fold holds one full checkpoint, not two."""
        self._save_checkpoint("checkpoint_final.pt", self._state())
        (self.run_dir / "checkpoint_latest.pt").unlink(missing_ok=True)
        best = self.run_dir / "checkpoint_best.pt"
        if best.is_file():
            distributed.unwrap(self.network).load_state_dict(
                load_checkpoint(best, self.device)["model"])
        run_info = {"dataset": self.spec.dataset, "configuration": to_jsonable(self.configuration),
                    "options": to_jsonable(self.spec.options), "fold": self.spec.fold,
                    "device": str(self.device), "precision": self.precision, "epochs_completed": self.epoch,
                    "iterations": self.iterations, "best_epoch": self.best_epoch,
                    "train_minutes": round(self.train_seconds / 60, 2), "stopped_by": self.stopped_by,
                    "citations": self.task.dataset.description.get("citation")}
        return self.task.final_validation(distributed.unwrap(self.network), self.run_dir, self.device, run_info)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _read_log(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
