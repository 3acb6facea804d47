"""Resampling to the plan's spacing: cubic splines in-plane, nearest along a coarse axis of an
anisotropic volume, antialiasing where whole images shrink, and label maps through their one-hots."""

import numpy as np
from scipy import ndimage

from autoplan.fingerprint import ANISOTROPY_THRESHOLD
from autoplan.io.cases import distinct_values


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
    out = np.empty((len(data), *new_shape), dtype=np.float32)
    for channel, values in enumerate(data):    # filled in place: np.stack would hold every channel twice
        _resample_channel(values, new_shape, order, coarse, out[channel])
    return out


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


# Values resampled along one axis at a time by _zoom_volume (working copies of about 4 MB).
ZOOM_CHUNK_VALUES = 2 ** 20
# scipy's prefilter pads by this many edge values for mode "nearest" (ndimage.zoom does the same).
SPLINE_PAD = 12


def _zoom_volume(values, new_shape, order, out=None):
    """``_zoom`` of a float32 image of any dimension (into ``out`` when given). Cubic splines
    (order 3) run one axis at a time, the most shrinking axis first, a block of lines at a time:
    the memory of the output and the intermediate grids, not of scipy's padded float64 copy of
    the whole input (1.3 GB for a 512 x 512 x 400 CT), and 4 spline taps per value and pass
    instead of 4^dim.

    Why this gives scipy's 3D zoom values (within about 1e-6, tests/test_preprocessing.py):
    a tensor-product spline's edge padding, prefilter and interpolation each act on one axis,
    and operators on different axes commute.
    """
    new_shape = [int(n) for n in new_shape]
    if order != 3:      # orders 0 and 1 (masks, probabilities) have no prefilter: scipy makes no copy
        return _into(out, _zoom(values, new_shape, order))
    axes = sorted((a for a in range(values.ndim) if new_shape[a] != values.shape[a]),
                  key=lambda a: new_shape[a] / values.shape[a])
    if not axes:
        return _into(out, values)
    for k, axis in enumerate(axes):
        values = _cubic_axis(values, new_shape[axis], axis, out if k == len(axes) - 1 else None)
    return values


def _into(out, values):
    if out is None:
        return values
    out[...] = values
    return out


def _cubic_axis(values, n_out: int, axis: int, out=None):
    """``values`` resampled along ``axis`` to ``n_out`` (scipy's order-3 zoom, grid mode, nearest),
    a block of the other axes at a time."""
    shape = list(values.shape)
    shape[axis] = n_out
    out = np.empty(shape, dtype=np.float32) if out is None else out
    if values.ndim == 1:
        out[:] = _cubic_lines(values[:, None], n_out)[:, 0]
        return out
    other = 1 if axis == 0 else 0
    per_block = max(1, ZOOM_CHUNK_VALUES * values.shape[other] // max(1, values.size))
    for first in range(0, values.shape[other], per_block):
        window = tuple(slice(first, first + per_block) if a == other else slice(None) for a in range(values.ndim))
        lines = np.moveaxis(values[window], axis, 0)
        resampled = _cubic_lines(lines.reshape(len(lines), -1), n_out).reshape(n_out, *lines.shape[1:])
        out[window] = np.moveaxis(resampled, 0, axis)
    return out


def _cubic_lines(lines, n_out: int) -> np.ndarray:
    """Each column of ``lines`` (n, m) resampled to ``n_out`` rows, as ``ndimage.zoom(order=3,
    mode="nearest", grid_mode=True)`` does it: edge padding, the spline prefilter, then the four
    cubic B-spline weights at each output row's source position. float32 (n_out, m): scipy
    filters each line in float64 internally; keeping the arrays in float32 halves the memory
    traffic and differs from scipy's float64 path by about 1e-6 of the values."""
    n = len(lines)
    padded = np.pad(lines.astype(np.float32, copy=False), ((SPLINE_PAD, SPLINE_PAD), (0, 0)), mode="edge")
    coefficients = ndimage.spline_filter1d(padded, order=3, axis=0, mode="nearest", output=np.float32)
    source = (np.arange(n_out) + 0.5) * (n / n_out) - 0.5 + SPLINE_PAD
    knot = np.floor(source)
    t = (source - knot)[:, None]
    first = knot.astype(np.int64) - 1
    weights = [w.astype(np.float32) for w in ((1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                                              (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6)]
    result = np.zeros((n_out, lines.shape[1]), dtype=np.float32)
    for k, weight in enumerate(weights):
        term = coefficients[np.clip(first + k, 0, len(padded) - 1)]
        result += np.multiply(weight, term, out=term)
    return result


def _resample_channel(values, new_shape, order, coarse, out=None):
    values = values.astype(np.float32, copy=False)
    if coarse is None:
        return _zoom_volume(values, new_shape, order, out)
    planes = np.moveaxis(values, coarse, 0)
    plane_shape = [n for a, n in enumerate(new_shape) if a != coarse]
    planes = np.stack([_zoom_volume(plane, plane_shape, order) for plane in planes])
    planes = np.moveaxis(planes, 0, coarse)
    return _into(out, _zoom(planes, new_shape, 0))


def resample_labels(labels, new_shape, coarse=None):
    """Label map resampled by linear interpolation of each label's one-hot, then argmax.

    Interpolating one-hot masks (nnU-Net's resize_segmentation) keeps thin structures
    and never invents label ids between neighbours, unlike interpolating the ids. The
    weights of a linear interpolation sum to one, so background's score is one minus the
    others' (one interpolation fewer, the largest one); ties go to the smaller id.
    """
    new_shape = [int(n) for n in new_shape]
    if list(labels.shape) == new_shape:
        return labels.astype(np.int16, copy=False)
    present = [int(v) for v in distinct_values(labels)]
    derived = 0 if 0 in present and len(present) > 1 else None
    scores = {label: _one_hot_resampled(labels, label, new_shape, coarse) for label in present if label != derived}
    if derived is not None:
        background = np.ones(new_shape, dtype=np.float32)
        for label in present:
            if label != derived:
                background -= scores[label]
        scores[derived] = background
    best = np.full(new_shape, -1.0, dtype=np.float32)
    result = np.zeros(new_shape, dtype=np.int16)
    for label in present:
        better = scores[label] > best
        result[better] = label
        best[better] = scores[label][better]
    return result


# ============================================================================ slab by slab


def linear_source_rows(n_in: int, n_out: int) -> tuple:
    """(lower row, upper row, upper weight) of every output row under linear resampling, by
    torch's rule for ``interpolate(align_corners=False)`` (what ``resample`` uses), in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    source = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    lower = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    weight = np.clip(source - lower.astype(np.float32), 0, 1).astype(np.float32)
    return lower, upper, weight


def nearest_source_rows(n_in: int, n_out: int) -> np.ndarray:
    """The source row of every output row under ``_zoom(order=0)`` (the coarse axis): the rows'
    own indices zoomed the same way, so the rule is scipy's, not a copy of it."""
    return np.rint(_zoom(np.arange(n_in, dtype=np.float64), [n_out], 0)).astype(np.int64)


class SlabResampler:
    """A ``(C, N, *plane)`` volume that arrives in slabs along N, resampled as ``resample(order=1,
    coarse=...)`` resamples it whole, and handed out a few output rows at a time.

    Resampling is separable: each needed source row is resampled in-plane once (bilinear as
    torch's trilinear, or scipy's order-1 zoom when axis 0 is the coarse axis), then output rows
    are linear blends of two such planes (nearest along a coarse axis). Only the planes the next
    output rows need are held, so memory is a few rows, not the volume. ``coarse`` must be None
    or 0 (see ``can_stream``).
    """

    def __init__(self, slabs, source_shape, new_shape, coarse=None):
        if coarse not in (None, 0):
            raise ValueError(f"slab resampling runs along axis 0; the coarse axis is {coarse}")
        self._slabs, self._coarse = iter(slabs), coarse
        n_in, n_out = int(source_shape[0]), int(new_shape[0])
        self._plane_in = [int(n) for n in source_shape[1:]]
        self._plane_out = [int(n) for n in new_shape[1:]]
        if n_in == n_out or coarse == 0:
            rows = np.arange(n_out) if n_in == n_out else nearest_source_rows(n_in, n_out)
            self._lower, self._upper, self._weight = rows, rows, None
        else:
            self._lower, self._upper, self._weight = linear_source_rows(n_in, n_out)
        self._needed = set(self._lower.tolist()) | set(self._upper.tolist())
        self._planes, self._loaded, self.position, self.n_rows = {}, 0, 0, n_out

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` output rows (fewer at the end), ``(C, rows, *new plane)`` float32."""
        rows = range(self.position, min(self.position + int(n), self.n_rows))
        if not rows:
            raise ValueError("no rows left")
        while self._loaded <= self._upper[rows[-1]]:
            self._load(next(self._slabs))
        first = self._planes[self._lower[rows[0]]]
        out = np.empty((first.shape[0], len(rows), *first.shape[1:]), dtype=np.float32)
        for k, row in enumerate(rows):
            lower = self._planes[self._lower[row]]
            if self._weight is None:
                out[:, k] = lower
            else:
                upper_weight = self._weight[row]
                out[:, k] = (np.float32(1) - upper_weight) * lower + upper_weight * self._planes[self._upper[row]]
        self.position = rows[-1] + 1
        keep_from = self._lower[self.position] if self.position < self.n_rows else self._loaded
        for row in [r for r in self._planes if r < keep_from]:
            del self._planes[row]
        return out

    def _load(self, slab) -> None:
        slab = np.asarray(slab, dtype=np.float32)
        first = self._loaded
        self._loaded += slab.shape[1]
        wanted = [r for r in range(first, self._loaded) if r in self._needed]
        if not wanted:
            return
        planes = self._resample_planes(slab[:, [r - first for r in wanted]])
        for k, row in enumerate(wanted):
            self._planes[row] = planes[:, k]

    def _resample_planes(self, rows: np.ndarray) -> np.ndarray:
        if self._plane_in == self._plane_out:
            return rows
        if self._coarse == 0:   # as _resample_channel: scipy's order-1 zoom plane by plane
            return np.stack([np.stack([_zoom(plane, self._plane_out, 1) for plane in channel]) for channel in rows])
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(rows))
        mode = "bilinear" if len(self._plane_out) == 2 else "linear"
        with torch.inference_mode():
            # rows as the batch, channels as channels: each row resampled in-plane alone
            result = torch.nn.functional.interpolate(tensor.transpose(0, 1), size=self._plane_out, mode=mode,
                                                     align_corners=False)
        return result.transpose(0, 1).numpy()


def _one_hot_resampled(labels, label: int, new_shape, coarse) -> np.ndarray:
    """One label's mask linearly resampled (float32), by ``resample``'s order-1 rule (torch's
    interpolation when no axis is coarse: several times faster on a clinical CT's labels)."""
    return resample((labels == label).astype(np.float32)[None], new_shape, order=1, coarse=coarse)[0]


def can_stream(n_spatial: int, coarse) -> bool:
    """Whether ``SlabResampler`` reproduces ``resample(order=1)`` for this grid: volumes whose
    coarse axis, if any, is the first (the slab axis); otherwise resample whole."""
    return n_spatial == 3 and coarse in (None, 0)
