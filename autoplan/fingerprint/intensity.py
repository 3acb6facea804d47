"""Intensity statistics: nnU-Net's foreground sample and its pooled statistics, and the per-case
percentiles that prediction's quality checks compare new images with."""

import numpy as np

from autoplan.fingerprint.types import IntensityStats
from autoplan.io.cases import integer_counts

# nnU-Net v2 samples at most 10e7 foreground voxels for the whole dataset, spread evenly.
MAX_FOREGROUND_SAMPLES = int(10e7)
SAMPLE_SEED = 1234
# Per-case maxima spanning more than this factor mean one global scale cannot fit all cases.
INTENSITY_SCALE_RATIO = 10.0
# Per-case intensity percentiles that prediction compares new images with (autoplan/qc.py).
CASE_PERCENTILES = (0.5, 50.0, 99.5)
# Integer pixels spanning at most this many values are counted in a histogram (exact, and about
# 8x faster than sorting: it matters over thousands of photos); others are sorted.
HISTOGRAM_SPAN = 1 << 20
# Larger images give their percentiles from an even subsample of this many values: ample for
# ranges that quality checks widen by 3-4x.
PERCENTILE_SAMPLE = 1_000_000


def foreground_sample(data: np.ndarray, foreground: np.ndarray, samples_per_case: int) -> list:
    """Per channel, this case's foreground intensities as nnU-Net would weigh them.

    nnU-Net draws ``samples_per_case`` voxels with replacement (RandomState(1234), one
    draw per channel in order). When the case has no more foreground voxels than that,
    all of them, equally weighted, are that draw's expectation (and far smaller to ship);
    otherwise we make the very same draw.
    """
    n_foreground = int(foreground.sum())
    if n_foreground == 0:
        return [np.zeros(0, dtype=np.float32) for _ in range(data.shape[0])]
    values = [channel[foreground].astype(np.float32) for channel in data]
    if n_foreground <= samples_per_case:
        return values
    random = np.random.RandomState(SAMPLE_SEED)
    return [random.choice(v, samples_per_case, replace=True) for v in values]


def combine_foreground_samples(per_case: list) -> IntensityStats | None:
    """nnU-Net's statistics over the pooled samples, each case weighing the same."""
    per_case = [s for s in per_case if len(s)]
    if not per_case:
        return None
    values = np.concatenate(per_case).astype(np.float64)
    weights = np.concatenate([np.full(len(s), 1.0 / len(s)) for s in per_case])
    total = weights.sum()
    mean = float(np.dot(weights, values) / total)
    std = float(np.sqrt(np.dot(weights, (values - mean) ** 2) / total))
    p005, median, p995 = _weighted_percentiles(values, weights, (0.5, 50.0, 99.5))
    return IntensityStats(mean=mean, median=median, std=std, min=float(values.min()),
                          max=float(values.max()), percentile_00_5=p005, percentile_99_5=p995)


def _weighted_percentiles(values, weights, percentiles) -> list:
    """Percentiles of a weighted sample: each value sits at the middle of its weight.

    With equal weights this is np.percentile up to O(1/N) in position.
    """
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    cumulative = np.cumsum(weights)
    positions = (cumulative - weights / 2) / cumulative[-1]
    return [float(np.interp(p / 100.0, positions, values)) for p in percentiles]


def scales_differ(maxima) -> bool:
    positive = [m for m in maxima if m > 0]
    if len(positive) < 2:
        return False
    return max(positive) / min(positive) > INTENSITY_SCALE_RATIO


def intensity_percentiles(array: np.ndarray) -> list:
    """Per channel ``[p0.5, p50, p99.5]`` of a channel-first image (np.percentile's linear rule)."""
    array = np.asarray(array)
    return [_channel_percentiles(channel.ravel()) for channel in array.reshape(array.shape[0], -1)]


def _channel_percentiles(values: np.ndarray) -> list:
    if values.dtype.kind in "biu":
        low = int(values.min())
        high = int(values.max())
        if high - low <= HISTOGRAM_SPAN:
            return [low + v for v in _histogram_percentiles(integer_counts(values, low, high), CASE_PERCENTILES)]
    probe = values[:: max(1, values.size // PERCENTILE_SAMPLE)].astype(np.float64)
    return [float(v) for v in np.percentile(probe, CASE_PERCENTILES)]


def _histogram_percentiles(counts: np.ndarray, percentiles) -> list:
    """np.percentile (linear) of the values 0..len(counts)-1 counted ``counts`` times."""
    cumulative = np.cumsum(counts)
    positions = np.asarray(percentiles, dtype=np.float64) / 100.0 * (cumulative[-1] - 1)
    below = np.floor(positions)
    above = np.minimum(below + 1, cumulative[-1] - 1)
    value_below = np.searchsorted(cumulative, below, side="right")
    value_above = np.searchsorted(cumulative, above, side="right")
    return (value_below + (positions - below) * (value_above - value_below)).astype(float).tolist()


def is_integer_valued(values: np.ndarray) -> bool:
    if not np.issubdtype(values.dtype, np.floating):
        return True
    probe = values[:: max(1, values.size // 100_000)]  # a strided probe is enough to tell
    return bool(np.array_equal(probe, np.round(probe)))
