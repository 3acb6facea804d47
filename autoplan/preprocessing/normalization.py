"""Intensity normalisation: per channel by the plan's scheme (z-score, CT window, RGB scale), and
classification batches by the plan's per-channel mean and std."""

import numpy as np
from scipy import ndimage

from autoplan.errors import InputError


def normalize(data, schemes, path=None):
    """Normalise each channel of float32 ``data`` in place by its scheme (see docs/architecture.md)."""
    schemes = list(schemes or [])
    if len(schemes) == 1 and data.shape[0] > 1:
        schemes = schemes * data.shape[0]     # one scheme given for a multi-channel image
    if len(schemes) != data.shape[0]:
        raise InputError(path, f"image has {data.shape[0]} channel(s) but the plan expects "
                                   f"{len(schemes)}")
    for channel, scheme in enumerate(schemes):
        data[channel] = normalize_channel(data[channel], scheme)
    return data


def normalize_channel(values, scheme: dict):
    """One channel normalised; a float32 array is overwritten (no temporary of its size: a
    clinical CT channel is 400 MB), any other is converted first."""
    name = scheme.get("scheme", "zscore")
    values = values.astype(np.float32, copy=False)
    if name == "zscore":
        mean, std = mean_and_std(values)
        return _standardise(values, mean, std)
    if name == "zscore_nonzero":
        mask = ndimage.binary_fill_holes(values != 0)
        if not mask.any():
            return np.zeros_like(values)
        mean, std = mean_and_std(values, mask)
        _standardise(values, mean, std)[~mask] = 0
        return values
    if name == "ct":
        low, high = scheme["clip"]
        np.clip(values, low, high, out=values)
        return _standardise(values, scheme["mean"], scheme["std"])
    if name == "rgb":
        values /= float(scheme.get("scale", 255.0))
        return _standardise(values, scheme.get("mean", 0.0), scheme.get("std", 1.0))
    if name == "none":
        return values
    raise ValueError(f"unknown normalization scheme {name!r}")


def _standardise(values, mean, std):
    values -= np.float32(mean)
    values /= np.float32(max(float(std), 1e-8))
    return values


# Rows of a channel summed at a time by mean_and_std (float64 temporaries of about 32 MB).
STATISTICS_CHUNK_VALUES = 2 ** 22


def mean_and_std(values, mask=None) -> tuple:
    """(mean, std) of ``values`` (where ``mask``) in float64, two passes a few rows at a time,
    so no whole-volume temporary is made (numpy's ``std`` makes one)."""
    rows = max(1, STATISTICS_CHUNK_VALUES // max(1, int(np.prod(values.shape[1:]))))

    def chunks():
        for first in range(0, values.shape[0], rows):
            chunk = values[first:first + rows].astype(np.float64)
            yield chunk if mask is None else chunk[mask[first:first + rows]]

    count = values.size if mask is None else int(np.count_nonzero(mask))
    mean = sum(float(chunk.sum()) for chunk in chunks()) / max(count, 1)
    variance = sum(float(np.square(chunk - mean).sum()) for chunk in chunks()) / max(count, 1)
    return mean, float(np.sqrt(variance))


def normalize_classification_batch(batch, configuration) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), normalised by the plan's per-channel mean/std."""
    return normalize_unit_batch(np.asarray(batch, dtype=np.float32) / 255.0, configuration)


def normalize_unit_batch(batch, configuration) -> np.ndarray:
    """float (B, H, W, C) in 0..1 -> float32 (B, C, H, W) normalised."""
    batch = np.asarray(batch, dtype=np.float32)
    schemes = list(configuration.normalization or [{"scheme": "rgb", "mean": 0.0, "std": 1.0}])
    if len(schemes) == 1:
        schemes = schemes * batch.shape[-1]
    out = np.empty((batch.shape[0], batch.shape[-1], *batch.shape[1:3]), dtype=np.float32)
    for c, scheme in enumerate(schemes[: batch.shape[-1]]):
        channel = batch[..., c]
        if scheme.get("scheme", "rgb") == "zscore":
            mean = channel.mean(axis=(1, 2), keepdims=True)
            std = np.maximum(channel.std(axis=(1, 2), keepdims=True), 1e-8)
            out[:, c] = (channel - mean) / std
        else:
            out[:, c] = (channel - scheme.get("mean", 0.0)) / max(float(scheme.get("std", 1.0)), 1e-8)
    return out
