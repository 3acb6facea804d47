"""Why each field of a plan has its value (the reason texts) and the plan table."""

import numpy as np

from autoplan.artifacts import Configuration, Plan
from autoplan.planning.cost import (CPU_CONV_GFLOPS, CPU_ELEMENT_NS, CPU_REFERENCE_THREADS, GPU_CONV_TFLOPS,
                                        available_cores, base_width, network_family)
from autoplan.planning.probe import PROBE_TIMED, PROBE_WARMUP, SpeedModel
from autoplan.planning.schedule import MIN_ITERATIONS, Candidate, Schedule, epoch_seconds, loader_overhead
from autoplan.planning.topology import MAX_FEATURES, MIN_FEATURE_MAP


def cpu_memory_reason(memory_gb: float) -> str:
    # RAM rarely limits a CPU plan, so the model was not fitted to bf16 or to the process's RSS
    # (benchmarks/cpu_memory.py measures the peaks; docs/planning.md, "Memory model")
    return (f"{memory_gb:.2f} GB of training tensors counted in fp32 (bf16 autocast needs less; "
            f"the process's peak RAM is higher: allocator and oneDNN workspace)")


def precision_reason(precision: str) -> str:
    if precision == "fp16":
        return "fp16 autocast with gradient scaling (CUDA mixed precision, as nnU-Net)"
    if precision == "bf16":
        return ("bf16 autocast: this CPU runs bfloat16 convolutions natively (AVX512-BF16/AMX), "
                "about 1.8x faster than fp32 steps; the probe measured it that way")
    return "fp32: this CPU has no native bfloat16, where autocast would be slower than fp32"


def patch_reason(fit, median_shape, budget_gb) -> str:
    """Why a GPU plan's patch (``fit``: the ``unet.UNetFit`` it came from)."""
    patch = fit.configuration.patch_size
    base = (f"median image {[int(round(m)) for m in median_shape]} at target spacing, padded to a "
            f"multiple of the total stride {[int(v) for v in np.prod(np.array(fit.configuration.network['strides']), axis=0)]}")
    if fit.shrunk:
        return (f"{patch}: shrunk from the median image (largest axis relative to the median first) "
                f"until training fits {budget_gb:g} GB")
    return f"{patch}: the whole {base}"


def network_reason(network: dict, base_features: int, dim: int) -> str:
    strides = np.array(network["strides"])
    pools = strides.__eq__(2).sum(axis=0).tolist()
    kernels = network["kernel_sizes"]
    flat_kernels = any(1 in k for k in kernels)
    text = (f"{network['n_stages']} stages, {pools} poolings per axis: pool while the feature map "
            f"stays >= {MIN_FEATURE_MAP} and the axis is within 2x of the finest spacing; features "
            f"{base_features} doubling per stage, capped at {MAX_FEATURES[dim]}")
    if flat_kernels:
        text += "; kernel 1 on axes >= 2x coarser than the finest (in-plane convolutions first)"
    return text


def tradeoff_text(candidates: list[Candidate], chosen: Candidate, target: float, why: str,
                   unit: str) -> str:
    lines = []
    by_width = {}
    for c in candidates:
        by_width.setdefault(base_width(c.configuration), []).append(c)
    for width, group in by_width.items():
        best = max(group, key=lambda c: c.epochs_seen)
        # the patch is named: the most a width reaches is at its smallest patch, often not the chosen one
        lines.append(f"width {width}: at most {best.epochs_seen:.1f} epochs-eq at {best.configuration.patch_size} "
                     f"({best.schedule.iterations} its x batch {best.configuration.batch_size})")
    return (f"CPU time budget: chose {unit} with {chosen.schedule.iterations} iterations, "
            f"{chosen.epochs_seen:.1f} epochs-equivalent of samples (target >= {MIN_ITERATIONS} "
            f"iterations and >= {target:g} epochs-eq; {why}). Considered: " + "; ".join(lines))


def speed_reason(speed: SpeedModel, seconds: float, configuration: Configuration) -> str:
    if speed.device == "cuda" and not speed.measured:
        return (f"{seconds:.3f} s: analytic GPU estimate ({GPU_CONV_TFLOPS:g} effective TFLOP/s for "
                f"convolutions), not measured")
    if speed.measured:
        return (f"{seconds:.3f} s: measured ({PROBE_WARMUP} warm-up + {PROBE_TIMED} timed iterations on "
                f"{available_cores()} threads, cached in throughput.json)"
                + (f", x{loader_overhead(configuration, 'cpu')} for data loading" if speed.device == "cpu" else ""))
    rate = CPU_CONV_GFLOPS[network_family(configuration)]
    return (f"{seconds:.3f} s: analytic (conv FLOPs at {rate:g} GFLOP/s + "
            f"{CPU_ELEMENT_NS:g} ns per feature-map element on {CPU_REFERENCE_THREADS} threads, scaled "
            f"to {available_cores()}), x{loader_overhead(configuration, 'cpu')} for data loading")


def schedule_reason(schedule: Schedule, budget_minutes: float | None, assumed: bool) -> str:
    if budget_minutes is None:
        return (f"nnU-Net's schedule: {schedule.epochs} epochs x {schedule.iterations_per_epoch} "
                f"iterations, {schedule.val_iterations_per_epoch} validation iterations per epoch")
    total = schedule.epochs * epoch_seconds(schedule.seconds_per_iteration, schedule.iterations_per_epoch,
                                            schedule.val_iterations_per_epoch)
    head = (f"no time budget given: CPU default = the plan for {budget_minutes:g} minutes"
            if assumed else f"time budget {budget_minutes:g} min")
    reserve = budget_minutes * 60 - schedule.training_seconds
    return (f"{head}; {schedule.training_seconds / 60:.1f} min for training ({reserve / 60:.1f} min reserved "
            f"for the final validation of one fold and the report, as the training loop keeps it): "
            f"{schedule.epochs} epochs x {schedule.iterations_per_epoch} "
            f"iterations (+{schedule.val_iterations_per_epoch} validation) ~ {total / 60:.1f} min")


def _describe_value(field_name: str, config: Configuration) -> str:
    value = getattr(config, field_name)
    if field_name == "network":
        if "features_per_stage" in value:
            return (f"U-Net {value['n_stages']} stages, features {'-'.join(map(str, value['features_per_stage']))}, "
                    f"strides {[list(s) for s in value['strides'][1:]]}")
        return f"{value['arch']} width {value['width']}"
    if field_name == "normalization":
        return ", ".join(n["scheme"] for n in value)
    if field_name == "epochs":
        return f"{config.epochs} x {config.iterations_per_epoch}"
    if field_name == "imbalance":
        return value.get("strategy", "")
    if field_name == "field_of_view":
        return f"fit {value['working_size']}" if value else "spacing"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_plan_table(plan: Plan) -> str:
    """A readable table per configuration: field, value and why it was chosen."""
    fields = ["patch_size", "spacing", "field_of_view", "network", "batch_size", "normalization", "estimated_memory_gb",
              "epochs", "expected_seconds_per_iteration", "batch_dice", "imbalance", "loss"]
    lines = [f"Plan for {plan.dataset} ({plan.task_type}) on {plan.device}"
             + (f", {plan.gpu_memory_gb:g} GB" if plan.gpu_memory_gb else "")
             + (f", {plan.time_budget_minutes:g} min budget" if plan.time_budget_minutes else "")]
    for note in plan.notes:
        lines.append(f"  note: {note}")
    for name, config in plan.configurations.items():
        marker = " (default)" if name == plan.default_configuration else ""
        lines.append("")
        lines.append(f"[{name}]{marker}")
        rows = [(f, _describe_value(f, config), config.reasons.get(f, "")) for f in fields if f in config.reasons]
        key_width = max(len(r[0]) for r in rows)
        value_width = min(max(len(r[1]) for r in rows), 28)
        for key, value, why in rows:
            if len(value) <= value_width:
                lines.append(f"  {key:<{key_width}}  {value:<{value_width}}  {why}")
            else:       # long values (networks) get their own line, the reason below them
                lines.append(f"  {key:<{key_width}}  {value}")
                lines.append(f"  {'':<{key_width}}  {'':<{value_width}}  {why}")
    return "\n".join(lines) + "\n"
