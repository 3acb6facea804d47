"""Planning: configurations (patch, network, batch, schedule) from the fingerprint and hardware.

Entry function: :func:`plan_dataset` (``planning/entry.py``). The rules follow nnU-Net v2's
ExperimentPlanner (median target spacing with an anisotropy exception, pooling while feature
maps stay large enough, patch shrinking until the network fits the GPU, a batch that never
covers more than 5% of the dataset) with two changes:

* memory is estimated analytically (``cost.estimate_training_memory_gb``) from the feature maps
  autograd keeps for backward, the weights, gradients and optimiser state, instead of
  instantiating the network and comparing to a reference constant;
* on a CPU the limit is time, not memory: with a time budget the planner picks network width,
  batch and schedule so that training fits the budget (``unet.fit_unet_to_time``), using measured
  throughput (a few real training steps, ``probe``) or the analytic estimate.

One job per module, imported in this order (each only from those above it):
``topology`` (U-Net strides, kernels, patch) -> ``cost`` (layers, memory, FLOPs, analytic speed)
-> ``probe`` (measured speed, the only torch user) -> ``schedule`` (budget -> epochs, CPU
candidates) -> ``explain`` (reason texts, the plan table) -> ``unet`` (one U-Net configuration)
-> ``segmentation`` / ``classification`` -> ``entry``. The plan itself (``Plan``,
``Configuration``) lives in ``autoplan.artifacts``. ``docs/planning.md`` explains every rule.
"""

from autoplan.artifacts import Configuration, Plan
from autoplan.planning.classification import (CLASS_WEIGHT_EXPONENT, EPOCH_VALIDATION_PER_CLASS,
                                              POSTERIOR_CORRECTION, class_order, classifier_input_sizes,
                                              epoch_validation_iterations, imbalance_handling)
from autoplan.planning.cost import (CUDA_CONTEXT_GB, configuration_layers, estimate_seconds_per_iteration,
                                    estimate_training_memory_gb, memory_breakdown, training_flops)
from autoplan.planning.entry import cuda_available, plan_dataset
from autoplan.planning.explain import format_plan_table
from autoplan.planning.schedule import (CPU_LOADER_OVERHEAD, VAL_ITERATION_COST, epochs_fill_budget,
                                        fit_schedule, training_seconds)
from autoplan.planning.segmentation import FIELD_OF_VIEW_MODES, plan_field_of_view, target_spacing
from autoplan.planning.topology import unet_network, unet_topology

__all__ = [
    "CLASS_WEIGHT_EXPONENT", "CPU_LOADER_OVERHEAD", "CUDA_CONTEXT_GB", "Configuration", "EPOCH_VALIDATION_PER_CLASS",
    "FIELD_OF_VIEW_MODES", "POSTERIOR_CORRECTION", "Plan", "VAL_ITERATION_COST", "class_order",
    "classifier_input_sizes", "configuration_layers", "cuda_available", "epoch_validation_iterations",
    "epochs_fill_budget", "estimate_seconds_per_iteration", "estimate_training_memory_gb", "fit_schedule",
    "format_plan_table", "imbalance_handling", "memory_breakdown", "plan_dataset", "plan_field_of_view",
    "target_spacing", "training_flops", "training_seconds", "unet_network", "unet_topology",
]
