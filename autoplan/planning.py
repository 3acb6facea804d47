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
import re
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
    mirror_axes: list | None = None    # axes augmentation and TTA may mirror (None: every axis)
    max_rotation_degrees: float | None = None       # cap on augmentation rotation (None: the preset's)
    # added by the planner (defaults keep older plans loadable)
    median_image_size: list = field(default_factory=list)   # median shape at the target spacing
    samples_seen_epochs: float | None = None        # epochs × its × batch × patch / training voxels
    precision: str = ""                # autocast in training: 'fp16' | 'bf16' | 'fp32' ('': fp16 on CUDA,
                                       #   fp32 on CPU, as plans made before the field)
    field_of_view: dict = field(default_factory=dict)   # {"mode": "fit", "working_size": [H, W]} for images
                                       #   without a pixel size ({}: resample by the images' own spacing)


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
MIN_EPOCHS = 10                     # a time budget is cut into at least this many epochs
CPU_REFIT_ROUNDS = 3                # choose, measure the choice, choose again if it was off
CPU_DEFAULT_BUDGET_MINUTES = 60.0   # CPU plan without a budget: the plan for 60 minutes
VAL_ITERATION_COST = 0.35           # a validation iteration (forward only) vs a training one
CPU_LOADER_OVERHEAD = 1.15          # augmentation competes with training for the same cores
# Whole-image classifier batches cost more to augment per training second (a warp and colour
# jitter of every image, about 33 ms of one core per batch of 32 at 96x128): HAM10000 epochs
# of 50 iterations took 11.8 s at 96x128 on 2 cores against a probe of 0.142 s per iteration
# (x1.49 with the per-epoch check), and 15.5 s at 128x160 against about 0.225 s (x1.23).
# 1.3 sits between; the learning-rate schedule follows elapsed time, so a plan that is
# 10 % optimistic still ends its schedule with the budget.
CLASSIFIER_CPU_LOADER_OVERHEAD = 1.3
GRAD_CLIP = 12.0                    # gradient-norm clip of training, repeated by the probe
EPOCH_VALIDATION_PER_CLASS = 100    # classifier's per-epoch check: at most this many images a class
RESERVE_FRACTION = 0.10             # of the budget kept for final validation and the report
RESERVE_MIN_SECONDS = 20.0          # small 2D validation sets take seconds; the loop measures the rest
MIN_ITERATIONS = 500                # fewer optimiser steps than this barely trains a U-Net
SAME_DATA_FRACTION = 0.85           # candidates seeing this share of the most data count as equal
TARGET_EPOCHS_SEGMENTATION = 50.0   # "epochs-equivalent" of samples seen that we aim for
TARGET_EPOCHS_CLASSIFICATION = 25.0  # passes over the training images (HAM10000 evidence in docs/planning.md)
MIN_CPU_FEATURES = 16               # narrower U-Nets lose too much capacity
LAST_RESORT_FEATURES = 8            # only when 16 cannot make MIN_ITERATIONS in the budget
TRAIN_FRACTION = 0.8                # 5-fold cross-validation trains on 4/5 of the cases

# Analytic CPU speed, calibrated on the timings in /work/shared/design/environment.md
# (2 threads, forward + backward + SGD step; see docs/planning.md). Convolutions run at a
# per-family rate (3D convs are the most compute-dense, 1x1-heavy bottleneck ResNets the
# least), every feature-map element costs CPU_ELEMENT_NS (norm, activation, their backward,
# memory traffic), plus a fixed per-iteration overhead (optimiser step, Python).
CPU_REFERENCE_THREADS = 2
CPU_CONV_GFLOPS = {"unet3d": 340.0, "unet2d": 173.0, "resnet_basic": 314.0, "resnet_bottleneck": 198.0}
CPU_ELEMENT_NS = 0.5
CPU_ITERATION_OVERHEAD_S = 0.02
# Analytic GPU speed (used only for a GPU plan with a time budget): effective mixed-precision
# throughput of a mid-range data-centre GPU on these networks, deliberately conservative.
GPU_CONV_TFLOPS = 25.0
GPU_ELEMENT_NS = 0.004
GPU_ITERATION_OVERHEAD_S = 0.03

PROBE_WARMUP = 2
PROBE_TIMED = 3
# A probe on a machine busy with something else can be 10x off; measured/analytic ratios
# outside this range are clamped (and noted) rather than trusted.
PROBE_RATIO_RANGE = (0.25, 4.0)
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
    kind: str        # 'conv' | 'norm' | 'act' | 'convtranspose' | 'concat' | 'head' | 'pool' | 'indices' | 'linear'
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
    # max pool: output kept (next conv's input) plus the int64 indices its backward needs
    layers.append(Layer("pool", width, int(np.prod(size)), True))
    layers.append(Layer("indices", width, int(np.prod(size)), False))
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
    indices = sum(layer.elements for layer in layers if layer.kind == "indices")
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
        "pool_indices": batch * indices * 8,
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
    rate = CPU_CONV_GFLOPS[network_family(configuration)]
    compute = flops / (rate * 1e9) + elements * CPU_ELEMENT_NS * 1e-9
    return CPU_ITERATION_OVERHEAD_S + compute / speedup


def network_family(configuration: Configuration) -> str:
    """Which calibrated CPU rate applies: 'unet3d', 'unet2d', 'resnet_basic' or 'resnet_bottleneck'."""
    if configuration.name == "classifier":
        return "resnet_" + CLASSIFIER_ARCHS[configuration.network["arch"]][0]
    return "unet3d" if configuration.dim == 3 else "unet2d"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def _default_precision(device: str) -> str:
    from autoplan.nets import default_precision      # nets pulls in torch: import late

    return default_precision(device)


def _cpu_memory_reason(memory_gb: float) -> str:
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


# ---------------------------------------------------------------------------------------
# Throughput probe: a few real iterations, cached in RESULTS/NAME/throughput.json
# ---------------------------------------------------------------------------------------
# Part of every cache key: bump it when what one probe iteration does changes (version 2: fused
# Adam/AdamW steps), so older measurements are re-taken rather than trusted.
PROBE_VERSION = 2


class ThroughputCache:
    """Measured seconds per iteration by candidate; re-planning reuses them (determinism)."""

    def __init__(self, path: Path | None, device: str):
        self.path = path
        self.device = device
        self.threads = available_cores()
        self.entries = {}
        if path is not None and path.is_file():
            try:
                self.entries = dict(read_json(path).get("entries", {}))
            except (ValueError, OSError, AttributeError):
                self.entries = {}      # a damaged cache is re-measured, not trusted
        self.measured_now = 0
        self.fresh = set()             # keys measured by this planner run

    def _implausible(self, configuration: Configuration, key: str) -> bool:
        ratio = float(self.entries[key]) / estimate_seconds_per_iteration(configuration, self.device)
        return not PROBE_RATIO_RANGE[0] <= ratio <= PROBE_RATIO_RANGE[1]

    def key(self, configuration: Configuration) -> str:
        from autoplan.nets import memory_format

        return json.dumps({"probe": PROBE_VERSION, "device": self.device, "threads": self.threads,
                           "layout": str(memory_format(configuration.dim)),
                           "precision": _default_precision(self.device),
                           "name": configuration.name, "network": configuration.network,
                           "patch_size": configuration.patch_size,
                           "batch_size": configuration.batch_size,
                           "in": configuration.n_input_channels,
                           "out": configuration.n_outputs}, sort_keys=True)

    def seconds(self, configuration: Configuration) -> float:
        key = self.key(configuration)
        if key not in self.entries or (key not in self.fresh and self._implausible(configuration, key)):
            # new, or cached from a busy machine (a figure the planner clamps): measure again,
            # once per plan, rather than let one noisy probe shape every later plan
            self.entries[key] = measure_seconds_per_iteration(configuration, self.device)
            self.fresh.add(key)
            self.measured_now += 1
            if self.path is not None:
                write_json(self.path, {"note": "seconds per training iteration measured by the "
                                               "planner's probe (forward, backward and the "
                                               "configuration's optimiser step on random data); "
                                               "delete to re-measure",
                                       "entries": self.entries})
        return float(self.entries[key])


def measure_seconds_per_iteration(configuration: Configuration, device: str = "cpu") -> float:
    """Time PROBE_TIMED training iterations after PROBE_WARMUP on random data (mean seconds)."""
    import torch
    import torch.nn.functional as F

    from autoplan.nets import autocast, default_precision, memory_format
    from autoplan.runs import build_optimizer      # runs imports this module: import late

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        generator = torch.Generator().manual_seed(0)
        if configuration.name == "classifier":
            from autoplan.nets.resnet import build_resnet

            net = build_resnet(configuration.network["arch"], configuration.n_input_channels,
                               configuration.n_outputs, int(configuration.network.get("width", 64)))
        else:
            from autoplan.nets.unet import build_unet

            net = build_unet(configuration, deep_supervision=True)
        layout = memory_format(configuration.dim)      # as training lays the network out
        net = net.to(device, memory_format=layout).train()
        # The optimiser and clipping training uses: AdamW's step and the gradient-norm pass cost
        # a ResNet-18 at batch 32 a fifth of an iteration on 2 cores.
        task_type = "classification" if configuration.name == "classifier" else "segmentation"
        optimizer = build_optimizer(configuration.optimizer, net.parameters(), 1e-4, task_type)
        shape = [configuration.batch_size, configuration.n_input_channels, *configuration.patch_size]
        x = torch.randn(shape, generator=generator).to(device).contiguous(memory_format=layout)
        precision = default_precision(device)         # as training will run the plan

        def step():
            with autocast(device, precision):
                outputs = net(x)
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                loss = 0.0
                for out in outputs:
                    if out.dim() == 2:
                        target = torch.zeros(out.shape[0], dtype=torch.long, device=device)
                    else:
                        target = torch.zeros((out.shape[0], *out.shape[2:]), dtype=torch.long, device=device)
                    loss = loss + F.cross_entropy(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            optimizer.step()

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        for _ in range(PROBE_WARMUP):
            step()
        sync()
        times = []
        for _ in range(PROBE_TIMED):       # the median resists one iteration hit by another process
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    finally:
        torch.set_num_threads(previous_threads)


class SpeedModel:
    """Seconds per iteration of a candidate: analytic, or analytic scaled by a probe.

    The probe measures one candidate per network width (at the smallest batch) and the
    ratio measured/analytic rescales the analytic estimate of the same width at other
    batch sizes; the chosen candidate is then measured itself, and that exact figure
    replaces the scaled estimate wherever the same candidate is considered again (CPU
    time per sample is not constant in the batch size, so a choice can change once
    measured: see ``plan_unet_configuration``).
    """

    def __init__(self, device: str, cache: ThroughputCache | None):
        self.device = device
        self.cache = cache
        self.ratios = {}
        self.exact = {}            # candidate key -> clamped measured seconds
        self.failure = None        # why the probe could not run (then everything is analytic)
        self.clamped = []          # implausible measurements that were clamped

    @property
    def measured(self) -> bool:
        return self.cache is not None

    def _family(self, configuration):
        return json.dumps([configuration.name, configuration.network.get("arch"),
                           _base_width(configuration)])

    def seconds(self, configuration: Configuration) -> float:
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        if self.cache is None:
            return analytic
        if self._key(configuration) in self.exact:
            return self.exact[self._key(configuration)]
        family = self._family(configuration)
        if family not in self.ratios:
            # Classifier candidates share one batch size, so the probe measures that batch
            # (CPU time per sample at batch 2 is far from that at 32); U-Net batches vary.
            batch = configuration.batch_size if configuration.name == "classifier" else MIN_BATCH
            reference = replace(configuration, batch_size=batch)
            measured = self._measure(reference)
            if measured is None:
                return analytic
            self.ratios[family] = self._clamped_ratio(measured, reference)
        return analytic * self.ratios[family]

    def _key(self, configuration):
        return json.dumps([self._family(configuration), configuration.batch_size, configuration.patch_size])

    def final_seconds(self, configuration: Configuration) -> float:
        measured = self._measure(configuration) if self.cache is not None else None
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        if measured is None:
            return analytic
        seconds = analytic * self._clamped_ratio(measured, configuration)
        self.exact[self._key(configuration)] = seconds
        return seconds

    def _clamped_ratio(self, measured: float, configuration: Configuration) -> float:
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        low, high = PROBE_RATIO_RANGE
        ratio = measured / analytic
        if not low <= ratio <= high:
            self.clamped.append(f"probe measured {measured:.3f} s for {configuration.name} "
                                f"(width {_base_width(configuration)}, batch {configuration.batch_size}), "
                                f"{ratio:.2f}x the model: clamped to {min(max(ratio, low), high):g}x "
                                f"(a busy machine?)")
        return min(max(ratio, low), high)

    def _measure(self, configuration: Configuration) -> float | None:
        try:
            return self.cache.seconds(configuration)
        except Exception as error:     # a probe must never stop planning: fall back to the model
            self.failure = f"throughput probe failed ({type(error).__name__}: {error}); analytic estimates used"
            self.cache, self.ratios = None, {}
            return None


# ---------------------------------------------------------------------------------------
# Time budget -> schedule
# ---------------------------------------------------------------------------------------
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


def training_seconds(budget_minutes: float) -> float:
    """The part of the budget left for training after reserving time for validation/report."""
    budget = budget_minutes * 60.0
    reserve = min(max(RESERVE_FRACTION * budget, RESERVE_MIN_SECONDS), 0.5 * budget)
    return budget - reserve


def epoch_seconds(seconds_per_iteration: float, iterations_per_epoch: int, val_iterations_per_epoch: int) -> float:
    """Planned seconds of one epoch: its training iterations plus the per-epoch check's."""
    return seconds_per_iteration * (iterations_per_epoch + VAL_ITERATION_COST * val_iterations_per_epoch)


def fit_schedule(seconds_per_iteration: float, budget_minutes: float, iterations_per_epoch: int,
                 val_iterations_per_epoch: int, max_epochs: int | None = None) -> Schedule:
    usable = training_seconds(budget_minutes)
    seconds_per_epoch = epoch_seconds(seconds_per_iteration, iterations_per_epoch, val_iterations_per_epoch)
    if usable < MIN_EPOCHS * seconds_per_epoch:
        # short budgets: shorter epochs, so the curves, the best-checkpoint choice and the
        # stopping decision still have several epochs to work with
        iterations_per_epoch = max(2, int(usable / (MIN_EPOCHS * seconds_per_iteration)
                                          - VAL_ITERATION_COST * val_iterations_per_epoch))
        seconds_per_epoch = epoch_seconds(seconds_per_iteration, iterations_per_epoch, val_iterations_per_epoch)
    epochs = max(1, int(usable // seconds_per_epoch))
    if max_epochs is not None:
        epochs = min(epochs, max_epochs)
    return Schedule(epochs, iterations_per_epoch, val_iterations_per_epoch, seconds_per_iteration, usable)


def epochs_fill_budget(configuration: Configuration, budget_minutes: float | None) -> bool:
    """Whether ``budget_minutes`` is what limits the configuration's epochs (one more planned
    epoch would not fit, as in ``fit_schedule``), rather than a maximum or a longer budget."""
    seconds = configuration.expected_seconds_per_iteration
    if not budget_minutes or not seconds:
        return False
    per_epoch = epoch_seconds(seconds, configuration.iterations_per_epoch,
                              configuration.val_iterations_per_epoch or 0)
    return (configuration.epochs + 1) * per_epoch > training_seconds(budget_minutes)


def loader_overhead(configuration: Configuration, device: str) -> float:
    if device != "cpu":
        return 1.0
    return CLASSIFIER_CPU_LOADER_OVERHEAD if configuration.name == "classifier" else CPU_LOADER_OVERHEAD


def _per_iteration(seconds: float, configuration: Configuration, device: str) -> float:
    return seconds * loader_overhead(configuration, device)


# ---------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------
def target_spacing(fingerprint) -> list:
    """Median spacing; an axis > 3x coarser than the others (in spacing and with > 3x fewer
    voxels) takes its 10th percentile instead, never finer than the other axes (nnU-Net)."""
    spacings = np.array(fingerprint.spacings, dtype=np.float64)
    shapes = np.array(_shapes_after_crop(fingerprint), dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    if len(target) < 2:
        return target.tolist()
    median_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    coarse_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    few_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[a] for a in others)
    if coarse_spacing and few_voxels:
        tenth = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(tenth, max(target[a] for a in others) + 1e-5)
    return [round(float(s), 6) for s in target]


def _shapes_after_crop(fingerprint) -> list:
    shapes = fingerprint.cropped_shapes or fingerprint.shapes
    return [list(s) for s in shapes]


def median_shape_at(fingerprint, spacing) -> list:
    """Median over cases of the shape after cropping, resampled to ``spacing``."""
    shapes = np.array(_shapes_after_crop(fingerprint), dtype=np.float64)
    spacings = np.array(fingerprint.spacings, dtype=np.float64)
    resampled = np.round(shapes * spacings / np.array(spacing, dtype=np.float64))
    return [float(v) for v in np.median(resampled, axis=0)]


def initial_patch(spacing, median_shape) -> list:
    """nnU-Net: a patch of 256³ (2048²) voxels with the aspect ratio of 1/spacing, clipped
    to the median shape (a larger patch than the images it is cut from makes no sense)."""
    dim = len(spacing)
    inverse = 1.0 / np.array(spacing, dtype=np.float64)
    scaled = inverse * (INITIAL_PATCH_EDGE[dim] ** dim / np.prod(inverse)) ** (1.0 / dim)
    return [int(max(1, min(round(p), round(m)))) for p, m in zip(scaled, median_shape)]


@dataclass
class UNetFit:
    configuration: Configuration
    shrunk: bool
    fits: bool
    batch_reason: str


def _unet_configuration(name, dim, topology, spacing, batch, base_features, in_channels, n_outputs,
                        median_shape) -> Configuration:
    return Configuration(name=name, dim=dim, patch_size=list(topology.patch_size), batch_size=batch,
                         spacing=[round(float(s), 6) for s in spacing],
                         network=unet_network(topology, base_features, dim), normalization=[],
                         estimated_memory_gb=0.0, epochs=0, iterations_per_epoch=0,
                         n_input_channels=in_channels, n_outputs=n_outputs,
                         median_image_size=[int(round(m)) for m in median_shape])


def shrink_patch(spacing, topology: Topology, median_shape) -> Topology | None:
    """One nnU-Net shrink step: the axis largest relative to the median shape loses one
    divisor's worth (re-derived for the smaller size so no valid size is skipped).
    None when no axis can shrink any further."""
    ratios = [p / max(m, 1.0) for p, m in zip(topology.patch_size, median_shape)]
    for axis in sorted(range(len(ratios)), key=lambda a: (-ratios[a], a)):
        trial = list(topology.patch_size)
        trial[axis] -= topology.divisor[axis]
        if trial[axis] < MIN_FEATURE_MAP:
            continue
        divisor = unet_topology(spacing, trial).divisor
        smaller = list(topology.patch_size)
        smaller[axis] -= divisor[axis]
        if smaller[axis] < MIN_FEATURE_MAP:
            continue
        return unet_topology(spacing, smaller)
    return None


def batch_cap(total_voxels: float, patch_size, dim: int) -> int:
    """nnU-Net: one batch covers at most 5% of the dataset's voxels (never below 2)."""
    cap = round(total_voxels * MAX_DATASET_COVERED / float(np.prod(patch_size, dtype=np.float64)))
    return int(max(MIN_BATCH, min(cap, MAX_BATCH[dim])))


def fit_unet_to_memory(name, dim, spacing, median_shape, total_voxels, budget_gb, base_features,
                       in_channels, n_outputs, precision, device) -> UNetFit:
    """Largest patch (then batch) whose estimated training peak fits ``budget_gb``."""
    topology = unet_topology(spacing, initial_patch(spacing, median_shape))

    def build(topo, batch):
        return _unet_configuration(name, dim, topo, spacing, batch, base_features, in_channels,
                                   n_outputs, median_shape)

    limit = budget_gb * MEMORY_HEADROOM
    config = build(topology, MIN_BATCH)
    shrunk = False
    while estimate_training_memory_gb(config, precision, device) > limit:
        smaller = shrink_patch(spacing, topology, median_shape)
        if smaller is None:
            break
        topology, shrunk = smaller, True
        config = build(topology, MIN_BATCH)
    fits = estimate_training_memory_gb(config, precision, device) <= limit
    cap = batch_cap(total_voxels, topology.patch_size, dim)
    if shrunk or not fits:
        batch = MIN_BATCH
        reason = (f"minimum batch {MIN_BATCH}: the patch had to shrink to fit {budget_gb:g} GB"
                  if fits else f"minimum batch {MIN_BATCH}; even the smallest patch exceeds {budget_gb:g} GB")
    else:
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


def _patch_reason(fit: UNetFit, median_shape, budget_gb) -> str:
    patch = fit.configuration.patch_size
    base = (f"median image {[int(round(m)) for m in median_shape]} at target spacing, padded to a "
            f"multiple of the total stride {[int(v) for v in np.prod(np.array(fit.configuration.network['strides']), axis=0)]}")
    if fit.shrunk:
        return (f"{patch}: shrunk from the median image (largest axis relative to the median first) "
                f"until training fits {budget_gb:g} GB")
    return f"{patch}: the whole {base}"


def _network_reason(network: dict, base_features: int, dim: int) -> str:
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


def segmentation_normalization(fingerprint) -> tuple[list, str]:
    schemes, reasons = [], []
    use_mask = (fingerprint.median_relative_size_after_cropping is not None
                and fingerprint.median_relative_size_after_cropping < 0.75)
    for c, channel in enumerate(fingerprint.channels):
        stats = fingerprint.intensity[c] if fingerprint.intensity and c < len(fingerprint.intensity) else None
        if channel.kind == "ct" and stats is not None:
            schemes.append({"scheme": "ct", "clip": [float(stats.percentile_00_5), float(stats.percentile_99_5)],
                            "mean": float(stats.mean), "std": float(stats.std)})
            reasons.append(f"{channel.name}: CT (HU are comparable across scans): clip to the foreground "
                           f"0.5/99.5 percentiles, then z-score with the foreground mean/std")
        elif channel.kind == "rgb":
            mean, std = _rgb_stats(fingerprint, c, stats)
            schemes.append({"scheme": "rgb", "mean": mean, "std": std})
            reasons.append(f"{channel.name}: 8-bit colour: scale to 0..1, then the dataset's channel mean/std")
        elif use_mask:
            schemes.append({"scheme": "zscore_nonzero"})
            reasons.append(f"{channel.name}: per-image z-score inside the nonzero mask (cropping shrank "
                           f"images to {fingerprint.median_relative_size_after_cropping:.2f} of their size, "
                           f"so the zero background is not tissue)")
        else:
            schemes.append({"scheme": "zscore"})
            scales = " (intensity scales differ between cases)" if fingerprint.intensity_scales_differ else ""
            reasons.append(f"{channel.name}: per-image z-score ({channel.kind} intensities have no fixed "
                           f"unit){scales}")
    return schemes, "; ".join(reasons)


def _rgb_stats(fingerprint, c, stats) -> tuple[float, float]:
    if fingerprint.channel_mean and fingerprint.channel_std and c < len(fingerprint.channel_mean):
        return float(fingerprint.channel_mean[c]), max(float(fingerprint.channel_std[c]), 1e-6)
    if stats is not None:
        return float(stats.mean) / 255.0, max(float(stats.std) / 255.0, 1e-6)
    return 0.5, 0.25


def _n_segmentation_outputs(dataset, fingerprint) -> int:
    labels = getattr(dataset, "labels", None)
    if labels:
        return max(int(v) if not isinstance(v, (list, tuple)) else int(v[0]) for v in labels.values()) + 1
    if fingerprint.labels:
        return max(int(k) for k in fingerprint.labels) + 1
    return 2


REFERENCE_GPU_GB = 8.0              # nnU-Net's default target; CPU plans start from its patch
CLASSIFIER_GPU_EPOCHS = 100
CLASSIFIER_MAX_BATCH = 128
CLASSIFIER_CPU_BATCH = 32
CLASSIFIER_MAX_EDGE = 512           # beyond this ResNets gain little per extra pixel
CLASSIFIER_MIN_EDGE = 64
BATCH_STEPS = (2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def _batch_candidates(cap: int) -> list[int]:
    return sorted({cap, *[b for b in BATCH_STEPS if b < cap]}, reverse=True)


def _cpu_widths(base_features: int) -> list[int]:
    """base, base/2, ... down to MIN_CPU_FEATURES (or just base when it is already narrower)."""
    widths = [base_features]
    while widths[-1] // 2 >= MIN_CPU_FEATURES:
        widths.append(widths[-1] // 2)
    return widths


def _ram_limit_gb() -> float:
    """Half the machine's memory: the loader workers and the OS need the rest."""
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def _base_width(configuration: Configuration) -> int:
    net = configuration.network
    return int(net["features_per_stage"][0]) if "features_per_stage" in net else int(net.get("width", 64))


@dataclass
class Candidate:
    configuration: Configuration
    schedule: Schedule
    epochs_seen: float


def _evaluate(configuration: Configuration, speed: SpeedModel, budget_minutes: float,
              train_samples: float, sample_size: float, val_iterations: int = CPU_VAL_ITERATIONS) -> Candidate:
    seconds = _per_iteration(speed.seconds(configuration), configuration, speed.device)
    schedule = fit_schedule(seconds, budget_minutes, CPU_ITERATIONS_PER_EPOCH, val_iterations)
    seen = schedule.iterations * configuration.batch_size * sample_size / train_samples
    return Candidate(configuration, schedule, seen)


def _choose(candidates: list[Candidate], target_epochs: float) -> tuple[Candidate | None, str]:
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
        best = max(near, key=lambda c: (c.schedule.iterations, _base_width(c.configuration)))
        return best, (f"no candidate reaches {target_epochs:g} epochs-equivalent within the budget; "
                      f"of those seeing within {1 - SAME_DATA_FRACTION:.0%} of the most data with "
                      f">= {MIN_ITERATIONS} iterations, this one makes the most optimiser steps")
    return None, ""


def _tradeoff_text(candidates: list[Candidate], chosen: Candidate, target: float, why: str,
                   unit: str) -> str:
    lines = []
    by_width = {}
    for c in candidates:
        by_width.setdefault(_base_width(c.configuration), []).append(c)
    for width, group in by_width.items():
        best = max(group, key=lambda c: c.epochs_seen)
        lines.append(f"width {width}: at most {best.epochs_seen:.1f} epochs-eq "
                     f"({best.schedule.iterations} its x batch {best.configuration.batch_size})")
    return (f"CPU time budget: chose {unit} with {chosen.schedule.iterations} iterations, "
            f"{chosen.epochs_seen:.1f} epochs-equivalent of samples (target >= {MIN_ITERATIONS} "
            f"iterations and >= {target:g} epochs-eq; {why}). Considered: " + "; ".join(lines))


def fit_unet_to_time(name, dim, spacing, median_shape, total_voxels, base_features, in_channels,
                     n_outputs, budget_minutes, speed: SpeedModel) -> tuple[Candidate, str, bool]:
    """CPU: the widest U-Net and largest batch whose schedule fits the budget and sees enough data.

    Starts from the patch a default 8 GB GPU plan uses. When even the narrowest width at
    batch 2 cannot make MIN_ITERATIONS iterations, a last-resort width of 8 is tried, then
    (3D only) the patch shrinks. A 2D patch never shrinks: 2D images are small enough to
    see whole, and a network trained on crops of them loses the context it needs on the
    full image.
    """
    reference = fit_unet_to_memory(name, dim, spacing, median_shape, total_voxels, REFERENCE_GPU_GB,
                                   base_features, in_channels, n_outputs, "fp16", "cuda")
    topology = unet_topology(spacing, reference.configuration.patch_size)
    train_voxels = total_voxels * TRAIN_FRACTION
    ram = _ram_limit_gb()
    shrunk = reference.shrunk

    def candidates_for(widths):
        found = []
        cap = batch_cap(total_voxels, topology.patch_size, dim)
        for width in widths:
            for batch in _batch_candidates(cap):
                config = _unet_configuration(name, dim, topology, spacing, batch, width, in_channels,
                                             n_outputs, median_shape)
                if estimate_training_memory_gb(config, "fp32", "cpu") <= ram:
                    found.append(_evaluate(config, speed, budget_minutes, train_voxels,
                                           float(np.prod(topology.patch_size))))
        return found

    all_candidates = []
    while True:
        for widths in (_cpu_widths(base_features), [w for w in (LAST_RESORT_FEATURES,) if w < base_features]):
            candidates = candidates_for(widths)
            all_candidates += candidates
            chosen, why = _choose(candidates, TARGET_EPOCHS_SEGMENTATION)
            if chosen is not None:
                return chosen, _tradeoff_text(candidates, chosen, TARGET_EPOCHS_SEGMENTATION, why,
                                              f"base width {_base_width(chosen.configuration)}, batch "
                                              f"{chosen.configuration.batch_size}"), shrunk
        smaller = shrink_patch(spacing, topology, median_shape) if dim == 3 else None
        if smaller is None:
            # no patch size reaches enough steps: a tiny patch would only add context loss
            # on top of too few steps, so keep the planned patch and take its most steps
            first = [c for c in all_candidates if c.configuration.patch_size == reference.configuration.patch_size]
            best = max(first or all_candidates, key=lambda c: c.schedule.iterations)
            return best, (f"CPU time budget too small for {MIN_ITERATIONS} iterations even with the "
                          f"narrowest width: the planned patch with the most iterations possible "
                          f"({best.schedule.iterations})"), reference.shrunk
        topology, shrunk = smaller, True


def _finalise_cpu_schedule(candidate: Candidate, speed: SpeedModel, budget_minutes: float,
                           train_samples: float, sample_size: float,
                           val_iterations: int = CPU_VAL_ITERATIONS) -> Candidate:
    """Measure the chosen candidate itself (probe) and fit the schedule to that figure."""
    config = candidate.configuration
    seconds = round(_per_iteration(speed.final_seconds(config), config, speed.device), 4)
    schedule = fit_schedule(seconds, budget_minutes, CPU_ITERATIONS_PER_EPOCH, val_iterations)
    seen = schedule.iterations * config.batch_size * sample_size / train_samples
    return Candidate(config, schedule, seen)


def _speed_reason(speed: SpeedModel, seconds: float, configuration: Configuration) -> str:
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


def _schedule_reason(schedule: Schedule, budget_minutes: float | None, assumed: bool) -> str:
    if budget_minutes is None:
        return (f"nnU-Net's schedule: {schedule.epochs} epochs x {schedule.iterations_per_epoch} "
                f"iterations, {schedule.val_iterations_per_epoch} validation iterations per epoch")
    total = schedule.epochs * schedule.seconds_per_iteration * (
        schedule.iterations_per_epoch + VAL_ITERATION_COST * schedule.val_iterations_per_epoch)
    head = (f"no time budget given: CPU default = the plan for {budget_minutes:g} minutes"
            if assumed else f"time budget {budget_minutes:g} min")
    return (f"{head}; {training_seconds(budget_minutes) / 60:.1f} min for training (the rest, "
            f">= {RESERVE_MIN_SECONDS / 60:g} min / {RESERVE_FRACTION:.0%}, reserved for final "
            f"validation and the report): {schedule.epochs} epochs x {schedule.iterations_per_epoch} "
            f"iterations (+{schedule.val_iterations_per_epoch} validation) ~ {total / 60:.1f} min")


def plan_unet_configuration(name, dim, spacing, median_shape, total_voxels, *, device, budget_gb,
                            budget_minutes, assumed_budget, base_features, in_channels, n_outputs,
                            speed, normalization, normalization_reason) -> Configuration:
    reasons = {}
    if device == "cpu":
        for _ in range(CPU_REFIT_ROUNDS):
            candidate, tradeoff, shrunk = fit_unet_to_time(name, dim, spacing, median_shape, total_voxels,
                                                           base_features, in_channels, n_outputs,
                                                           budget_minutes, speed)
            predicted = candidate.schedule.seconds_per_iteration
            candidate = _finalise_cpu_schedule(candidate, speed, budget_minutes, total_voxels * TRAIN_FRACTION,
                                               float(np.prod(candidate.configuration.patch_size)))
            # the chosen candidate measured itself: if it is much slower than scaled from
            # the smaller-batch probe, choose again with that figure in hand
            if candidate.schedule.seconds_per_iteration <= predicted * 1.15:
                break
        config, schedule = candidate.configuration, candidate.schedule
        memory = estimate_training_memory_gb(config, "fp32", "cpu")
        patch = config.patch_size
        reasons["patch_size"] = (f"{patch}: " + ("shrunk so the CPU budget allows enough iterations"
                                                 if shrunk else
                                                 f"the whole median image {[int(round(m)) for m in median_shape]} "
                                                 f"at target spacing, padded to a multiple of the total stride"))
        reasons["batch_size"] = tradeoff
        reasons["estimated_memory_gb"] = _cpu_memory_reason(memory)
        seen = candidate.epochs_seen
    else:
        fit = fit_unet_to_memory(name, dim, spacing, median_shape, total_voxels, budget_gb, base_features,
                                 in_channels, n_outputs, "fp16", "cuda")
        config = fit.configuration
        memory = estimate_training_memory_gb(config, "fp16", "cuda")
        seconds = round(speed.final_seconds(config), 4)
        if budget_minutes is None:
            schedule = Schedule(GPU_DEFAULT_EPOCHS, GPU_ITERATIONS_PER_EPOCH, GPU_VAL_ITERATIONS, seconds, 0.0)
        else:
            schedule = fit_schedule(seconds, budget_minutes, GPU_ITERATIONS_PER_EPOCH, GPU_VAL_ITERATIONS,
                                    max_epochs=GPU_DEFAULT_EPOCHS)
        reasons["patch_size"] = _patch_reason(fit, median_shape, budget_gb)
        reasons["batch_size"] = fit.batch_reason
        reasons["estimated_memory_gb"] = (f"{memory:.2f} GB of {budget_gb:g} GB: mixed-precision activations "
                                          f"kept for backward, weights, gradients, SGD momentum and "
                                          f"{CUDA_CONTEXT_GB:g} GB CUDA context")
        seen = schedule.iterations * config.batch_size * float(np.prod(config.patch_size)) / (
            total_voxels * TRAIN_FRACTION)
    reasons["spacing"] = f"{config.spacing}"
    reasons["network"] = _network_reason(config.network, _base_width(config), dim)
    reasons["normalization"] = normalization_reason
    reasons["epochs"] = _schedule_reason(schedule, budget_minutes, assumed_budget)
    reasons["expected_seconds_per_iteration"] = _speed_reason(speed, schedule.seconds_per_iteration, config)
    reasons["loss"] = "Dice + cross-entropy with deep supervision, SGD lr 0.01 (nnU-Net's recipe)"
    precision = _default_precision(device)
    reasons["precision"] = precision_reason(precision)
    return replace(config, normalization=normalization, estimated_memory_gb=round(memory, 3),
                   precision=precision,
                   epochs=schedule.epochs, iterations_per_epoch=schedule.iterations_per_epoch,
                   val_iterations_per_epoch=schedule.val_iterations_per_epoch,
                   expected_seconds_per_iteration=schedule.seconds_per_iteration,
                   samples_seen_epochs=round(seen, 1), reasons=reasons)


def lowres_spacing_and_shape(spacing, median_shape, fullres_patch, plan_patch) -> tuple | None:
    """nnU-Net's 3d_lowres search: coarsen the spacing in 3% steps (anisotropic axes first)
    until the planned patch covers a quarter of the coarser median image. None when the
    fullres patch already covers a quarter, or the coarser image would not be at least
    2x smaller (then lowres brings nothing)."""
    median = np.array(median_shape, dtype=np.float64)
    if np.prod(fullres_patch, dtype=np.float64) / np.prod(median) >= LOWRES_THRESHOLD:
        return None
    fullres_spacing = np.array(spacing, dtype=np.float64)
    lowres = fullres_spacing.copy()
    lowres_median = median
    for _ in range(500):
        coarsest = lowres.max()
        fine_axes = coarsest / lowres > 2
        if fine_axes.any():
            lowres[fine_axes] *= LOWRES_SPACING_STEP
        else:
            lowres *= LOWRES_SPACING_STEP
        lowres_median = fullres_spacing / lowres * median
        patch = plan_patch(lowres.tolist(), lowres_median.tolist())
        if np.prod(patch, dtype=np.float64) / np.prod(lowres_median) >= LOWRES_THRESHOLD:
            break
    if np.prod(median) / np.prod(lowres_median) < 2:
        return None
    return [round(float(s), 6) for s in lowres], [float(m) for m in lowres_median]


FIELD_OF_VIEW_MODES = ("auto", "fit", "pixels")


def has_no_pixel_size(fingerprint) -> bool:
    """2D images whose every case carries the default spacing 1.0: PNG/JPEG/TIFF/BMP store no
    pixel size, so "1 mm" is a placeholder and new images of another size are not at the same scale."""
    return fingerprint.dim == 2 and all(all(float(s) == 1.0 for s in case) for case in fingerprint.spacings)


def plan_field_of_view(fingerprint, mode: str = "auto") -> tuple[dict, str]:
    """(field_of_view, reason): resample each image whole to the working size, or keep pixels/mm.

    ``auto`` fits the field of view for 2D datasets without a pixel size; ``fit`` forces it on
    a 2D dataset; ``pixels`` keeps today's pixel-as-millimetre behaviour (images that share
    one pixel size, e.g. microscopy at a fixed magnification).
    """
    if mode not in FIELD_OF_VIEW_MODES:
        raise InputError(None, f"unknown field-of-view mode {mode!r} (auto, fit, pixels)")
    if fingerprint.dim != 2 or mode == "pixels" or (mode == "auto" and not has_no_pixel_size(fingerprint)):
        why = ("--field-of-view pixels: images share one pixel size, so they are resampled by it"
               if mode == "pixels" else "images carry a physical spacing: resampled by it (mm)")
        return {}, why
    working = [int(round(m)) for m in fingerprint.median_shape]
    return ({"mode": "fit", "working_size": working},
            f"images store no pixel size: every image (training and new) is resized whole, aspect kept, to fit "
            f"the median image {working} and predictions are resized back, so a 1000-px radiograph is seen at "
            f"the scale the network learnt ({'forced by --field-of-view fit' if mode == 'fit' else 'auto'})")


def field_of_view_spacings(fingerprint, working_size) -> list:
    """Per case the virtual pixel size that fits the image into ``working_size`` (aspect kept)."""
    from autoplan.preprocessing import fit_scale

    return [[fit_scale(shape, working_size)] * len(shape) for shape in fingerprint.shapes]


def plan_segmentation(name, dataset, fingerprint, device, budget_gb, budget_minutes, assumed_budget,
                      base_features, speed, field_of_view_mode="auto") -> tuple[dict, str, list]:
    in_channels = len(fingerprint.channels)
    n_outputs = _n_segmentation_outputs(dataset, fingerprint)
    field_of_view, fov_reason = plan_field_of_view(fingerprint, field_of_view_mode)
    if field_of_view:
        # the working grid's unit is one pixel of an image at the working size
        fingerprint = replace(fingerprint, spacings=field_of_view_spacings(fingerprint,
                                                                          field_of_view["working_size"]))
        spacing = [1.0] * fingerprint.dim
    else:
        spacing = target_spacing(fingerprint)
    median = median_shape_at(fingerprint, spacing)
    total_voxels = float(np.prod(median, dtype=np.float64)) * fingerprint.n_cases
    normalization, norm_reason = segmentation_normalization(fingerprint)
    notes = []
    common = dict(device=device, budget_gb=budget_gb, budget_minutes=budget_minutes,
                  assumed_budget=assumed_budget, base_features=base_features, in_channels=in_channels,
                  n_outputs=n_outputs, speed=speed, normalization=normalization,
                  normalization_reason=norm_reason)
    spacing_reason = (f"{spacing}: one pixel of an image resized to the working size {field_of_view['working_size']}"
                      if field_of_view else _spacing_reason(fingerprint, spacing))
    configurations = {}
    if fingerprint.dim == 3:
        fullres = plan_unet_configuration("3d_fullres", 3, spacing, median, total_voxels, **common)
        lowres = _plan_lowres(spacing, median, fingerprint.n_cases, fullres, common, budget_gb, base_features,
                              in_channels, n_outputs, notes)
        fullres.batch_dice = lowres is not None
        fullres.reasons["spacing"] = spacing_reason
        fullres.reasons["batch_dice"] = ("Dice over the whole batch (a cascade follows)" if lowres is not None
                                         else "per-sample Dice (nnU-Net: batch Dice only with a lowres stage)")
        configurations["3d_fullres"] = fullres
        if lowres is not None:
            configurations["3d_lowres"] = lowres
        spacing_2d, median_2d = spacing[1:], median[1:]
    else:
        spacing_2d, median_2d = spacing, median
    config_2d = plan_unet_configuration("2d", 2, spacing_2d, median_2d, total_voxels, **common)
    config_2d.batch_dice = True
    config_2d.reasons["spacing"] = (spacing_reason if fingerprint.dim == 2 else
                                    f"in-plane axes of the 3D target spacing {spacing}")
    config_2d.reasons["batch_dice"] = "Dice over the whole batch (nnU-Net's 2d default)"
    configurations["2d"] = config_2d
    for configuration in configurations.values():
        _respect_label_sides(configuration, dataset, fingerprint)
        configuration.reasons["field_of_view"] = fov_reason
    config_2d.field_of_view = field_of_view
    ordered = {k: configurations[k] for k in ("2d", "3d_lowres", "3d_fullres") if k in configurations}
    default = "3d_fullres" if fingerprint.dim == 3 else "2d"
    return ordered, default, notes


SIDE_WORDS = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)", re.IGNORECASE)
LATERAL_MAX_ROTATION = 15.0


def _label_names(dataset, fingerprint) -> list:
    if dataset is not None and not isinstance(dataset, str) and getattr(dataset, "labels", None):
        return [name for name, value in dataset.labels.items() if value != 0]
    return [stats.name for stats in (fingerprint.labels or {}).values()]


def _respect_label_sides(configuration: Configuration, dataset, fingerprint) -> None:
    """Labels that name a side (left/right lung) must not be mirrored across the body.

    Mirroring the last array axis (x: left-right in radiographs and axial volumes) or
    rotating by up to 180 degrees turns a right lung into a left one, so the targets would
    contradict each other; mirroring stays on the other axes and rotation is capped.
    """
    sided = [name for name in _label_names(dataset, fingerprint) if SIDE_WORDS.search(name)]
    if not sided:
        configuration.reasons["mirror_axes"] = "every axis (no label names a side)"
        return
    configuration.mirror_axes = list(range(configuration.dim - 1))
    configuration.max_rotation_degrees = LATERAL_MAX_ROTATION
    configuration.reasons["mirror_axes"] = (
        f"labels {', '.join(sided)} name a side: no mirroring along x (it would swap them) "
        f"and rotation capped at {LATERAL_MAX_ROTATION:g} degrees, in training and TTA")


def _plan_lowres(spacing, median, n_cases, fullres, common, budget_gb, base_features, in_channels,
                 n_outputs, notes) -> Configuration | None:
    fullres_budget = budget_gb if common["device"] == "cuda" else REFERENCE_GPU_GB
    reference_patch = fit_unet_to_memory("3d_fullres", 3, spacing, median, float(np.prod(median)) * n_cases,
                                         fullres_budget, base_features, in_channels, n_outputs, "fp16",
                                         "cuda").configuration.patch_size
    coverage = float(np.prod(reference_patch, dtype=np.float64) / np.prod(median))

    def plan_patch(lowres_spacing, lowres_median):
        return fit_unet_to_memory("3d_lowres", 3, lowres_spacing, lowres_median,
                                  float(np.prod(lowres_median)) * n_cases, fullres_budget, base_features,
                                  in_channels, n_outputs, "fp16", "cuda").configuration.patch_size

    found = lowres_spacing_and_shape(spacing, median, reference_patch, plan_patch)
    if found is None:
        notes.append(f"no 3d_lowres: the 3d_fullres patch covers {coverage:.0%} of the median image "
                     f"(a lowres stage is planned below {LOWRES_THRESHOLD:.0%}, and only when it makes the "
                     f"image at least 2x smaller)")
        return None
    lowres_spacing, lowres_median = found
    config = plan_unet_configuration("3d_lowres", 3, lowres_spacing, lowres_median,
                                     float(np.prod(lowres_median)) * n_cases, **common)
    config.batch_dice = False
    config.reasons["spacing"] = (f"{lowres_spacing}: coarsened in {LOWRES_SPACING_STEP - 1:.0%} steps until "
                                 f"the patch covers >= {LOWRES_THRESHOLD:.0%} of the image (fullres covers "
                                 f"{coverage:.0%})")
    config.reasons["batch_dice"] = "per-sample Dice (nnU-Net's lowres default)"
    notes.append(f"3d_lowres planned: the 3d_fullres patch covers only {coverage:.0%} of the median image")
    return config


def _spacing_reason(fingerprint, spacing) -> str:
    median = [round(float(s), 6) for s in np.percentile(np.array(fingerprint.spacings, dtype=float), 50, axis=0)]
    if list(median) == list(spacing):
        return f"{spacing}: the median spacing of the dataset"
    return (f"{spacing}: median {median}, but the coarsest axis is > {ANISOTROPY_THRESHOLD:g}x coarser "
            f"than the others, so it takes the 10th percentile of its spacings (less interpolation)")


# ---------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------
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
POSTERIOR_CORRECTION = 0.5


def imbalance_handling(classes: list, counts: dict) -> dict:
    """ratio > 3: cross-entropy weighted by 1/frequency**0.25 (mean weight 1); else nothing.

    Mild weights correct part of the bias towards the majority class without giving up
    much accuracy, and without letting a class of a hundred images dominate the gradient
    (full inverse-frequency weights, or balanced sampling, would show each of those images
    tens of times more often and overfit).
    """
    values = np.array([float(counts.get(c, 0)) for c in classes])
    present = values[values > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    if ratio <= 3:
        return {"strategy": "none", "class_weights": [1.0] * len(classes), "classes": classes,
                "imbalance_ratio": round(ratio, 2),
                "reason": f"largest/smallest class = {ratio:.1f} <= 3: plain cross-entropy"}
    frequency = np.maximum(values, 1.0) / max(values.sum(), 1.0)
    weights = frequency ** -CLASS_WEIGHT_EXPONENT
    weights = weights / weights.mean()
    return {"strategy": "weighted_loss", "class_weights": [round(float(w), 4) for w in weights],
            "classes": classes, "imbalance_ratio": round(ratio, 2),
            "posterior_correction": POSTERIOR_CORRECTION,
            "reason": (f"largest/smallest class = {ratio:.1f} > 3: cross-entropy weighted by (1/class "
                       f"frequency)^{CLASS_WEIGHT_EXPONENT:g}, normalised to mean 1 (rarest/commonest "
                       f"weight {ratio ** CLASS_WEIGHT_EXPONENT:.1f}; stronger weights, inverse "
                       f"frequency or balanced sampling cost accuracy and would repeat the rarest "
                       f"class's {int(present.min())} images up to ~{ratio:.0f}x as often); "
                       f"predictions take back {POSTERIOR_CORRECTION:g} of the weights' tilt "
                       f"(probabilities x weight^-{POSTERIOR_CORRECTION:g}, renormalised)")}


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


def plan_classifier(dataset, fingerprint, device, budget_gb, budget_minutes, assumed_budget,
                    speed) -> Configuration:
    classes = class_order(dataset, fingerprint)
    n_classes = max(len(classes), 2)
    in_channels = len(fingerprint.channels)
    median_hw = fingerprint.median_shape
    aspect = (fingerprint.aspect_ratios or {}).get("median") or float(median_hw[1]) / float(median_hw[0])
    sizes = classifier_input_sizes(median_hw, aspect)
    normalization, norm_reason = classification_normalization(fingerprint)
    n_train = max(1, int(fingerprint.n_cases * TRAIN_FRACTION))
    n_val = max(1, fingerprint.n_cases - n_train)
    reasons = {"normalization": norm_reason}
    size_reason = (f"median image {[int(round(m)) for m in median_hw]} (width/height {aspect:.2f}): "
                   f"multiples of 32 keeping the aspect ratio, never upsampling")
    if device == "cpu":
        batch = int(max(MIN_BATCH, min(CLASSIFIER_CPU_BATCH, n_train // 4)))
        val_its = epoch_validation_iterations(fingerprint.class_counts or {}, n_val, batch)
        candidates = []
        ram = _ram_limit_gb()
        for size in sizes:
            for width in (64, 32):
                config = _classifier_configuration("resnet18", width, size, batch, in_channels, n_classes,
                                                   normalization, median_hw)
                if estimate_training_memory_gb(config, "fp32", "cpu") > ram:
                    continue
                candidates.append(_evaluate(config, speed, budget_minutes, n_train, 1.0, val_its))
        chosen, why = _choose(candidates, TARGET_EPOCHS_CLASSIFICATION)
        if chosen is None:
            chosen = max(candidates, key=lambda c: c.schedule.iterations)
            why = f"none reaches {MIN_ITERATIONS} iterations: the most iterations possible"
        chosen = _finalise_cpu_schedule(chosen, speed, budget_minutes, n_train, 1.0, val_its)
        config, schedule = chosen.configuration, chosen.schedule
        memory = estimate_training_memory_gb(config, "fp32", "cpu")
        reasons["patch_size"] = f"{config.patch_size}: {size_reason}; the largest size the CPU budget allows"
        reasons["network"] = ("ResNet-18 on CPU (deeper nets cost more than the budget buys); "
                              + _tradeoff_text(candidates, chosen, TARGET_EPOCHS_CLASSIFICATION, why,
                                               f"width {config.network['width']} at {config.patch_size}"))
        reasons["batch_size"] = f"{config.batch_size}: a standard CPU batch (at most a quarter of the training images)"
        reasons["estimated_memory_gb"] = _cpu_memory_reason(memory)
        seen = chosen.epochs_seen
    else:
        arch, arch_reason = _classifier_arch_for_gpu(fingerprint.n_cases)
        size = sizes[0]
        batch = MIN_BATCH
        for b in sorted({b for b in BATCH_STEPS if b <= CLASSIFIER_MAX_BATCH}, reverse=True):
            trial = _classifier_configuration(arch, 64, size, b, in_channels, n_classes, normalization, median_hw)
            if b <= max(MIN_BATCH, n_train // 4) and \
                    estimate_training_memory_gb(trial, "fp16", "cuda") <= budget_gb * MEMORY_HEADROOM:
                batch = b
                break
        config = _classifier_configuration(arch, 64, size, batch, in_channels, n_classes, normalization, median_hw)
        memory = estimate_training_memory_gb(config, "fp16", "cuda")
        seconds = round(speed.final_seconds(config), 4)
        its = math.ceil(n_train / batch)
        val_its = math.ceil(n_val / batch)
        if budget_minutes is None:
            schedule = Schedule(CLASSIFIER_GPU_EPOCHS, its, val_its, seconds, 0.0)
        else:
            schedule = fit_schedule(seconds, budget_minutes, its, val_its, max_epochs=CLASSIFIER_GPU_EPOCHS)
        reasons["patch_size"] = f"{size}: {size_reason}"
        reasons["network"] = f"{arch_reason}, width 64 (torchvision's)"
        reasons["batch_size"] = (f"{batch}: largest power-of-two-ish batch <= {CLASSIFIER_MAX_BATCH} fitting "
                                 f"{budget_gb:g} GB and at most a quarter of the training images")
        reasons["estimated_memory_gb"] = f"{memory:.2f} GB of {budget_gb:g} GB (mixed precision, AdamW state)"
        seen = schedule.iterations * batch / n_train
    counts = fingerprint.class_counts or {}
    config = replace(config, estimated_memory_gb=round(memory, 3), epochs=schedule.epochs,
                     iterations_per_epoch=schedule.iterations_per_epoch,
                     val_iterations_per_epoch=schedule.val_iterations_per_epoch,
                     expected_seconds_per_iteration=schedule.seconds_per_iteration,
                     imbalance=imbalance_handling(classes, counts), samples_seen_epochs=round(seen, 1),
                     precision=_default_precision(device))
    reasons["precision"] = precision_reason(config.precision)
    reasons["imbalance"] = config.imbalance["reason"]
    reasons["epochs"] = _schedule_reason(schedule, budget_minutes, assumed_budget) if (
        budget_minutes is not None) else (f"{schedule.epochs} epochs, each one pass over the training fold "
                                          f"({schedule.iterations_per_epoch} iterations)")
    reasons["expected_seconds_per_iteration"] = _speed_reason(speed, schedule.seconds_per_iteration, config)
    reasons["loss"] = "cross-entropy, AdamW lr 1e-3 (a robust default for ResNets trained from scratch)"
    config.reasons = reasons
    return config


# ---------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------
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


def plan_dataset(dataset, fingerprint, device: str = "cpu", gpu_memory_gb: float | None = None,
                 time_budget_minutes: float | None = None, base_features: int = 32,
                 results_dir: Path | None = None, probe: bool = True, field_of_view: str = "auto") -> Plan:
    """Plan every configuration of a dataset for a device, memory and time budget.

    ``dataset`` is the dataset's name or its ``Dataset`` (then its label ids and class order
    are used). Writes nothing except the throughput cache ``results_dir/NAME/throughput.json``
    when the probe runs; the caller saves the plan with ``plan.save(path)``. ``field_of_view``
    ('auto' | 'fit' | 'pixels') decides how 2D images without a pixel size are scaled
    (:func:`plan_field_of_view`).
    """
    name = dataset if isinstance(dataset, str) else dataset.name
    if device not in ("cpu", "cuda"):
        raise InputError(None, f"unknown device {device!r}; use 'cpu' or 'cuda'")
    if time_budget_minutes is not None and not time_budget_minutes > 0:
        raise InputError(None, f"time budget must be positive minutes, got {time_budget_minutes}")
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise InputError(None, f"GPU memory must be positive GB, got {gpu_memory_gb}")
    if int(base_features) < 4:
        raise InputError(None, f"base features must be at least 4, got {base_features}")
    if fingerprint.task_type not in ("segmentation", "classification"):
        raise InputError(None, f"unknown task type {fingerprint.task_type!r} in the fingerprint")
    notes = []
    budget_gb = gpu_memory_gb
    if device == "cuda" and budget_gb is None:
        budget_gb = _detect_gpu_memory_gb()
        if budget_gb is None:
            budget_gb = REFERENCE_GPU_GB
            notes.append(f"no GPU here and no --gpu-memory: planned for nnU-Net's default {REFERENCE_GPU_GB:g} GB")
        else:
            notes.append(f"planned for the detected GPU's {budget_gb:.1f} GB")
    if device == "cpu" and gpu_memory_gb is not None:
        notes.append("--gpu-memory ignored: on CPU the limit is time, not memory")
        budget_gb = None
    assumed_budget = device == "cpu" and time_budget_minutes is None
    budget_minutes = CPU_DEFAULT_BUDGET_MINUTES if assumed_budget else time_budget_minutes
    measure = (probe and results_dir is not None and not assumed_budget and budget_minutes is not None
               and (device == "cpu" or cuda_available()))
    cache = ThroughputCache(Path(results_dir) / name / "throughput.json", device) if measure else None
    speed = SpeedModel(device, cache)
    if assumed_budget:
        notes.append(f"no time budget on CPU: the plan for {CPU_DEFAULT_BUDGET_MINUTES:g} minutes, "
                     f"computed analytically")
    if fingerprint.task_type == "classification":
        configurations = {"classifier": plan_classifier(dataset, fingerprint, device, budget_gb, budget_minutes,
                                                        assumed_budget, speed)}
        default = "classifier"
    else:
        configurations, default, more = plan_segmentation(name, dataset, fingerprint, device, budget_gb,
                                                          budget_minutes, assumed_budget, int(base_features), speed,
                                                          field_of_view)
        notes += more
    if speed.failure:
        notes.append(speed.failure)
    notes += sorted(set(speed.clamped))
    notes.append(f"default configuration: {default}")
    return Plan(dataset=name, task_type=fingerprint.task_type, device=device,
                gpu_memory_gb=None if budget_gb is None else round(float(budget_gb), 3),
                time_budget_minutes=None if time_budget_minutes is None else float(time_budget_minutes),
                configurations=configurations,
                default_configuration=default, notes=notes)


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
