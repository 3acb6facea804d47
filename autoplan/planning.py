"""Planning: configurations (patch, network, batch, schedule) from the fingerprint and hardware.

Entry function: :func:`plan_dataset`. The rules follow nnU-Net v2's ExperimentPlanner
(median target spacing with an anisotropy exception, pooling while feature maps stay
large enough, patch shrinking until the network fits the GPU, a batch that never covers
more than 5% of the dataset) with two changes:

* memory is estimated analytically (``estimate_training_memory_gb``) from the feature maps
  autograd keeps for backward, the weights, gradients and optimiser state, instead of
  instantiating the network and comparing to a reference constant;
* on a CPU the limit is time, not memory: with a time budget the planner picks network
  width, batch and schedule so that training fits the budget (``_fit_cpu_schedule``),
  using measured throughput (a few real iterations, cached in ``throughput.json``) or the
  analytic ``estimate_seconds_per_iteration``.

``docs/planning.md`` explains every rule and constant.
"""

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.jsonio import JsonDataclass, read_json, write_json


@dataclass
class Configuration:
    name: str                          # '2d' | '3d_fullres' | '3d_lowres' | 'classifier'
    dim: int                           # 2 | 3
    patch_size: list                   # array axis order; classifier: input size [H, W]
    batch_size: int
    spacing: list                      # target spacing, array axis order (classifier: [])
    network: dict                      # U-Net: n_stages, features_per_stage, strides, kernel_sizes,
                                       #   conv_per_stage; classifier: arch, widths, blocks_per_stage
    normalization: list                # per channel: {"scheme": "zscore"|"zscore_nonzero"|"ct"|"rgb",
                                       #   "mean":, "std":, "clip": [lo, hi]} (fields as needed)
    estimated_memory_gb: float
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 0
    expected_seconds_per_iteration: float | None = None
    loss: str = "dice_ce"
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_dice: bool = False
    augment: str = "default"
    imbalance: dict = field(default_factory=dict)   # classifier: {"strategy":, "class_weights":, "reason":}
    n_input_channels: int = 1
    n_outputs: int = 2                 # segmentation: labels incl. background; classifier: classes
    reasons: dict = field(default_factory=dict)     # field name -> why it was chosen
    # added by the planner (defaults keep older plans loadable)
    median_image_size: list = field(default_factory=list)   # median shape at the target spacing
    samples_seen_epochs: float | None = None        # epochs × its × batch × patch / training voxels


@dataclass
class Plan(JsonDataclass):
    dataset: str
    task_type: str
    device: str                        # 'cpu' | 'cuda': what the plan was made for
    gpu_memory_gb: float | None
    time_budget_minutes: float | None
    configurations: dict[str, Configuration]
    default_configuration: str
    notes: list = field(default_factory=list)       # planner-level observations (added field)


# ---------------------------------------------------------------------------------------
# Constants. Each one is a decision; docs/planning.md gives the reasoning.
# ---------------------------------------------------------------------------------------
ANISOTROPY_THRESHOLD = 3.0          # nnU-Net: an axis > 3x coarser than the others is "anisotropic"
MIN_FEATURE_MAP = 4                 # bottleneck edge length (nnU-Net UNet_featuremap_min_edge_length)
MAX_FEATURES = {2: 512, 3: 320}     # nnU-Net's caps on channels per stage
CONV_PER_STAGE = 2
MIN_BATCH = 2                       # nnU-Net UNet_min_batch_size
MAX_DATASET_COVERED = 0.05          # one batch sees at most 5% of the dataset's voxels
LOWRES_THRESHOLD = 0.25             # 3d_lowres when the fullres patch covers < 25% of the median image
LOWRES_SPACING_STEP = 1.03          # nnU-Net's spacing increase per lowres attempt
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}   # nnU-Net: start from a patch of 2048² / 256³ voxels
MAX_BATCH = {2: 512, 3: 64}         # sanity cap; the 5% rule nearly always binds earlier

CUDA_CONTEXT_GB = 0.5               # CUDA context + cuDNN/cuBLAS handles: not in max_memory_allocated
MEMORY_HEADROOM = 0.9               # plan to 90% of the budget: the caching allocator fragments
OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}

GPU_DEFAULT_EPOCHS = 1000           # nnU-Net's schedule
GPU_ITERATIONS_PER_EPOCH = 250
GPU_VAL_ITERATIONS = 50
CPU_ITERATIONS_PER_EPOCH = 50       # short epochs on CPU: frequent checkpoints and curves
CPU_VAL_ITERATIONS = 5
CPU_DEFAULT_BUDGET_MINUTES = 60.0   # CPU plan without a budget: the plan for 60 minutes
VAL_ITERATION_COST = 0.35           # a validation iteration (forward only) vs a training one
CPU_LOADER_OVERHEAD = 1.15          # augmentation competes with training for the same cores
RESERVE_FRACTION = 0.10             # of the budget kept for final validation and the report
RESERVE_MIN_SECONDS = 60.0
MIN_ITERATIONS = 500                # fewer optimiser steps than this barely trains a U-Net
TARGET_EPOCHS_SEGMENTATION = 50.0   # "epochs-equivalent" of samples seen that we aim for
TARGET_EPOCHS_CLASSIFICATION = 10.0
MIN_CPU_FEATURES = 16               # narrower U-Nets lose too much capacity
TRAIN_FRACTION = 0.8                # 5-fold cross-validation trains on 4/5 of the cases

# Analytic CPU speed, calibrated on the timings in /work/shared/design/environment.md
# (2 threads; see docs/planning.md). Convolutions run at CPU_CONV_GFLOPS per thread-pair,
# every stored feature-map element costs CPU_ELEMENT_NS (norm, activation, their backward,
# memory traffic), plus a fixed per-iteration overhead (optimiser step, Python).
CPU_REFERENCE_THREADS = 2
CPU_CONV_GFLOPS = 170.0
CPU_ELEMENT_NS = 1.1
CPU_ITERATION_OVERHEAD_S = 0.02
# Analytic GPU speed (used only for a GPU plan with a time budget): effective mixed-precision
# throughput of a mid-range data-centre GPU on these networks, deliberately conservative.
GPU_CONV_TFLOPS = 25.0
GPU_ELEMENT_NS = 0.004
GPU_ITERATION_OVERHEAD_S = 0.03

PROBE_WARMUP = 2
PROBE_TIMED = 3
CLASSIFIER_ARCHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                    "resnet50": ("bottleneck", [3, 4, 6, 3])}


# ---------------------------------------------------------------------------------------
# Network topology (nnU-Net's get_pool_and_conv_props, re-derived)
# ---------------------------------------------------------------------------------------
@dataclass
class Topology:
    strides: list          # per stage, per axis; strides[0] all ones
    kernel_sizes: list     # per stage, per axis
    patch_size: list       # padded to a multiple of the total stride
    divisor: list          # total stride per axis


def unet_topology(spacing, patch_size) -> Topology:
    """Downsample every axis that still has room and is not much coarser than the finest one.

    Per step an axis is pooled (stride 2) when its feature map is at least
    ``2 * MIN_FEATURE_MAP`` and its current spacing is within 2x of the finest poolable
    axis; a lone poolable axis needs ``3 * MIN_FEATURE_MAP`` (pooling only one axis buys
    little). Kernels are 1 on an axis while it is >= 2x coarser than the finest axis
    (in-plane convolutions first for thick-slice data), 3 otherwise.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch_size]
    kernel = [1] * dim
    strides = [[1] * dim]
    kernels = []
    pools_per_axis = [0] * dim
    while True:
        candidates = [a for a in range(dim) if current_size[a] >= 2 * MIN_FEATURE_MAP]
        if not candidates:
            break
        finest = min(current_spacing[a] for a in candidates)
        candidates = [a for a in candidates if current_spacing[a] / finest < 2]
        if len(candidates) == 1 and current_size[candidates[0]] < 3 * MIN_FEATURE_MAP:
            break
        finest_all = min(current_spacing)
        kernel = [3 if kernel[a] == 3 or current_spacing[a] / finest_all < 2 else 1
                  for a in range(dim)]
        kernels.append(list(kernel))
        stride = [2 if a in candidates else 1 for a in range(dim)]
        strides.append(stride)
        for a in candidates:
            pools_per_axis[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
    kernels.append([3] * dim)      # the bottleneck always sees a 3-kernel
    divisor = [2 ** n for n in pools_per_axis]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
    return Topology(strides, kernels, padded, divisor)


def unet_network(topology: Topology, base_features: int, dim: int) -> dict:
    n_stages = len(topology.strides)
    features = [min(MAX_FEATURES[dim], base_features * 2 ** s) for s in range(n_stages)]
    return {"n_stages": n_stages, "features_per_stage": features,
            "strides": [list(s) for s in topology.strides],
            "kernel_sizes": [list(k) for k in topology.kernel_sizes],
            "conv_per_stage": CONV_PER_STAGE}


# ---------------------------------------------------------------------------------------
# Cost model: feature maps, parameters and FLOPs of the planned networks
# ---------------------------------------------------------------------------------------
@dataclass
class Layer:
    kind: str        # 'conv' | 'norm' | 'act' | 'convtranspose' | 'concat' | 'head' | 'pool' | 'linear'
    channels: int
    voxels: int      # per sample
    stored: bool     # kept alive for backward (a new tensor, not an in-place result)
    flops: float = 0.0   # forward multiply-adds x 2, per sample
    params: int = 0

    @property
    def elements(self) -> int:
        return self.channels * self.voxels


def unet_layers(network: dict, patch_size, in_channels: int, n_classes: int) -> list[Layer]:
    """Every tensor the plain U-Net of ``autoplan/nets/unet.py`` makes, per sample.

    Mirrors that module: conv (bias) -> InstanceNorm (affine) -> LeakyReLU(inplace) blocks,
    strided first conv, transposed-conv upsampling, skip concatenation, a 1x1 head per
    decoder stage. In-place activations overwrite the norm output, so they add no memory;
    transposed-conv outputs only feed the concatenation and are freed after it.
    """
    features = list(network["features_per_stage"])[: network["n_stages"]]
    strides = network["strides"]
    kernels = network["kernel_sizes"]
    n_conv = int(network.get("conv_per_stage", CONV_PER_STAGE))
    shape = np.array(patch_size, dtype=np.int64)
    voxels = []
    for stride in strides:
        shape = shape // np.array(stride)
        voxels.append(int(np.prod(shape)))
    layers = []

    def conv_block(cin, cout, kernel, vox):
        k = int(np.prod(kernel))
        layers.append(Layer("conv", cout, vox, True, 2.0 * k * cin * cout * vox, k * cin * cout + cout))
        layers.append(Layer("norm", cout, vox, True, 0.0, 2 * cout))
        layers.append(Layer("act", cout, vox, False))

    channels = in_channels
    for s, f in enumerate(features):
        for j in range(n_conv):
            conv_block(channels if j == 0 else f, f, kernels[s], voxels[s])
        channels = f
    for s in range(len(features) - 2, -1, -1):
        f, f_below, vox = features[s], features[s + 1], voxels[s]
        k_up = int(np.prod(strides[s + 1]))
        layers.append(Layer("convtranspose", f, vox, False, 2.0 * f_below * f * vox,
                            k_up * f_below * f + f))
        layers.append(Layer("concat", 2 * f, vox, True))
        for j in range(n_conv):
            conv_block(2 * f if j == 0 else f, f, kernels[s], vox)
        layers.append(Layer("head", n_classes, vox, True, 2.0 * f * n_classes * vox,
                            f * n_classes + n_classes))
    return layers


def resnet_layers(arch: str, width: int, input_size, in_channels: int, n_classes: int) -> list[Layer]:
    """Every tensor of ``autoplan/nets/resnet.py``'s ResNet (torchvision layout), per sample."""
    kind, blocks = CLASSIFIER_ARCHS[arch]
    layers = []
    size = [int(s) for s in input_size]

    def down(sz, stride):
        return [(s + stride - 1) // stride for s in sz]

    def conv(cin, cout, k, sz, stored=True):
        vox = int(np.prod(sz))
        layers.append(Layer("conv", cout, vox, stored, 2.0 * k * k * cin * cout * vox, k * k * cin * cout))

    def bn(c, sz, stored):
        layers.append(Layer("norm", c, int(np.prod(sz)), stored, 0.0, 2 * c))

    def relu(c, sz):
        layers.append(Layer("act", c, int(np.prod(sz)), False))

    size = down(size, 2)
    conv(in_channels, width, 7, size)
    bn(width, size, True)
    relu(width, size)
    size = down(size, 2)
    # max pool: output kept (next conv's input) plus int64 indices (4 fp16-elements' worth)
    layers.append(Layer("pool", width, int(np.prod(size)), True))
    channels = width
    expansion = 1 if kind == "basic" else 4
    for stage, n_blocks in enumerate(blocks):
        planes = width * 2 ** stage
        for b in range(n_blocks):
            stride = 2 if (stage > 0 and b == 0) else 1
            out_size = down(size, stride)
            if kind == "basic":
                conv(channels, planes, 3, out_size)
                bn(planes, out_size, True)
                relu(planes, out_size)
                conv(planes, planes, 3, out_size)
                bn(planes, out_size, False)       # consumed by the residual add
            else:
                conv(channels, planes, 1, size)
                bn(planes, size, True)
                relu(planes, size)
                conv(planes, planes, 3, out_size)
                bn(planes, out_size, True)
                relu(planes, out_size)
                conv(planes, planes * 4, 1, out_size)
                bn(planes * 4, out_size, False)
            out_channels = planes * expansion
            if stride != 1 or channels != out_channels:
                conv(channels, out_channels, 1, out_size)
                bn(out_channels, out_size, False)
            # residual sum (a new tensor), then the in-place ReLU module
            layers.append(Layer("concat", out_channels, int(np.prod(out_size)), True))
            relu(out_channels, out_size)
            channels, size = out_channels, out_size
    layers.append(Layer("linear", n_classes, 1, True, 2.0 * channels * n_classes,
                        channels * n_classes + n_classes))
    return layers


def configuration_layers(configuration: Configuration) -> list[Layer]:
    if configuration.name == "classifier":
        net = configuration.network
        return resnet_layers(net["arch"], int(net.get("width", 64)), configuration.patch_size,
                             configuration.n_input_channels, configuration.n_outputs)
    return unet_layers(configuration.network, configuration.patch_size,
                       configuration.n_input_channels, configuration.n_outputs)


def memory_breakdown(configuration: Configuration, precision: str = "fp16") -> dict:
    """Bytes of the training peak, by component (no CUDA context; see estimate_training_memory_gb).

    ``fp16``: mixed precision (activations in half, fp32 master weights plus a half copy
    that autocast keeps for backward); ``fp32``: everything single precision.
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    act_bytes = 2 if precision == "fp16" else 4
    layers = configuration_layers(configuration)
    batch = configuration.batch_size
    params = sum(layer.params for layer in layers)
    stored = sum(layer.elements for layer in layers if layer.stored and layer.kind not in ("head", "linear"))
    outputs = sum(layer.elements for layer in layers if layer.kind in ("head", "linear"))
    input_elements = configuration.n_input_channels * int(np.prod(configuration.patch_size))
    largest = max(layer.elements for layer in layers)
    state_copies = OPTIMIZER_STATE_COPIES.get(configuration.optimizer, 2)
    return {
        "parameters": params,
        # fp32 weights, their gradients, optimiser state, and under AMP a half copy of the weights
        "weights": params * 4,
        "gradients": params * 4,
        "optimizer_state": params * 4 * state_copies,
        "half_weights": params * 2 if precision == "fp16" else 0,
        # the fp32 batch plus, under AMP, its half-precision cast for the first conv
        "input": batch * input_elements * (4 + (2 if precision == "fp16" else 0)),
        "activations": batch * stored * act_bytes,
        # logits, plus ~4 fp32 tensors the loss builds per output (upcast, softmax, log-softmax,
        # one-hot target)
        "outputs_and_loss": batch * outputs * (act_bytes + 16),
        # during backward the gradient of the current tensor and of its input coexist
        "backward_transient": 2 * batch * largest * act_bytes,
    }


def estimate_training_memory_gb(configuration: Configuration, precision: str = "fp16",
                                device: str = "cuda") -> float:
    """Estimated peak training memory in GB (1e9 bytes) at the configuration's batch size.

    The sum of :func:`memory_breakdown` (what ``torch.cuda.max_memory_allocated`` measures)
    plus ``CUDA_CONTEXT_GB`` on a GPU (the context lives outside the caching allocator).
    """
    parts = memory_breakdown(configuration, precision)
    total = sum(v for k, v in parts.items() if k != "parameters") / 1e9
    return total + (CUDA_CONTEXT_GB if device == "cuda" else 0.0)


def training_flops(configuration: Configuration) -> float:
    """Forward + backward FLOPs of one iteration (backward ~ 2x forward)."""
    layers = configuration_layers(configuration)
    return 3.0 * configuration.batch_size * sum(layer.flops for layer in layers)


def _elementwise_elements(configuration: Configuration) -> float:
    layers = configuration_layers(configuration)
    return configuration.batch_size * sum(layer.elements for layer in layers)


def estimate_seconds_per_iteration(configuration: Configuration, device: str = "cpu",
                                   n_threads: int | None = None) -> float:
    """Analytic seconds for one training iteration (forward, backward, optimiser step).

    ``conv FLOPs / rate + feature-map elements x cost per element + overhead``; the CPU
    constants are calibrated on 2 threads and scaled linearly with ``n_threads`` (default:
    the cores available here), the GPU constants are a conservative guess.
    """
    flops = training_flops(configuration)
    elements = _elementwise_elements(configuration)
    if device == "cuda":
        return GPU_ITERATION_OVERHEAD_S + flops / (GPU_CONV_TFLOPS * 1e12) + elements * GPU_ELEMENT_NS * 1e-9
    threads = n_threads or available_cores()
    speedup = max(threads, 1) / CPU_REFERENCE_THREADS
    compute = flops / (CPU_CONV_GFLOPS * 1e9) + elements * CPU_ELEMENT_NS * 1e-9
    return CPU_ITERATION_OVERHEAD_S + compute / speedup


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1
