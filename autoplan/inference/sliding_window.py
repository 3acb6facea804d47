"""nnU-Net's sliding window: Gaussian-weighted tiles with mirroring test-time augmentation.

``sliding_window_predict`` turns a preprocessed image into softmax probabilities; training's
final validation and prediction both call it, so they are the same code.
"""

import contextlib
import itertools
from functools import lru_cache

import numpy as np
import torch

from autoplan.inference.models import predicting

# Mirrored copies of a tile go through the network as one batch up to this many voxels:
# one call with batch 4 is cheaper on a CPU than four calls with batch 1 (fewer, larger
# kernels), while large 3D tiles stay one call per flip so memory stays bounded by the patch.
FLIP_BATCH_VOXELS = 2 ** 19


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple, sigma_scale: float) -> np.ndarray:
    axes = []
    for n in patch_size:
        centre, sigma = (n - 1) / 2.0, max(n * sigma_scale, 1e-6)
        coords = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-0.5 * ((coords - centre) / sigma) ** 2))
    weights = axes[0]
    for axis in axes[1:]:
        weights = np.multiply.outer(weights, axis)
    weights = weights / weights.max()
    # Zero weights would divide by zero where only a tile border covers a voxel.
    weights = np.maximum(weights, weights[weights > 0].min())
    return weights.astype(np.float32)


def gaussian_importance_map(patch_size, sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Tile weights: a Gaussian (sigma = patch/8 per axis) peaking at 1 in the tile centre.

    As nnU-Net's ``compute_gaussian``, but evaluated analytically around the true centre
    ``(n - 1) / 2`` so the map is exactly symmetric for even sizes too. Predictions near
    tile borders (less context) count less where tiles overlap.
    """
    return torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale)))


def sliding_window_starts(image_size, patch_size, step: float = 0.5) -> list:
    """Tile start positions per axis: as few tiles as give an overlap of at least 1 - step.

    nnU-Net's ``compute_steps_for_sliding_window``: the steps are spread evenly so the
    first tile starts at 0 and the last one ends at the image border.
    """
    starts = []
    for size, tile in zip(image_size, patch_size):
        if size < tile:
            raise ValueError(f"image size {size} is smaller than the tile {tile}; pad first")
        target_step = max(tile * step, 1)
        n_steps = int(np.ceil((size - tile) / target_step)) + 1
        actual = (size - tile) / (n_steps - 1) if n_steps > 1 else 0
        starts.append([int(round(actual * i)) for i in range(n_steps)])
    return starts


def _pad_to_window(data: torch.Tensor, window) -> tuple:
    """Zero-pad spatial axes (centred) to at least the window; the slices that undo it."""
    pad_widths, crop = [], [slice(None)]
    for size, tile in zip(data.shape[1:], window):
        missing = max(tile - size, 0)
        before = missing // 2
        pad_widths.append((before, missing - before))
        crop.append(slice(before, before + size))
    if not any(sum(p) for p in pad_widths):
        return data, tuple(crop)
    flat = [w for pair in reversed(pad_widths) for w in pair]  # F.pad wants the last axis first
    return torch.nn.functional.pad(data, flat, mode="constant", value=0.0), tuple(crop)


def _mirror_combinations(mirror_axes) -> list:
    """Every subset of the mirror axes, the empty one (no flip) first."""
    if not mirror_axes:
        return [()]
    axes = tuple(int(a) for a in mirror_axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def _forward_logits(network, batch: torch.Tensor, flips: list) -> torch.Tensor:
    """Mean logits over the mirrored versions of ``batch`` (each flipped back)."""
    per_call = max(1, FLIP_BATCH_VOXELS // max(1, batch[0, 0].numel() * len(batch)))
    total = None
    for first in range(0, len(flips), per_call):
        combos = flips[first:first + per_call]
        dims = [[a + 2 for a in combo] for combo in combos]
        out = network(torch.cat([torch.flip(batch, d) if d else batch for d in dims]))
        if isinstance(out, (list, tuple)):  # deep supervision left on: full resolution first
            out = out[0]
        for d, part in zip(dims, out.float().split(len(batch))):
            part = torch.flip(part, d) if d else part
            total = part if total is None else total + part
    return total / len(flips)


def _zeroed_sums(n_networks: int, n_classes: int, spatial: tuple, device: torch.device) -> tuple:
    """(logit sums per network, weight sum, where they live): on ``device``, or on the CPU where they do not fit."""
    try:
        return (torch.zeros((n_networks, n_classes, *spatial), dtype=torch.float32, device=device),
                torch.zeros(spatial, dtype=torch.float32, device=device), device)
    except torch.OutOfMemoryError:
        return (torch.zeros((n_networks, n_classes, *spatial), dtype=torch.float32),
                torch.zeros(spatial, dtype=torch.float32), torch.device("cpu"))


def _finished_slab(logits_sum, weight_sum, depth: int, crop: tuple, offset: int) -> tuple:
    """(first row, probabilities) of the first ``depth`` rows of a slab, no tile touching them
    any more: logits divided by the summed weights, softmax per network, then the networks'
    mean (in that order, as one network's whole-volume result is averaged with the next)."""
    rows = crop[1]
    lo, hi = max(offset, rows.start), min(offset + depth, rows.stop)
    if hi <= lo:
        return lo - rows.start, None
    window = (slice(lo - offset, hi - offset),) + tuple(crop[2:])
    total = None
    for logits in logits_sum:
        probabilities = torch.softmax(logits[(slice(None),) + window] / weight_sum[window], dim=0)
        total = probabilities if total is None else total + probabilities
    mean = total / len(logits_sum) if len(logits_sum) > 1 else total
    return lo - rows.start, mean.float().cpu()


def sliding_window_slabs(networks, data, patch_size, n_classes: int, step: float = 0.5, mirror_axes=None,
                         device="cpu", batch_size: int = 1):
    """Yield (first row, probabilities ``(K, rows, *rest)``) of ``data`` ``(C, *spatial)`` slab by
    slab along the first spatial axis, every network's softmax averaged (the folds of a run).

    Tiles run in order of that axis, so once the tiles starting at one row are done every row
    before the next start is final: it is finished and handed on, and the sums keep only the
    rows a later tile still adds to. Memory is (networks x K x tile depth x the other axes),
    not the volume times the classes; each row is the sum of the same tiles in the same order
    as a whole-volume sum would give. Long because it runs the whole tile loop.
    """
    device = torch.device(device)
    networks = list(networks) if isinstance(networks, (list, tuple)) else [networks]
    data = torch.as_tensor(data, dtype=torch.float32)
    patch = [int(p) for p in patch_size]
    n_slice_axes = data.ndim - 1 - len(patch)
    if n_slice_axes < 0:
        raise ValueError(f"data of shape {tuple(data.shape)} has fewer spatial axes than the patch {patch}")
    window = [1] * n_slice_axes + patch
    padded, crop = _pad_to_window(data, window)
    spatial = tuple(padded.shape[1:])
    starts = sliding_window_starts(spatial, window, step)
    flips = _mirror_combinations(mirror_axes)
    gaussian = gaussian_importance_map(patch).to(device)
    slab_shape = (window[0], *spatial[1:])
    batch_size = max(1, int(batch_size))
    sums = None
    for index, row in enumerate(starts[0]):
        # The networks' modes are entered per row, not across a yield: the caller's code between
        # slabs must not run in inference mode or autocast.
        with contextlib.ExitStack() as stack:
            for network in networks:
                stack.enter_context(predicting(network, device))
            if sums is None:
                sums = _zeroed_sums(len(networks), n_classes, slab_shape, device)
            logits_sum, weight_sum, accumulate_on = sums
            gaussian_acc = gaussian.reshape(window).to(accumulate_on)
            tiles = [(0, *rest) for rest in itertools.product(*starts[1:])]
            for first in range(0, len(tiles), batch_size):
                slicers = [tuple(slice(s, s + w) for s, w in zip(start, window))
                           for start in tiles[first:first + batch_size]]
                batch = torch.stack([padded[(slice(None), slice(row, row + window[0])) + sl[1:]] for sl in slicers])
                batch = batch.reshape(len(slicers), data.shape[0], *patch).to(device, non_blocking=True)
                for logits_of_network, network in zip(logits_sum, networks):
                    logits = _forward_logits(network, batch, flips)
                    if logits.shape[1] != n_classes:
                        raise ValueError(f"network gives {logits.shape[1]} outputs, expected {n_classes}")
                    logits = (logits * gaussian).to(accumulate_on)
                    for tile_logits, sl in zip(logits, slicers):
                        logits_of_network[(slice(None),) + sl] += tile_logits.reshape(n_classes, *window)
                for sl in slicers:
                    weight_sum[sl] += gaussian_acc
            last = index + 1 == len(starts[0])
            done = window[0] if last else starts[0][index + 1] - row
            first_row, probabilities = _finished_slab(logits_sum, weight_sum, done, crop, row)
            if not last:  # keep the rows later tiles still add to, at the top of fresh sums
                kept = window[0] - done
                logits_sum[:, :, :kept] = logits_sum[:, :, done:].clone()
                logits_sum[:, :, kept:] = 0
                weight_sum[:kept] = weight_sum[done:].clone()
                weight_sum[kept:] = 0
        if probabilities is not None:
            yield first_row, probabilities


def sliding_window_predict(network, data, patch_size, n_classes: int, step: float = 0.5,
                           mirror_axes=None, device="cpu", batch_size: int = 1) -> torch.Tensor:
    """Softmax probabilities ``(K, *spatial)`` for preprocessed ``data`` ``(C, *spatial)``.

    The image is zero-padded to at least the patch, tiled with ``step`` of the patch,
    each tile's logits weighted by a Gaussian and accumulated; with ``mirror_axes``
    (axes of the patch, e.g. ``(0, 1, 2)``) every combination of flips is averaged.
    A patch with fewer axes than ``data`` (a 2D network on a volume) is run slice by
    slice along the leading axes. Accumulation stays on ``device`` unless it does not
    fit there (then on the CPU). ``network`` may be a list (the folds of a run): their
    probabilities are averaged. The whole volume at once; ``sliding_window_slabs`` gives
    it slab by slab.
    """
    data = torch.as_tensor(data, dtype=torch.float32)
    result = torch.empty((n_classes, *data.shape[1:]), dtype=torch.float32)
    for first_row, probabilities in sliding_window_slabs(network, data, patch_size, n_classes, step,
                                                        mirror_axes, device, batch_size):
        result[:, first_row:first_row + probabilities.shape[1]] = probabilities
    return result
