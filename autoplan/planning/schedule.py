"""From seconds per iteration and a time budget to a schedule (epochs x iterations), and the
CPU candidates a planner compares by the schedule each could run."""

from dataclasses import dataclass

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.planning.cost import base_width
from autoplan.planning.probe import SpeedModel

GPU_DEFAULT_EPOCHS = 1000           # nnU-Net's schedule
GPU_ITERATIONS_PER_EPOCH = 250
GPU_VAL_ITERATIONS = 50
CPU_ITERATIONS_PER_EPOCH = 50       # short epochs on CPU: frequent checkpoints and curves
CPU_VAL_ITERATIONS = 5
MIN_EPOCHS = 10                     # a time budget is cut into at least this many epochs
CPU_DEFAULT_BUDGET_MINUTES = 60.0   # CPU plan without a budget: the plan for 60 minutes
VAL_ITERATION_COST = 0.35           # a validation iteration (forward only) vs a training one
# Work every epoch does besides its iterations: the per-epoch validation loader, checkpoint_best
# and checkpoint_latest, log.csv and curves.png (0.25 s). Measured on 2 cores with JSRT 2d (width
# 8, batch 2): epochs of 10 and 50 iterations took 4.7 and 14.3 s, an intercept of 2.4 s, of which
# the 5 validation iterations are 0.3 s. Small networks have short epochs, where this is a fifth.
EPOCH_FIXED_SECONDS = 2.0
# Measured training steps cost more than the probe's: batches come from the loader (a worker
# process competing for the same cores, or in-process augmentation for classifiers), are moved
# and their deep-supervision targets downsampled. Since the probe times training's own step
# (autoplan.recipe.TrainStep), these factors hold loading alone; re-derived in issue 25 as
# (epoch seconds - EPOCH_FIXED_SECONDS) / (probe seconds x (iterations + 0.35 x validation
# iterations)) on 2 cores. U-Nets: JSRT 2d 0.70 and 1.06 (width 16, two days), 1.22-1.47 (width
# 8, against two probes of the same network): median 1.14, kept at 1.15. Classifiers:
# HAM10000 96x128 1.24, 128x160 1.08, 64x96 0.78: median 1.08 (was 1.3 before the fixed
# per-epoch cost was counted apart). The spread is the machine's: the learning-rate schedule
# follows elapsed time and the loop may run EPOCH_HEADROOM x the planned epochs.
CPU_LOADER_OVERHEAD = 1.15
CLASSIFIER_CPU_LOADER_OVERHEAD = 1.1
# The time a run keeps back for its final validation and report (the planner plans with it and
# the training loop stops by it): a fixed part, then per validation case the sliding windows of
# its median image with mirroring, each window a forward pass (VAL_ITERATION_COST of a training
# iteration per sample), plus reading, resampling back and metrics.
RESERVE_BASE_SECONDS = 10.0
RESERVE_CASE_FLOOR_SECONDS = 0.6
RESERVE_CLASSIFIER_SECONDS_PER_CASE = 0.02   # one forward pass of a small image, batched
RESERVE_UNMEASURED_SECONDS_PER_CASE = {2: 0.7, 3: 1.5}   # GPU, or no planned speed to cost windows by
RESERVE_MAX_FRACTION = 0.5          # never more than half the budget
MIN_ITERATIONS = 500                # fewer optimiser steps than this barely trains a U-Net
SAME_DATA_FRACTION = 0.85           # candidates seeing this share of the most data count as equal
TRAIN_FRACTION = 0.8                # 5-fold cross-validation trains on 4/5 of the cases


@dataclass
class Schedule:
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    seconds_per_iteration: float       # including data loading overhead on CPU
    training_seconds: float            # usable for training (budget minus the reserve)

    @property
    def iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch


def final_validation_seconds(configuration: Configuration, n_val_cases: int, device: str,
                             seconds_per_iteration: float | None = None) -> float:
    """Seconds to keep back for the final validation of ``n_val_cases`` and the report.

    ``seconds_per_iteration`` defaults to the configuration's planned figure; the planner
    passes each candidate's own. See RESERVE_* above for the model.
    """
    seconds = seconds_per_iteration or configuration.expected_seconds_per_iteration
    if configuration.is_classifier:
        per_case = RESERVE_CLASSIFIER_SECONDS_PER_CASE
    elif not (seconds and device == "cpu"):
        per_case = RESERVE_UNMEASURED_SECONDS_PER_CASE.get(configuration.dim, 0.7)
    else:
        from autoplan.inference.sliding_window import sliding_window_starts

        patch = configuration.patch_size
        median = configuration.median_image_size or patch
        starts = sliding_window_starts([max(m, p) for m, p in zip(median, patch)], patch)
        windows = int(np.prod([len(s) for s in starts]))
        mirrored = configuration.mirror_axes if configuration.mirror_axes is not None else range(len(patch))
        forward = VAL_ITERATION_COST * seconds / configuration.batch_size
        per_case = RESERVE_CASE_FLOOR_SECONDS + windows * 2 ** len(list(mirrored)) * forward
    return RESERVE_BASE_SECONDS + n_val_cases * per_case


def training_seconds(budget_minutes: float, reserve_seconds: float) -> float:
    """The part of the budget left for training after the final-validation reserve."""
    budget = budget_minutes * 60.0
    return budget - min(reserve_seconds, RESERVE_MAX_FRACTION * budget)


def epoch_seconds(seconds_per_iteration: float, iterations_per_epoch: int, val_iterations_per_epoch: int) -> float:
    """Planned seconds of one epoch: its training iterations, the per-epoch check's and the
    epoch's fixed work (checkpoints, log, curves)."""
    return (seconds_per_iteration * (iterations_per_epoch + VAL_ITERATION_COST * val_iterations_per_epoch)
            + EPOCH_FIXED_SECONDS)


def fit_schedule(seconds_per_iteration: float, budget_minutes: float, iterations_per_epoch: int,
                 val_iterations_per_epoch: int, reserve_seconds: float, max_epochs: int | None = None) -> Schedule:
    """Epochs of ``iterations_per_epoch`` that fit the budget less ``reserve_seconds``."""
    usable = training_seconds(budget_minutes, reserve_seconds)
    seconds_per_epoch = epoch_seconds(seconds_per_iteration, iterations_per_epoch, val_iterations_per_epoch)
    if usable < MIN_EPOCHS * seconds_per_epoch:
        # short budgets: shorter epochs, so the curves, the best-checkpoint choice and the
        # stopping decision still have several epochs to work with
        iterations_per_epoch = max(2, int((usable / MIN_EPOCHS - EPOCH_FIXED_SECONDS) / seconds_per_iteration
                                          - VAL_ITERATION_COST * val_iterations_per_epoch))
        seconds_per_epoch = epoch_seconds(seconds_per_iteration, iterations_per_epoch, val_iterations_per_epoch)
    epochs = max(1, int(usable // seconds_per_epoch))
    if max_epochs is not None:
        epochs = min(epochs, max_epochs)
    return Schedule(epochs, iterations_per_epoch, val_iterations_per_epoch, seconds_per_iteration, usable)


def epochs_fill_budget(configuration: Configuration, budget_minutes: float | None, reserve_seconds: float) -> bool:
    """Whether ``budget_minutes`` is what limits the configuration's epochs (one more planned
    epoch would not fit, as in ``fit_schedule``), rather than a maximum or a longer budget."""
    seconds = configuration.expected_seconds_per_iteration
    if not budget_minutes or not seconds:
        return False
    per_epoch = epoch_seconds(seconds, configuration.iterations_per_epoch,
                              configuration.val_iterations_per_epoch or 0)
    return (configuration.epochs + 1) * per_epoch > training_seconds(budget_minutes, reserve_seconds)


def loader_overhead(configuration: Configuration, device: str) -> float:
    if device != "cpu":
        return 1.0
    return CLASSIFIER_CPU_LOADER_OVERHEAD if configuration.is_classifier else CPU_LOADER_OVERHEAD


def with_loading(seconds: float, configuration: Configuration, device: str) -> float:
    return seconds * loader_overhead(configuration, device)


@dataclass
class PlanningContext:
    """What every configuration of one plan is planned for."""

    device: str                        # 'cpu' | 'cuda'
    budget_gb: float | None            # GPU memory (None on CPU)
    budget_minutes: float | None       # time budget (a CPU plan without one: the default budget)
    assumed_budget: bool               # the CPU default, not the user's
    speed: SpeedModel
    n_val_cases: int = 0               # validation cases of one fold (final-validation reserve)

    def reserve_seconds(self, configuration: Configuration, seconds_per_iteration: float) -> float:
        return final_validation_seconds(configuration, self.n_val_cases, self.device, seconds_per_iteration)


@dataclass
class Candidate:
    configuration: Configuration
    schedule: Schedule
    epochs_seen: float


def _cpu_candidate(configuration: Configuration, seconds: float, context: PlanningContext,
                   train_samples: float, sample_size: float, val_iterations: int) -> Candidate:
    schedule = fit_schedule(seconds, context.budget_minutes, CPU_ITERATIONS_PER_EPOCH, val_iterations,
                            context.reserve_seconds(configuration, seconds))
    seen = schedule.iterations * configuration.batch_size * sample_size / train_samples
    return Candidate(configuration, schedule, seen)


def evaluate_candidate(configuration: Configuration, context: PlanningContext, train_samples: float,
                       sample_size: float, val_iterations: int = CPU_VAL_ITERATIONS) -> Candidate:
    """A CPU candidate with the schedule its (scaled) speed allows in the budget."""
    seconds = with_loading(context.speed.seconds(configuration), configuration, context.device)
    return _cpu_candidate(configuration, seconds, context, train_samples, sample_size, val_iterations)


def finalise_candidate(candidate: Candidate, context: PlanningContext, train_samples: float, sample_size: float,
                       val_iterations: int = CPU_VAL_ITERATIONS) -> Candidate:
    """Measure the chosen candidate itself (probe) and fit the schedule to that figure."""
    config = candidate.configuration
    seconds = round(with_loading(context.speed.final_seconds(config), config, context.device), 4)
    return _cpu_candidate(config, seconds, context, train_samples, sample_size, val_iterations)


def choose_candidate(candidates: list[Candidate], target_epochs: float) -> tuple[Candidate | None, str]:
    """First candidate (in preference order) with enough steps and data; else the most data
    among those with enough steps. None when no candidate reaches MIN_ITERATIONS."""
    for c in candidates:
        if c.schedule.iterations >= MIN_ITERATIONS and c.epochs_seen >= target_epochs:
            return c, "reaches both targets"
    enough = [c for c in candidates if c.schedule.iterations >= MIN_ITERATIONS]
    if enough:
        # Samples per second barely depend on the batch on a CPU, so the candidates that see
        # (nearly) the most data differ mainly in their number of optimiser steps; in a short
        # budget steps are what a U-Net lacks most, so the smallest such batch wins.
        most = max(c.epochs_seen for c in enough)
        near = [c for c in enough if c.epochs_seen >= SAME_DATA_FRACTION * most]
        best = max(near, key=lambda c: (c.schedule.iterations, base_width(c.configuration)))
        return best, (f"no candidate reaches {target_epochs:g} epochs-equivalent within the budget; "
                      f"of those seeing within {1 - SAME_DATA_FRACTION:.0%} of the most data with "
                      f">= {MIN_ITERATIONS} iterations, this one makes the most optimiser steps")
    return None, ""
