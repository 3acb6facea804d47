"""Classifier plans: input size, ResNet depth and width, batch, schedule and class imbalance."""

import math
from dataclasses import dataclass, replace

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.errors import InputError
from autoplan.planning.cost import CLASSIFIER_ARCHS, estimate_training_memory_gb, planned_memory_gb, ram_limit_gb
from autoplan.planning.explain import (cpu_memory_reason, precision_reason, schedule_reason, speed_reason,
                                           tradeoff_text)
from autoplan.planning.probe import planned_precision
from autoplan.planning.schedule import (MIN_ITERATIONS, TRAIN_FRACTION, PlanningContext, Schedule,
                                        choose_candidate, evaluate_candidate, finalise_candidate, fit_schedule)
from autoplan.planning.topology import MIN_BATCH
from autoplan.planning.unet import BATCH_STEPS, MEMORY_HEADROOM

CLASSIFIER_GPU_EPOCHS = 100
CLASSIFIER_MAX_BATCH = 128
CLASSIFIER_CPU_BATCH = 32
CLASSIFIER_MAX_EDGE = 512           # beyond this ResNets gain little per extra pixel
CLASSIFIER_MIN_EDGE = 64
TARGET_EPOCHS_CLASSIFICATION = 50.0  # passes over the training images (HAM10000 evidence in docs/planning.md)
EPOCH_VALIDATION_PER_CLASS = 100    # classifier's per-epoch check: at most this many images a class


def classifier_input_sizes(median_hw, aspect_w_over_h) -> list[list[int]]:
    """Input sizes (multiples of 32, not beyond the median image, aspect kept), largest first."""
    height, width = float(median_hw[0]), float(median_hw[1])
    max_h = max(32, min(CLASSIFIER_MAX_EDGE, int(height // 32) * 32))
    max_w = max(32, min(CLASSIFIER_MAX_EDGE, int(width // 32) * 32))
    sizes = []
    for h in range(max_h, CLASSIFIER_MIN_EDGE - 1, -32):
        w = int(min(max_w, max(32, round(h * aspect_w_over_h / 32) * 32)))
        error = abs(math.log((w / h) / aspect_w_over_h))
        if error <= math.log(1.25) and [h, w] not in sizes:
            sizes.append([h, w])
    if not sizes:
        sizes = [[max_h, max_w]]
    return sizes


def _classifier_configuration(arch, width, size, batch, in_channels, n_classes, normalization,
                              median_hw) -> Configuration:
    _, blocks = CLASSIFIER_ARCHS[arch]
    network = {"arch": arch, "width": width, "widths": [width * 2 ** i for i in range(4)],
               "blocks_per_stage": list(blocks)}
    return Configuration(name="classifier", dim=2, patch_size=list(size), batch_size=batch, spacing=[],
                         network=network, normalization=normalization, estimated_memory_gb=0.0, epochs=0,
                         iterations_per_epoch=0, loss="ce", optimizer="adamw", lr=1e-3, augment="default",
                         n_input_channels=in_channels, n_outputs=n_classes,
                         median_image_size=[int(round(m)) for m in median_hw])


def class_order(dataset, fingerprint) -> list:
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes else list((fingerprint.class_counts or {}).keys())


# Class weights are (1/frequency) ** CLASS_WEIGHT_EXPONENT. Measured on HAM10000 (fold 0,
# ResNet-18 at 96x128, the 2-core 30-minute schedule, `ce`; accuracy / balanced accuracy):
# 1/sqrt weights 0.737 / 0.643 (GPU emulation of the schedule), exponent 0.25 0.770 / 0.639,
# exponent 0.15 0.768 / 0.595 (CPU runs). Milder than the square root buys accuracy; milder
# than the fourth root loses balanced accuracy without a measurable accuracy gain.
CLASS_WEIGHT_EXPONENT = 0.25
# The weighted loss tilts the model's posterior towards rare classes by the class weights w.
# Predictions take back this share of the tilt (probabilities * w ** -correction, renormalised;
# 0 decides as trained, 1 from the unweighted posterior, which maximises accuracy): the weights
# keep helping rare classes during training, and the decision sits between the accuracy- and the
# balanced-accuracy-optimal rule. Measured on the saved HAM10000 fold-0 models (30-minute `ce`
# runs, accuracy / balanced accuracy): 0 gave 0.770 / 0.639 and 0.770 / 0.614, 0.5 gave
# 0.782 / 0.630 and 0.776 / 0.597, 1 gave 0.778-0.784 / 0.55-0.59 (five models). Chosen on that
# same validation fold; the first fresh run with it gave 0.777 / 0.601 (0.763 / 0.610 without).
# It is the plan's default: `autoplan calibrate` chooses a run's rule on out-of-fold predictions.
POSTERIOR_CORRECTION = 0.5
# The other strategy for imbalance: a logit-adjusted loss (Menon et al. 2021): the loss adds
# tau * log(frequency) to the logits, so the network's own posterior leans by frequency^-tau
# (tau = 1: the balanced posterior) and no image's gradient is weighted. Its default decision keeps
# the same residual lean as the weighted loss's default (frequency^-0.125).
IMBALANCE_STRATEGY = "weighted_loss"     # or "logit_adjusted"
LOGIT_ADJUSTMENT_TAU = 1.0
LOGIT_ADJUSTED_CORRECTION = round(1 - CLASS_WEIGHT_EXPONENT * (1 - POSTERIOR_CORRECTION) / LOGIT_ADJUSTMENT_TAU, 4)
DEFAULT_CORRECTIONS = {"weighted_loss": POSTERIOR_CORRECTION, "logit_adjusted": LOGIT_ADJUSTED_CORRECTION}


def imbalance_handling(classes: list, counts: dict, strategy: str | None = None) -> dict:
    """ratio > 3: cross-entropy weighted by 1/frequency**0.25 (mean weight 1), or with
    ``strategy`` 'logit_adjusted' the logit-adjusted loss; else nothing. The class counts are
    kept in the result so ``train --imbalance`` can switch strategy without planning again.

    Mild weights correct part of the bias towards the majority class without giving up
    much accuracy, and without letting a class of a hundred images dominate the gradient
    (full inverse-frequency weights, or balanced sampling, would show each of those images
    tens of times more often and overfit).
    """
    values = np.array([float(counts.get(c, 0)) for c in classes])
    present = values[values > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    shared = {"classes": classes, "imbalance_ratio": round(ratio, 2),
              "class_counts": {c: int(counts.get(c, 0)) for c in classes}}
    if ratio <= 3:
        return shared | {"strategy": "none", "class_weights": [1.0] * len(classes),
                         "reason": f"largest/smallest class = {ratio:.1f} <= 3: plain cross-entropy"}
    frequency = np.maximum(values, 1.0) / max(values.sum(), 1.0)
    if (strategy or IMBALANCE_STRATEGY) == "logit_adjusted":
        return shared | _logit_adjusted(frequency, ratio)
    weights = frequency ** -CLASS_WEIGHT_EXPONENT
    weights = weights / weights.mean()
    return shared | {
            "strategy": "weighted_loss", "class_weights": [round(float(w), 4) for w in weights],
            "posterior_correction": POSTERIOR_CORRECTION,
            "reason": (f"largest/smallest class = {ratio:.1f} > 3: cross-entropy weighted by (1/class "
                       f"frequency)^{CLASS_WEIGHT_EXPONENT:g}, normalised to mean 1 (rarest/commonest "
                       f"weight {ratio ** CLASS_WEIGHT_EXPONENT:.1f}; stronger weights, inverse "
                       f"frequency or balanced sampling cost accuracy and would repeat the rarest "
                       f"class's {int(present.min())} images up to ~{ratio:.0f}x as often); "
                       f"predictions take back {POSTERIOR_CORRECTION:g} of the weights' tilt "
                       f"(probabilities x weight^-{POSTERIOR_CORRECTION:g}, renormalised; a default: "
                       f"`autoplan calibrate` chooses it on out-of-fold predictions)")}


def _logit_adjusted(frequency, ratio: float) -> dict:
    leaning = frequency ** -LOGIT_ADJUSTMENT_TAU
    leaning = leaning / np.exp(np.log(leaning).mean())     # geometric mean 1: offsets centred on 0
    return {"strategy": "logit_adjusted", "class_weights": [round(float(w), 4) for w in leaning],
            "posterior_correction": LOGIT_ADJUSTED_CORRECTION,
            "reason": (f"largest/smallest class = {ratio:.1f} > 3: logit-adjusted cross-entropy (the loss adds "
                       f"{LOGIT_ADJUSTMENT_TAU:g} x log class frequency to the logits; no image is weighted), "
                       f"so the network leans towards rare classes by frequency^-{LOGIT_ADJUSTMENT_TAU:g} "
                       f"(class_weights); predictions take back {LOGIT_ADJUSTED_CORRECTION:g} of that lean")}


def imbalance_with_strategy(imbalance: dict, strategy: str) -> dict:
    """A planned imbalance handling redone with another strategy (``train --imbalance``)."""
    if imbalance.get("strategy", "none") in ("none", strategy):
        return imbalance
    if not imbalance.get("class_counts"):
        raise InputError(None, f"--imbalance {strategy}: this plan predates the option (no class counts "
                               "in it); run `autoplan plan` again")
    return imbalance_handling(imbalance["classes"], imbalance["class_counts"], strategy)


def epoch_validation_iterations(class_counts: dict, n_val: int, batch: int) -> int:
    """Batches of the classifier's per-epoch check: each class's share of the validation
    fold, capped at EPOCH_VALIDATION_PER_CLASS images (see ``ClassificationTask``)."""
    total = sum(class_counts.values()) or 1
    images = sum(min(EPOCH_VALIDATION_PER_CLASS, n_val * count / total) for count in class_counts.values())
    return max(1, math.ceil((images or n_val) / batch))


def classification_normalization(fingerprint) -> tuple[list, str]:
    if fingerprint.channel_mean and fingerprint.channel_std:
        schemes = [{"scheme": "rgb", "mean": float(m), "std": max(float(s), 1e-6)}
                   for m, s in zip(fingerprint.channel_mean, fingerprint.channel_std)]
        return schemes, "scale to 0..1, then subtract the dataset's per-channel mean and divide by its std"
    return ([{"scheme": "zscore"} for _ in fingerprint.channels],
            "no per-channel statistics in the fingerprint: per-image z-score")


def _classifier_arch_for_gpu(n_cases: int) -> tuple[str, str]:
    if n_cases < 3000:
        return "resnet18", f"{n_cases} images: ResNet-18 (deeper nets overfit small datasets)"
    if n_cases < 20000:
        return "resnet34", f"{n_cases} images: ResNet-34"
    return "resnet50", f"{n_cases} images: ResNet-50"


@dataclass(frozen=True)
class ClassifierRequest:
    """What the classifier is planned for."""

    classes: list
    in_channels: int
    median_hw: list
    sizes: list                 # candidate input sizes, largest first
    size_reason: str
    normalization: list
    n_train: int
    n_val: int
    n_cases: int
    class_counts: dict

    def configuration(self, arch: str, width: int, size, batch: int) -> Configuration:
        return _classifier_configuration(arch, width, size, batch, self.in_channels, max(len(self.classes), 2),
                                         self.normalization, self.median_hw)


def _plan_for_cpu(request: ClassifierRequest, context: PlanningContext) -> tuple:
    """(configuration, schedule, samples seen, reasons): ResNet-18 of the width and input size
    whose schedule sees enough of the data in the time budget."""
    batch = int(max(MIN_BATCH, min(CLASSIFIER_CPU_BATCH, request.n_train // 4)))
    val_its = epoch_validation_iterations(request.class_counts, request.n_val, batch)
    candidates = []
    for size in request.sizes:
        for width in (64, 32):
            config = request.configuration("resnet18", width, size, batch)
            if estimate_training_memory_gb(config, "fp32", "cpu") <= ram_limit_gb():
                candidates.append(evaluate_candidate(config, context, request.n_train, 1.0, val_its))
    chosen, why = choose_candidate(candidates, TARGET_EPOCHS_CLASSIFICATION)
    if chosen is None:
        chosen = max(candidates, key=lambda c: c.schedule.iterations)
        why = f"none reaches {MIN_ITERATIONS} iterations: the most iterations possible"
    chosen = finalise_candidate(chosen, context, request.n_train, 1.0, val_its)
    config = chosen.configuration
    reasons = {
        "patch_size": f"{config.patch_size}: {request.size_reason}; the largest size the CPU budget allows",
        "network": ("ResNet-18 on CPU (deeper nets cost more than the budget buys); "
                    + tradeoff_text(candidates, chosen, TARGET_EPOCHS_CLASSIFICATION, why,
                                    f"width {config.network['width']} at {config.patch_size}")),
        "batch_size": f"{config.batch_size}: a standard CPU batch (at most a quarter of the training images)",
        "estimated_memory_gb": cpu_memory_reason(estimate_training_memory_gb(config, "fp32", "cpu"))}
    return config, chosen.schedule, chosen.epochs_seen, reasons


def _plan_for_gpu(request: ClassifierRequest, context: PlanningContext) -> tuple:
    """(configuration, schedule, samples seen, reasons): depth by dataset size, the largest
    input, the largest batch the memory holds; 100 epochs unless a time budget caps them."""
    arch, arch_reason = _classifier_arch_for_gpu(request.n_cases)
    size, budget_gb = request.sizes[0], context.budget_gb
    batch = MIN_BATCH
    for b in sorted({b for b in BATCH_STEPS if b <= CLASSIFIER_MAX_BATCH}, reverse=True):
        fits = estimate_training_memory_gb(request.configuration(arch, 64, size, b), "fp16", "cuda") \
            <= budget_gb * MEMORY_HEADROOM
        if b <= max(MIN_BATCH, request.n_train // 4) and fits:
            batch = b
            break
    config = request.configuration(arch, 64, size, batch)
    seconds = round(context.speed.final_seconds(config), 4)
    its, val_its = math.ceil(request.n_train / batch), math.ceil(request.n_val / batch)
    if context.budget_minutes is None:
        schedule = Schedule(CLASSIFIER_GPU_EPOCHS, its, val_its, seconds, 0.0)
    else:
        schedule = fit_schedule(seconds, context.budget_minutes, its, val_its, context.reserve_seconds(config, seconds),
                                max_epochs=CLASSIFIER_GPU_EPOCHS)
    memory = estimate_training_memory_gb(config, "fp16", "cuda")
    reasons = {"patch_size": f"{size}: {request.size_reason}",
               "network": f"{arch_reason}, width 64 (torchvision's)",
               "batch_size": (f"{batch}: largest power-of-two-ish batch <= {CLASSIFIER_MAX_BATCH} fitting "
                              f"{budget_gb:g} GB and at most a quarter of the training images"),
               "estimated_memory_gb": f"{memory:.2f} GB of {budget_gb:g} GB (mixed precision, AdamW state)"}
    return config, schedule, schedule.iterations * batch / request.n_train, reasons


def classifier_request(dataset, fingerprint) -> ClassifierRequest:
    median_hw = fingerprint.median_shape
    aspect = (fingerprint.aspect_ratios or {}).get("median") or float(median_hw[1]) / float(median_hw[0])
    n_train = max(1, int(fingerprint.n_cases * TRAIN_FRACTION))
    return ClassifierRequest(
        classes=class_order(dataset, fingerprint), in_channels=len(fingerprint.channels), median_hw=median_hw,
        sizes=classifier_input_sizes(median_hw, aspect),
        size_reason=(f"median image {[int(round(m)) for m in median_hw]} (width/height {aspect:.2f}): "
                     f"multiples of 32 keeping the aspect ratio, never upsampling"),
        normalization=classification_normalization(fingerprint)[0], n_train=n_train,
        n_val=max(1, fingerprint.n_cases - n_train), n_cases=fingerprint.n_cases,
        class_counts=fingerprint.class_counts or {})


def plan_classifier(dataset, fingerprint, context: PlanningContext) -> Configuration:
    """The classifier configuration of a classification dataset for ``context``."""
    request = classifier_request(dataset, fingerprint)
    planner = _plan_for_cpu if context.device == "cpu" else _plan_for_gpu
    config, schedule, seen, reasons = planner(request, context)
    memory = planned_memory_gb(config, context.device)
    config = replace(config, estimated_memory_gb=round(memory, 3), epochs=schedule.epochs,
                     iterations_per_epoch=schedule.iterations_per_epoch,
                     val_iterations_per_epoch=schedule.val_iterations_per_epoch,
                     expected_seconds_per_iteration=schedule.seconds_per_iteration,
                     imbalance=imbalance_handling(request.classes, request.class_counts),
                     samples_seen_epochs=round(seen, 1), precision=planned_precision(context.device))
    budget = context.budget_minutes
    reasons = {"normalization": classification_normalization(fingerprint)[1], **reasons}
    reasons.update({
        "precision": precision_reason(config.precision), "imbalance": config.imbalance["reason"],
        "epochs": (schedule_reason(schedule, budget, context.assumed_budget) if budget is not None else
                   f"{schedule.epochs} epochs, each one pass over the training fold "
                   f"({schedule.iterations_per_epoch} iterations)"),
        "expected_seconds_per_iteration": speed_reason(context.speed, schedule.seconds_per_iteration, config),
        "loss": "cross-entropy, AdamW lr 1e-3 (a robust default for ResNets trained from scratch)"})
    config.reasons = reasons
    return config
