"""ResNet-18/34/50 classifiers whose state-dict keys match torchvision's layout.

Matching keys (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...,
``fc``) lets ``load_pretrained`` read ImageNet weights saved from torchvision without
torchvision itself. ``width`` scales every stage (64 gives torchvision's 64/128/256/512).
"""

from pathlib import Path

import torch
from torch import nn

from autoplan.errors import InputError

ARCHITECTURES = {  # arch -> (block kind, blocks per stage)
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


def _conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(self, block, blocks_per_stage, in_channels=3, n_classes=1000, width=64,
                 dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = width
        for index, n_blocks in enumerate(blocks_per_stage):
            planes = width * 2 ** index
            stage, channels = _make_stage(block, channels, planes, n_blocks,
                                          stride=1 if index == 0 else 2)
            setattr(self, f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Dropout sits outside `fc` so the head keeps torchvision's key names.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, n_classes)
        self.n_stages = len(blocks_per_stage)
        self._frozen: list[nn.Module] = []  # set by freeze_stages
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return x

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(self.dropout(x))

    @property
    def feature_layer(self) -> nn.Module:
        """Last conv stage (Grad-CAM target). A property, not an attribute, so the
        stage is not registered twice and the state-dict keys stay torchvision's."""
        return getattr(self, f"layer{self.n_stages}")

    def train(self, mode: bool = True):
        # BatchNorms frozen by `freeze_stages` keep their running statistics.
        super().train(mode)
        if mode:
            for part in self._frozen:
                for module in part.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.eval()
        return self


def _make_stage(block, in_channels, planes, n_blocks, stride):
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride),
                                   nn.BatchNorm2d(out_channels))
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(out_channels, planes) for _ in range(1, n_blocks)]
    return nn.Sequential(*blocks), out_channels


def build_resnet(arch: str = "resnet18", in_channels: int = 3, n_classes: int = 7,
                 width: int = 64, dropout: float = 0.0, blocks_per_stage=None) -> ResNet:
    """ResNet ``arch`` for ``n_classes``; ``blocks_per_stage`` overrides the arch's depth."""
    if arch not in ARCHITECTURES:
        raise InputError(None, f"unknown architecture {arch!r}; use one of {sorted(ARCHITECTURES)}")
    kind, default_blocks = ARCHITECTURES[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, list(blocks_per_stage or default_blocks), in_channels=in_channels,
                  n_classes=n_classes, width=width, dropout=dropout)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise InputError(path, "pretrained weights file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated files, non-torch files
        raise InputError(path, f"cannot read pretrained weights: {error}") from error
    for key in ("state_dict", "model", "network_weights"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise InputError(path, "expected a state dict (name -> tensor) or a checkpoint holding "
                               "one under 'state_dict' or 'model'")
    # Weights saved from DataParallel / torch.compile carry a prefix on every key.
    for prefix in ("module.", "_orig_mod."):
        if data and all(k.startswith(prefix) for k in data):
            data = {k[len(prefix):]: v for k, v in data.items()}
    return data


def load_pretrained(model: ResNet, path, n_classes: int | None = None) -> dict:
    """Load a torchvision-layout state dict into ``model``'s backbone; ``fc`` stays fresh.

    The head is always re-initialised (our classes are not ImageNet's); ``n_classes``
    only checks that the model's head has the expected size. Missing or shape-mismatched
    backbone keys raise InputError. Grey models (1 input channel) take RGB weights by
    summing ``conv1`` over the colour channels, which responds to a grey image as the
    RGB filter does to the same grey value in every channel.
    """
    path = Path(path)
    weights = _read_state_dict(path)
    if n_classes is not None and model.fc.out_features != n_classes:
        raise ValueError(f"model has {model.fc.out_features} outputs, expected {n_classes}")
    target = model.state_dict()
    skipped = sorted(k for k in weights if k.startswith("fc."))
    loaded = {}
    problems = []
    for key, wanted in target.items():
        if key.startswith("fc."):
            continue
        if key not in weights:
            if not key.endswith("num_batches_tracked"):  # absent from old torchvision files
                problems.append(f"missing {key}")
            continue
        value = weights[key]
        if key == "conv1.weight" and wanted.shape[1] == 1 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != wanted.shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, model needs {tuple(wanted.shape)}")
            continue
        loaded[key] = value.to(wanted.dtype)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise InputError(path, f"weights do not fit this network: {shown}")
    skipped += sorted(k for k in weights if k not in target and not k.startswith("fc."))
    model.load_state_dict(loaded, strict=False)
    model.fc.reset_parameters()
    return {"loaded": len(loaded), "skipped": skipped}


def _stem_and_stages(model: ResNet) -> list[list[nn.Module]]:
    return [[model.conv1, model.bn1]] + [
        [getattr(model, f"layer{i}")] for i in range(1, model.n_stages + 1)]


def freeze_stages(model: ResNet, n: int) -> None:
    """Freeze conv1/bn1 and layer1..n (BN statistics too) while the new head warms up.

    Frozen BatchNorms stay in eval mode (``ResNet.train`` keeps them there) until
    ``unfreeze_all``: updating the running statistics of a frozen backbone would drift
    it away from the pretrained features it is meant to keep.
    """
    model._frozen = [m for part in _stem_and_stages(model)[: n + 1] for m in part]
    for module in model._frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    model.train(model.training)


def unfreeze_all(model: ResNet) -> None:
    model._frozen = []
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train(model.training)
