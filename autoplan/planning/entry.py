"""The planner's entry: :func:`plan_dataset` checks its inputs, sets up the speed model and
plans every configuration of a dataset."""

from pathlib import Path

from autoplan.artifacts import Plan
from autoplan.errors import InputError
from autoplan.planning.classification import plan_classifier
from autoplan.planning.probe import SpeedModel, ThroughputCache
from autoplan.paths import throughput_file
from autoplan.planning.schedule import CPU_DEFAULT_BUDGET_MINUTES, TRAIN_FRACTION, PlanningContext
from autoplan.planning.segmentation import plan_segmentation
from autoplan.planning.unet import REFERENCE_GPU_GB


def _detect_gpu_memory_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9
    except Exception:       # no CUDA build, driver problems: plan without detection
        return None
    return None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _check_request(device, gpu_memory_gb, time_budget_minutes, base_features, fingerprint) -> None:
    if device not in ("cpu", "cuda"):
        raise InputError(None, f"unknown device {device!r}; use 'cpu' or 'cuda'")
    if time_budget_minutes is not None and not time_budget_minutes > 0:
        raise InputError(None, f"time budget must be positive minutes, got {time_budget_minutes}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise InputError(None, f"GPU memory must be positive GB, got {gpu_memory_gb}")
    if int(base_features) < 4:
        raise InputError(None, f"base features must be at least 4, got {base_features}")
    if fingerprint.task_type not in PLANNERS:
        raise InputError(None, f"unknown task type {fingerprint.task_type!r} in the fingerprint")


def _memory_budget(device: str, gpu_memory_gb: float | None, notes: list) -> float | None:
    """The GPU memory to plan for (detected, given, or nnU-Net's 8 GB); None on a CPU."""
    if device == "cpu":
        if gpu_memory_gb is not None:
            notes.append("--gpu-memory ignored: on CPU the limit is time, not memory")
        return None
    if gpu_memory_gb is not None:
        return gpu_memory_gb
    detected = _detect_gpu_memory_gb()
    if detected is None:
        notes.append(f"no GPU here and no --gpu-memory: planned for nnU-Net's default {REFERENCE_GPU_GB:g} GB")
        return REFERENCE_GPU_GB
    notes.append(f"planned for the detected GPU's {detected:.1f} GB")
    return detected


def _plan_segmentation(dataset, fingerprint, context, base_features, field_of_view, lowres) -> tuple:
    return plan_segmentation(dataset, fingerprint, context, base_features, field_of_view, lowres)


def _plan_classification(dataset, fingerprint, context, base_features, field_of_view, lowres) -> tuple:
    return {"classifier": plan_classifier(dataset, fingerprint, context)}, "classifier", []


PLANNERS = {"segmentation": _plan_segmentation, "classification": _plan_classification}


def plan_dataset(dataset, fingerprint, device: str = "cpu", gpu_memory_gb: float | None = None,
                 time_budget_minutes: float | None = None, base_features: int = 32,
                 results_dir: Path | None = None, probe: bool = True, field_of_view: str = "auto",
                 lowres: str = "auto") -> Plan:
    """Plan every configuration of a dataset for a device, memory and time budget.

    ``dataset`` is the dataset's name or its ``Dataset`` (then its label ids and class order
    are used). Writes nothing except the throughput cache ``results_dir/NAME/throughput.json``
    when the probe runs; the caller saves the plan with ``plan.save(path)``. ``field_of_view``
    ('auto' | 'fit' | 'pixels') decides how 2D images without a pixel size are scaled
    (:func:`autoplan.planning.segmentation.plan_field_of_view`). ``lowres`` 'always' plans a
    3d_lowres stage (and its cascade) also where nnU-Net's rule plans none ('auto').
    """
    name = dataset if isinstance(dataset, str) else dataset.name
    _check_request(device, gpu_memory_gb, time_budget_minutes, base_features, fingerprint)
    notes = []
    budget_gb = _memory_budget(device, gpu_memory_gb, notes)
    assumed_budget = device == "cpu" and time_budget_minutes is None
    budget_minutes = CPU_DEFAULT_BUDGET_MINUTES if assumed_budget else time_budget_minutes
    measure = (probe and results_dir is not None and not assumed_budget and budget_minutes is not None
               and (device == "cpu" or cuda_available()))
    speed = SpeedModel(device, ThroughputCache(throughput_file(results_dir, name), device) if measure else None)
    if assumed_budget:
        notes.append(f"no time budget on CPU: the plan for {CPU_DEFAULT_BUDGET_MINUTES:g} minutes, "
                     f"computed analytically")
    n_val = max(1, fingerprint.n_cases - int(fingerprint.n_cases * TRAIN_FRACTION))
    context = PlanningContext(device, budget_gb, budget_minutes, assumed_budget, speed, n_val_cases=n_val)
    configurations, default, more = PLANNERS[fingerprint.task_type](dataset, fingerprint, context,
                                                                    int(base_features), field_of_view, lowres)
    notes += more + ([speed.failure] if speed.failure else []) + sorted(set(speed.clamped))
    notes.append(f"default configuration: {default}")
    return Plan(dataset=name, task_type=fingerprint.task_type, device=device,
                gpu_memory_gb=None if budget_gb is None else round(float(budget_gb), 3),
                time_budget_minutes=None if time_budget_minutes is None else float(time_budget_minutes),
                configurations=configurations,
                default_configuration=default, notes=notes)
