"""One U-Net configuration: the largest patch and batch a GPU's memory holds, or on a CPU the
widest network and batch whose schedule fits the time budget.

:class:`UNetRequest` says what is planned (grid, data, the network's ends) and
:class:`~autoplan.planning.schedule.PlanningContext` for what (device, memory, time, speed).
"""

from dataclasses import dataclass, replace

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.planning.cost import (CUDA_CONTEXT_GB, base_width, estimate_training_memory_gb, planned_memory_gb,
                                    ram_limit_gb)
from autoplan.planning.explain import (cpu_memory_reason, network_reason, patch_reason, precision_reason,
                                       schedule_reason, speed_reason, tradeoff_text)
from autoplan.planning.probe import planned_precision
from autoplan.planning.schedule import (GPU_DEFAULT_EPOCHS, GPU_ITERATIONS_PER_EPOCH, GPU_VAL_ITERATIONS,
                                        MIN_ITERATIONS, TRAIN_FRACTION, Candidate, PlanningContext, Schedule,
                                        choose_candidate, evaluate_candidate, finalise_candidate, fit_schedule)
from autoplan.planning.topology import (MAX_DATASET_COVERED, MIN_BATCH, Topology, batch_cap, initial_patch,
                                        shrink_patch, unet_network, unet_topology)

REFERENCE_GPU_GB = 8.0              # nnU-Net's default target; CPU plans start from its patch
MEMORY_HEADROOM = 0.9               # plan to 90% of the budget: the caching allocator fragments
CPU_REFIT_ROUNDS = 3                # choose, measure the choice, choose again if it was off
REFIT_TOLERANCE = 1.15              # ... when the measured choice is this much slower than scaled
TARGET_EPOCHS_SEGMENTATION = 50.0   # "epochs-equivalent" of samples seen that we aim for
MIN_CPU_FEATURES = 16               # narrower U-Nets lose too much capacity
LAST_RESORT_FEATURES = 8            # only when 16 cannot make MIN_ITERATIONS in the budget
BATCH_STEPS = (2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class UNetRequest:
    """What one U-Net configuration is planned for."""

    name: str                   # '2d' | '3d_fullres' | '3d_lowres'
    dim: int
    spacing: list               # target spacing of the grid the network sees
    median_shape: list          # median image at that spacing
    total_voxels: float         # of the whole dataset at that spacing
    in_channels: int
    n_outputs: int              # labels including background
    base_features: int
    mirror_axes: list | None = None   # None: every axis (labels that name a side exclude x)

    def configuration(self, topology: Topology, batch: int, base_features: int | None = None) -> Configuration:
        """The configuration of ``topology`` at ``batch`` (schedule and reasons still empty)."""
        width = self.base_features if base_features is None else base_features
        return Configuration(name=self.name, dim=self.dim, patch_size=list(topology.patch_size), batch_size=batch,
                             spacing=[round(float(s), 6) for s in self.spacing],
                             network=unet_network(topology, width, self.dim), normalization=[],
                             estimated_memory_gb=0.0, epochs=0, iterations_per_epoch=0,
                             n_input_channels=self.in_channels, n_outputs=self.n_outputs,
                             mirror_axes=None if self.mirror_axes is None else list(self.mirror_axes),
                             median_image_size=[int(round(m)) for m in self.median_shape])

    def at(self, name: str, spacing, median_shape, total_voxels) -> "UNetRequest":
        return replace(self, name=name, spacing=list(spacing), median_shape=list(median_shape),
                       total_voxels=float(total_voxels))


@dataclass
class UNetFit:
    configuration: Configuration
    shrunk: bool
    fits: bool
    batch_reason: str


def _batch_candidates(cap: int) -> list[int]:
    return sorted({cap, *[b for b in BATCH_STEPS if b < cap]}, reverse=True)


def _cpu_widths(base_features: int) -> list[int]:
    """base, base/2, ... down to MIN_CPU_FEATURES (or just base when it is already narrower)."""
    widths = [base_features]
    while widths[-1] // 2 >= MIN_CPU_FEATURES:
        widths.append(widths[-1] // 2)
    return widths


def fit_unet_to_memory(request: UNetRequest, budget_gb: float, precision: str = "fp16",
                       device: str = "cuda") -> UNetFit:
    """Largest patch (then batch) whose estimated training peak fits ``budget_gb``."""
    spacing, median_shape = request.spacing, request.median_shape
    topology = unet_topology(spacing, initial_patch(spacing, median_shape))
    limit = budget_gb * MEMORY_HEADROOM
    config = request.configuration(topology, MIN_BATCH)
    shrunk = False
    while estimate_training_memory_gb(config, precision, device) > limit:
        smaller = shrink_patch(spacing, topology, median_shape)
        if smaller is None:
            break
        topology, shrunk = smaller, True
        config = request.configuration(topology, MIN_BATCH)
    fits = estimate_training_memory_gb(config, precision, device) <= limit
    if shrunk or not fits:
        reason = (f"minimum batch {MIN_BATCH}: the patch had to shrink to fit {budget_gb:g} GB"
                  if fits else f"minimum batch {MIN_BATCH}; even the smallest patch exceeds {budget_gb:g} GB")
        return UNetFit(config, shrunk, fits, reason)
    cap = batch_cap(request.total_voxels, topology.patch_size, request.dim)
    one = estimate_training_memory_gb(replace(config, batch_size=1), precision, device)
    two = estimate_training_memory_gb(replace(config, batch_size=2), precision, device)
    per_sample = two - one
    by_memory = int((limit - (one - per_sample)) // per_sample)
    batch = max(MIN_BATCH, min(by_memory, cap))
    if by_memory <= cap:
        reason = f"largest batch fitting {budget_gb:g} GB ({per_sample * 1000:.0f} MB per sample)"
    else:
        reason = (f"capped at {cap} so one batch covers at most {MAX_DATASET_COVERED:.0%} of the "
                  f"dataset's voxels (memory would allow {by_memory})")
    return UNetFit(replace(config, batch_size=batch), shrunk, fits, reason)


def _time_candidates(request: UNetRequest, topology: Topology, widths, context: PlanningContext) -> list:
    """Every (width, batch) of ``topology`` that fits half the RAM, with the schedule each could run."""
    found = []
    ram = ram_limit_gb()
    train_voxels = request.total_voxels * TRAIN_FRACTION
    for width in widths:
        for batch in _batch_candidates(batch_cap(request.total_voxels, topology.patch_size, request.dim)):
            config = request.configuration(topology, batch, width)
            if estimate_training_memory_gb(config, "fp32", "cpu") <= ram:
                found.append(evaluate_candidate(config, context, train_voxels, float(np.prod(topology.patch_size))))
    return found


def fit_unet_to_time(request: UNetRequest, context: PlanningContext) -> tuple[Candidate, str, bool]:
    """CPU: the widest U-Net and largest batch whose schedule fits the budget and sees enough data.

    Starts from the patch a default 8 GB GPU plan uses. When even the narrowest width at
    batch 2 cannot make MIN_ITERATIONS iterations, a last-resort width of 8 is tried, then
    (3D only) the patch shrinks. A 2D patch never shrinks: 2D images are small enough to
    see whole, and a network trained on crops of them loses the context it needs on the
    full image.
    """
    reference = fit_unet_to_memory(request, REFERENCE_GPU_GB)
    topology = unet_topology(request.spacing, reference.configuration.patch_size)
    shrunk = reference.shrunk
    all_candidates = []
    while True:
        base = request.base_features
        for widths in (_cpu_widths(base), [w for w in (LAST_RESORT_FEATURES,) if w < base]):
            candidates = _time_candidates(request, topology, widths, context)
            all_candidates += candidates
            chosen, why = choose_candidate(candidates, TARGET_EPOCHS_SEGMENTATION)
            if chosen is not None:
                return chosen, tradeoff_text(candidates, chosen, TARGET_EPOCHS_SEGMENTATION, why,
                                             f"base width {base_width(chosen.configuration)}, batch "
                                             f"{chosen.configuration.batch_size}"), shrunk
        smaller = shrink_patch(request.spacing, topology, request.median_shape) if request.dim == 3 else None
        if smaller is None:
            # no patch size reaches enough steps: a tiny patch would only add context loss
            # on top of too few steps, so keep the planned patch and take its most steps
            first = [c for c in all_candidates if c.configuration.patch_size == reference.configuration.patch_size]
            best = max(first or all_candidates, key=lambda c: c.schedule.iterations)
            return best, (f"CPU time budget too small for {MIN_ITERATIONS} iterations even with the "
                          f"narrowest width: the planned patch with the most iterations possible "
                          f"({best.schedule.iterations})"), reference.shrunk
        topology, shrunk = smaller, True


def _plan_for_cpu(request: UNetRequest, context: PlanningContext) -> tuple:
    """(configuration, schedule, samples seen, reasons) of the CPU plan: choose, measure the
    choice itself, and choose again when it was much slower than scaled from the probe."""
    for _ in range(CPU_REFIT_ROUNDS):
        candidate, tradeoff, shrunk = fit_unet_to_time(request, context)
        predicted = candidate.schedule.seconds_per_iteration
        candidate = finalise_candidate(candidate, context, request.total_voxels * TRAIN_FRACTION,
                                       float(np.prod(candidate.configuration.patch_size)))
        if candidate.schedule.seconds_per_iteration <= predicted * REFIT_TOLERANCE:
            break
    config = candidate.configuration
    whole = (f"the whole median image {[int(round(m)) for m in request.median_shape]} at target spacing, "
             f"padded to a multiple of the total stride")
    reasons = {"patch_size": f"{config.patch_size}: "
                             + ("shrunk so the CPU budget allows enough iterations" if shrunk else whole),
               "batch_size": tradeoff,
               "estimated_memory_gb": cpu_memory_reason(estimate_training_memory_gb(config, "fp32", "cpu"))}
    return config, candidate.schedule, candidate.epochs_seen, reasons


def _plan_for_gpu(request: UNetRequest, context: PlanningContext) -> tuple:
    """(configuration, schedule, samples seen, reasons) of the GPU plan: memory decides the
    patch and batch; nnU-Net's 1000 epochs unless a time budget caps them."""
    fit = fit_unet_to_memory(request, context.budget_gb)
    config = fit.configuration
    memory = estimate_training_memory_gb(config, "fp16", "cuda")
    seconds = round(context.speed.final_seconds(config), 4)
    if context.budget_minutes is None:
        schedule = Schedule(GPU_DEFAULT_EPOCHS, GPU_ITERATIONS_PER_EPOCH, GPU_VAL_ITERATIONS, seconds, 0.0)
    else:
        schedule = fit_schedule(seconds, context.budget_minutes, GPU_ITERATIONS_PER_EPOCH, GPU_VAL_ITERATIONS,
                                context.reserve_seconds(config, seconds), max_epochs=GPU_DEFAULT_EPOCHS)
    seen = schedule.iterations * config.batch_size * float(np.prod(config.patch_size)) / (
        request.total_voxels * TRAIN_FRACTION)
    reasons = {"patch_size": patch_reason(fit, request.median_shape, context.budget_gb),
               "batch_size": fit.batch_reason,
               "estimated_memory_gb": (f"{memory:.2f} GB of {context.budget_gb:g} GB: mixed-precision activations "
                                       f"kept for backward, weights, gradients, SGD momentum and "
                                       f"{CUDA_CONTEXT_GB:g} GB CUDA context")}
    return config, schedule, seen, reasons


def plan_unet_configuration(request: UNetRequest, context: PlanningContext, normalization: list,
                            normalization_reason: str) -> Configuration:
    """The U-Net configuration of ``request`` for ``context``, with its schedule and reasons."""
    planner = _plan_for_cpu if context.device == "cpu" else _plan_for_gpu
    config, schedule, seen, reasons = planner(request, context)
    memory = planned_memory_gb(config, context.device)
    precision = planned_precision(context.device)
    reasons.update({
        "spacing": f"{config.spacing}",
        "network": network_reason(config.network, base_width(config), request.dim),
        "normalization": normalization_reason,
        "epochs": schedule_reason(schedule, context.budget_minutes, context.assumed_budget),
        "expected_seconds_per_iteration": speed_reason(context.speed, schedule.seconds_per_iteration, config),
        "loss": "Dice + cross-entropy with deep supervision, SGD lr 0.01 (nnU-Net's recipe)",
        "precision": precision_reason(precision)})
    return replace(config, normalization=normalization, estimated_memory_gb=round(memory, 3),
                   precision=precision, epochs=schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
                   val_iterations_per_epoch=schedule.val_iterations_per_epoch,
                   expected_seconds_per_iteration=schedule.seconds_per_iteration,
                   samples_seen_epochs=round(seen, 1), reasons=reasons)
