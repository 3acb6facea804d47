"""Cost model of the planned networks: every tensor they make (layers), training memory,
FLOPs and the analytic seconds per iteration. Pure arithmetic: no torch here."""

import os
from dataclasses import dataclass

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.planning.topology import CONV_PER_STAGE

CUDA_CONTEXT_GB = 0.5               # CUDA context + cuDNN/cuBLAS handles: not in max_memory_allocated
OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}
CLASSIFIER_ARCHS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                    "resnet50": ("bottleneck", [3, 4, 6, 3])}
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
    if configuration.is_classifier:
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


def planned_memory_gb(configuration: Configuration, device: str) -> float:
    """What a plan records for ``device``: fp32 tensors on a CPU, mixed precision with the CUDA
    context on a GPU."""
    return estimate_training_memory_gb(configuration, "fp32", "cpu") if device == "cpu" else \
        estimate_training_memory_gb(configuration, "fp16", "cuda")


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
    if configuration.is_classifier:
        return "resnet_" + CLASSIFIER_ARCHS[configuration.network["arch"]][0]
    return "unet3d" if configuration.dim == 3 else "unet2d"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        return os.cpu_count() or 1


def ram_limit_gb() -> float:
    """Half the machine's memory: the loader workers and the OS need the rest."""
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


def base_width(configuration: Configuration) -> int:
    net = configuration.network
    return int(net["features_per_stage"][0]) if "features_per_stage" in net else int(net.get("width", 64))
