"""Resampling to the plan's spacing: cubic splines in-plane, nearest along a coarse axis of an
anisotropic volume, antialiasing where whole images shrink, and label maps through their one-hots."""

import numpy as np
from scipy import ndimage

from autoplan.fingerprint import ANISOTROPY_THRESHOLD


def coarse_axis(spacing, target_spacing):
    """Index of the single coarse axis when either grid is anisotropic, else None."""
    for grid in (spacing, target_spacing):
        grid = np.asarray(grid, dtype=float)
        if len(grid) == 3 and grid.max() / grid.min() > ANISOTROPY_THRESHOLD:
            coarse = np.flatnonzero(grid == grid.max())
            # Two coarse axes (e.g. 0.24, 1.25, 1.25) are resampled jointly, as nnU-Net does.
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def resample(data, new_shape, order=3, coarse=None, antialias=False):
    """Resample (C, ...) to new_shape with spline ``order``; along ``coarse`` nearest only.

    ``antialias`` low-passes axes that shrink more than ``ANTIALIAS_BELOW`` first (a Gaussian
    of sigma (1/factor - 1) / 2, as skimage.transform.resize): a 2048-px radiograph brought
    to 224 px would otherwise alias its noise and fine texture into the small image.
    Linear resampling without a coarse axis runs through torch's interpolate (same values
    as ``ndimage.zoom(grid_mode=True)``, several times faster on large outputs).
    """
    new_shape = [int(n) for n in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    if antialias:
        data = _low_pass_for(data, new_shape)
    if order == 1 and coarse is None and data.ndim in (3, 4):
        return _interpolate_linear(data, new_shape)
    return np.stack([_resample_channel(c, new_shape, order, coarse) for c in data])


# Below this zoom factor an axis is low-passed before resampling (milder shrinking aliases little).
ANTIALIAS_BELOW = 0.75


def _low_pass_for(data, new_shape):
    factors = [n / o for n, o in zip(new_shape, data.shape[1:])]
    sigmas = [max(0.0, (1.0 / f - 1.0) / 2.0) if f < ANTIALIAS_BELOW else 0.0 for f in factors]
    if not any(sigmas):
        return data
    return np.stack([ndimage.gaussian_filter(c.astype(np.float32, copy=False), sigmas, mode="nearest")
                     for c in data])


def _interpolate_linear(data, new_shape):
    import torch

    mode = "bilinear" if data.ndim == 3 else "trilinear"
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    with torch.inference_mode():
        result = torch.nn.functional.interpolate(tensor, size=new_shape, mode=mode, align_corners=False)
    return result[0].numpy()


def _zoom(values, new_shape, order):
    factors = [n / o for n, o in zip(new_shape, values.shape)]
    if all(f == 1 for f in factors):
        return values
    # grid_mode maps pixel edges onto pixel edges, like skimage.transform.resize.
    return ndimage.zoom(values, factors, order=order, mode="nearest", grid_mode=True)


def _resample_channel(values, new_shape, order, coarse):
    values = values.astype(np.float32, copy=False)
    if coarse is None:
        return _zoom(values, new_shape, order)
    planes = np.moveaxis(values, coarse, 0)
    plane_shape = [n for a, n in enumerate(new_shape) if a != coarse]
    planes = np.stack([_zoom(plane, plane_shape, order) for plane in planes])
    planes = np.moveaxis(planes, 0, coarse)
    return _zoom(planes, new_shape, 0)


def resample_labels(labels, new_shape, coarse=None):
    """Label map resampled by linear interpolation of each label's one-hot, then argmax.

    Interpolating one-hot masks (nnU-Net's resize_segmentation) keeps thin structures
    and never invents label ids between neighbours, unlike interpolating the ids.
    """
    new_shape = [int(n) for n in new_shape]
    if list(labels.shape) == new_shape:
        return labels.astype(np.int16, copy=False)
    best = np.full(new_shape, -1.0, dtype=np.float32)
    result = np.zeros(new_shape, dtype=np.int16)
    for label in np.unique(labels):
        score = _resample_channel((labels == label).astype(np.float32), new_shape, 1, coarse)
        better = score > best
        result[better] = label
        best[better] = score[better]
    return result
