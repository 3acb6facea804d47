"""U-Net topology and patch geometry: nnU-Net's get_pool_and_conv_props, re-derived, the
initial patch, its shrinking step and the batch cap."""

import math
from dataclasses import dataclass

import numpy as np

MIN_FEATURE_MAP = 4                 # bottleneck edge length (nnU-Net UNet_featuremap_min_edge_length)
MAX_FEATURES = {2: 512, 3: 320}     # nnU-Net's caps on channels per stage
CONV_PER_STAGE = 2
MIN_BATCH = 2                       # nnU-Net UNet_min_batch_size
MAX_DATASET_COVERED = 0.05          # one batch sees at most 5% of the dataset's voxels
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}   # nnU-Net: start from a patch of 2048² / 256³ voxels
MAX_BATCH = {2: 512, 3: 64}         # sanity cap; the 5% rule nearly always binds earlier


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


def initial_patch(spacing, median_shape) -> list:
    """nnU-Net: a patch of 256³ (2048²) voxels with the aspect ratio of 1/spacing, clipped
    to the median shape (a larger patch than the images it is cut from makes no sense)."""
    dim = len(spacing)
    inverse = 1.0 / np.array(spacing, dtype=np.float64)
    scaled = inverse * (INITIAL_PATCH_EDGE[dim] ** dim / np.prod(inverse)) ** (1.0 / dim)
    return [int(max(1, min(round(p), round(m)))) for p, m in zip(scaled, median_shape)]


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
