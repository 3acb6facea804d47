"""A plain convolutional U-Net for 2D and 3D, shaped like nnU-Net's PlainConvUNet.

Encoder stage ``s`` is ``conv_per_stage`` conv-norm-LeakyReLU blocks; the first conv of
every stage after the first has stride ``strides[s]`` (strided-conv downsampling, no
pooling). The decoder upsamples with a transposed conv (kernel = stride), concatenates
the encoder skip and runs ``conv_per_stage`` blocks again. Every decoder stage has a
1x1 segmentation head so deep supervision can use all of them (nnU-Net gives the lowest
one weight 0 in the loss, see ``autoplan.losses.deep_supervision_weights``).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoplan.errors import InputError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_NORM = {("instance", 2): nn.InstanceNorm2d, ("instance", 3): nn.InstanceNorm3d,
         ("batch", 2): nn.BatchNorm2d, ("batch", 3): nn.BatchNorm3d}


def _as_axes(value, dim: int) -> list[int]:
    """A per-axis list from an int or a list (plans store lists; tests like ints)."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * dim
    value = [int(v) for v in value]
    if len(value) != dim:
        raise ValueError(f"expected {dim} values per axis, got {value}")
    return value


def _norm_layer(norm: str, dim: int, channels: int) -> nn.Module:
    if (norm, dim) not in _NORM:
        raise InputError(None, f"unknown normalisation {norm!r}; use 'instance' or 'batch'")
    if norm == "instance":
        # affine=True, as nnU-Net: InstanceNorm has no learnable scale otherwise.
        return _NORM[norm, dim](channels, eps=1e-5, affine=True)
    return _NORM[norm, dim](channels, eps=1e-5)


class ConvBlocks(nn.Sequential):
    """``n`` conv-norm-LeakyReLU blocks; only the first conv is strided."""

    def __init__(self, dim, in_channels, out_channels, kernel_size, first_stride, n, norm):
        layers = []
        for i in range(n):
            layers += [
                _CONV[dim](in_channels if i == 0 else out_channels, out_channels, kernel_size,
                           stride=first_stride if i == 0 else 1,
                           padding=[k // 2 for k in kernel_size], bias=True),
                _norm_layer(norm, dim, out_channels),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    def __init__(self, dim: int, in_channels: int, n_classes: int, features_per_stage,
                 strides, kernel_sizes, conv_per_stage: int = 2, norm: str = "instance",
                 dropout: float = 0.0, deep_supervision: bool = True):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        n_stages = len(features_per_stage)
        if not (len(strides) == len(kernel_sizes) == n_stages) or n_stages < 2:
            raise ValueError("features_per_stage, strides and kernel_sizes need one entry per "
                             f"stage (at least 2), got {n_stages}, {len(strides)}, {len(kernel_sizes)}")
        self.dim = dim
        self.n_classes = n_classes
        self.deep_supervision = deep_supervision
        self.strides = [_as_axes(s, dim) for s in strides]
        self.kernel_sizes = [_as_axes(k, dim) for k in kernel_sizes]
        features = [int(f) for f in features_per_stage]
        if any(s != 1 for s in self.strides[0]):
            raise ValueError(f"strides[0] must be all ones, got {self.strides[0]}")

        self.encoder = nn.ModuleList()
        channels = in_channels
        for s in range(n_stages):
            stage = [ConvBlocks(dim, channels, features[s], self.kernel_sizes[s],
                                self.strides[s], conv_per_stage, norm)]
            if dropout > 0:
                stage.append(_DROPOUT[dim](p=dropout))
            self.encoder.append(nn.Sequential(*stage))
            channels = features[s]

        # Decoder stage d runs at the resolution of encoder stage n_stages - 2 - d
        # (d = 0 is just above the bottleneck), heads follow the same order.
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n_stages - 2, -1, -1):
            stride = self.strides[s + 1]
            self.upsample.append(_TRANSPOSED_CONV[dim](features[s + 1], features[s], stride,
                                                       stride=stride, bias=True))
            stage = [ConvBlocks(dim, 2 * features[s], features[s], self.kernel_sizes[s],
                                [1] * dim, conv_per_stage, norm)]
            if dropout > 0:
                stage.append(_DROPOUT[dim](p=dropout))
            self.decoder.append(nn.Sequential(*stage))
            self.heads.append(_CONV[dim](features[s], n_classes, 1, bias=True))

        self.apply(init_weights_he)

    def forward(self, x: torch.Tensor):
        self._check_input_shape(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()  # bottleneck: no skip of its own
        want_all = self.deep_supervision and self.training
        outputs = []
        for d, (up, stage) in enumerate(zip(self.upsample, self.decoder)):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
            is_last = d == len(self.decoder) - 1
            if want_all or is_last:
                outputs.append(self.heads[d](x))
        if not want_all:
            return outputs[-1]
        return outputs[::-1]  # full resolution first

    def _check_input_shape(self, x: torch.Tensor) -> None:
        """Transposed convs only restore the skip size when every axis divides evenly."""
        total = np.prod(np.array(self.strides), axis=0)
        spatial = x.shape[2:]
        if len(spatial) != self.dim or any(n % t for n, t in zip(spatial, total)):
            raise ValueError(f"input spatial shape {tuple(spatial)} must have {self.dim} axes, "
                             f"each divisible by the total stride {total.tolist()}")


def init_weights_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """Kaiming normal for convs (as nnU-Net's InitWeights_He), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_unet(configuration, norm: str = "instance", dropout: float = 0.0,
               deep_supervision: bool = True) -> UNet:
    """The U-Net a planned ``Configuration`` describes (dim, channels, outputs, network)."""
    network = configuration.network
    n_stages = int(network["n_stages"])
    features = list(network["features_per_stage"])[:n_stages]
    return UNet(dim=configuration.dim, in_channels=configuration.n_input_channels,
                n_classes=configuration.n_outputs, features_per_stage=features,
                strides=network["strides"][:n_stages],
                kernel_sizes=network["kernel_sizes"][:n_stages],
                conv_per_stage=int(network.get("conv_per_stage", 2)), norm=norm,
                dropout=dropout, deep_supervision=deep_supervision)


def deep_supervision_scales(strides) -> list[list[float]]:
    """Per-axis scale of each deep-supervision output relative to the input, full res first.

    One entry per decoder stage (``len(strides) - 1``), matching ``UNet.forward``'s list.
    """
    strides = np.array([list(s) for s in strides], dtype=float)
    cumulative = np.cumprod(strides, axis=0)[:-1]
    return [(1.0 / c).tolist() for c in cumulative]


def downsample_target(target: torch.Tensor, scales) -> list[torch.Tensor]:
    """Nearest-neighbour downsampled copies of a ``(B, 1, ...)`` label map, one per scale.

    nnU-Net downsamples the segmentation with nearest interpolation (no averaging: label
    ids must stay label ids). ``nearest-exact`` samples pixel centres, so a factor of 2
    takes the second voxel of every pair (the one at the block centre, rounding up).
    """
    spatial = target.shape[2:]
    results = []
    for scale in scales:
        scale = _as_float_axes(scale, len(spatial))
        size = [max(1, int(round(n * f))) for n, f in zip(spatial, scale)]
        if list(size) == list(spatial):
            results.append(target)
            continue
        resized = F.interpolate(target.float(), size=size, mode="nearest-exact")
        results.append(resized.to(target.dtype))
    return results


def _as_float_axes(value, n: int) -> list[float]:
    if isinstance(value, (int, float, np.floating, np.integer)):
        return [float(value)] * n
    return [float(v) for v in value]
