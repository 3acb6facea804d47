"""Intensity normalisation: per channel by the plan's scheme (z-score, CT window, RGB scale), and
classification batches by the plan's per-channel mean and std."""

import numpy as np
from scipy import ndimage

from autoplan.errors import InputError


def normalize(data, schemes, path=None):
    """Normalise each channel in place by its scheme (see docs/architecture.md)."""
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
    name = scheme.get("scheme", "zscore")
    values = values.astype(np.float32, copy=False)
    if name == "zscore":
        return (values - values.mean()) / max(float(values.std()), 1e-8)
    if name == "zscore_nonzero":
        mask = ndimage.binary_fill_holes(values != 0)
        if not mask.any():
            return np.zeros_like(values)
        inside = values[mask]
        result = (values - inside.mean()) / max(float(inside.std()), 1e-8)
        result[~mask] = 0
        return result
    if name == "ct":
        low, high = scheme["clip"]
        values = np.clip(values, low, high)
        return (values - scheme["mean"]) / max(float(scheme["std"]), 1e-8)
    if name == "rgb":
        values = values / float(scheme.get("scale", 255.0))
        return (values - scheme.get("mean", 0.0)) / max(float(scheme.get("std", 1.0)), 1e-8)
    if name == "none":
        return values
    raise ValueError(f"unknown normalization scheme {name!r}")


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
