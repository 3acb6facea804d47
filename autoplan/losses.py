"""Segmentation and classification losses.

Conventions (see docs/nets.md):
- Segmentation losses take logits ``(B, K, ...)`` and an integer label map ``(B, 1, ...)``.
- Every loss is >= 0 and falls as the prediction improves: the Dice term is
  ``1 - soft Dice`` (nnU-Net returns ``-Dice``; the gradients are the same).
- ``bce`` is for two-class outputs (background + one foreground label). The network
  still has K=2 output channels; the loss uses the logit difference ``z1 - z0``, for
  which ``sigmoid(z1 - z0) == softmax(z)[1]``, so training with BCE and predicting with
  softmax agree.
- With deep supervision, the forward takes lists (outputs full resolution first, and
  targets downsampled to match); weights are nnU-Net's.
"""

import torch
import torch.nn.functional as F
from torch import nn

from autoplan.errors import InputError

SEGMENTATION_LOSSES = ("ce", "bce", "dice", "dice_ce", "focal", "ce_focal")
CLASSIFICATION_LOSSES = ("ce", "bce", "focal", "ce_focal")


def _labels(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) label map -> (B, ...) int64, as CE wants."""
    if target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def _one_hot(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, ...) labels -> (B, K, ...) float one-hot."""
    return F.one_hot(target, n_classes).movedim(-1, 1).float()


def _binary_logit(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] != 2:
        raise ValueError(f"bce needs exactly 2 output channels (background + one label), "
                         f"got {logits.shape[1]}")
    return logits[:, 1] - logits[:, 0]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class focal loss on softmax: mean of -alpha_y (1 - p_y)^gamma log p_y.

    With ``alpha`` the mean is weighted like ``F.cross_entropy(weight=alpha)`` (divided
    by the sum of the weights), so gamma=0 gives exactly weighted cross-entropy.
    """
    # float32: (1 - p)^gamma and log p lose too much in half precision under autocast.
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if alpha is None:
        return loss.mean()
    weight = alpha.to(logits.device, torch.float32)[target]
    return (weight * loss).sum() / weight.sum().clamp_min(1e-12)


class SoftDiceLoss(nn.Module):
    """1 - soft Dice of softmax probabilities over the foreground channels.

    As nnU-Net's MemoryEfficientSoftDiceLoss (do_bg=False, smooth=1e-5): per image and
    channel ``(2 I + smooth) / (P + G + smooth)`` averaged, or with ``batch_dice`` the
    sums run over the whole batch first (one Dice per channel).
    """

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _labels(target)
        probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
        truth = _one_hot(labels, logits.shape[1])[:, 1:]
        axes = tuple(range(2, logits.ndim))
        if self.batch_dice:
            axes = (0,) + axes
        intersection = (probabilities * truth).sum(axes)
        denominator = probabilities.sum(axes) + truth.sum(axes)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        return 1 - dice.mean()


class SegmentationLoss(nn.Module):
    """One of SEGMENTATION_LOSSES on a single output/target pair."""

    def __init__(self, name: str, batch_dice: bool = False, focal_gamma: float = 2.0):
        super().__init__()
        self.name = name
        self.focal_gamma = focal_gamma
        self.dice = SoftDiceLoss(batch_dice=batch_dice)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _labels(target)
        if self.name == "ce":
            return F.cross_entropy(logits, labels)
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(_binary_logit(logits), labels.float())
        if self.name == "dice":
            return self.dice(logits, target)
        if self.name == "dice_ce":
            return F.cross_entropy(logits, labels) + self.dice(logits, target)
        if self.name == "focal":
            return focal_loss(logits, labels, self.focal_gamma)
        if self.name == "ce_focal":
            return F.cross_entropy(logits, labels) + focal_loss(logits, labels, self.focal_gamma)
        raise AssertionError(self.name)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's weights: 1/2^i (full resolution first), the lowest output 0, sum 1."""
    weights = [1 / 2 ** i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over lists of outputs and targets (zero weights skipped)."""

    def __init__(self, loss: nn.Module, weights=None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs, targets):
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, targets[0] if isinstance(targets, (list, tuple)) else targets)
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
        weights = self.weights or deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} weights")
        total = 0.0
        for weight, output, target in zip(weights, outputs, targets):
            if weight != 0:
                total = total + weight * self.loss(output, target)
        return total


def build_segmentation_loss(name: str, n_classes: int, batch_dice: bool = False,
                            deep_supervision_weights=None) -> nn.Module:
    """Loss ``name`` for a K=n_classes segmentation net.

    The returned module takes ``(outputs, targets)``: lists with deep supervision (weights
    given, or nnU-Net's for the list's length when None), tensors otherwise.
    """
    if name not in SEGMENTATION_LOSSES:
        raise InputError(None, f"unknown segmentation loss {name!r}; use one of {', '.join(SEGMENTATION_LOSSES)}")
    if name == "bce" and n_classes != 2:
        raise InputError(None, f"loss 'bce' needs exactly one foreground label, the dataset has "
                               f"{n_classes - 1}; use ce, dice, dice_ce or focal")
    return DeepSupervisionLoss(SegmentationLoss(name, batch_dice=batch_dice),
                               deep_supervision_weights)


class ClassificationLoss(nn.Module):
    """One of CLASSIFICATION_LOSSES on logits ``(B, K)`` and targets ``(B,)``.

    ``class_weights`` weight CE and serve as focal's per-class alpha. ``bce`` (two
    classes only) uses the logit difference, with ``class_weights[1] / class_weights[0]``
    as the positive-class weight. ``logit_adjustment`` (K,) is added to the logits before
    the loss (logit-adjusted loss, Menon et al. 2021: ``tau * log prior`` makes the network's
    own logits lean towards rare classes by ``prior ** -tau`` without weighting any gradient).
    """

    def __init__(self, name: str, class_weights=None, label_smoothing: float = 0.0,
                 focal_gamma: float = 2.0, logit_adjustment=None):
        super().__init__()
        self.name = name
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)
        adjustment = None if logit_adjustment is None else torch.as_tensor(logit_adjustment, dtype=torch.float32)
        self.register_buffer("logit_adjustment", adjustment)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long().view(-1)
        if self.logit_adjustment is not None:
            logits = logits + self.logit_adjustment.to(logits.dtype)
        if self.name == "bce":
            return self._bce(logits, target)
        ce = F.cross_entropy(logits, target, weight=self.class_weights,
                             label_smoothing=self.label_smoothing)
        if self.name == "ce":
            return ce
        focal = focal_loss(logits, target, self.focal_gamma, self.class_weights)
        return focal if self.name == "focal" else ce + focal

    def _bce(self, logits, target):
        positive_weight = None
        if self.class_weights is not None:
            positive_weight = self.class_weights[1] / self.class_weights[0]
        # Label smoothing for a binary target: 0 -> s/2, 1 -> 1 - s/2 (as CE with K=2).
        soft_target = target.float() * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(_binary_logit(logits), soft_target,
                                                  pos_weight=positive_weight)


def build_classification_loss(name: str, class_weights=None, label_smoothing: float = 0.0,
                              focal_gamma: float = 2.0, n_classes: int | None = None,
                              logit_adjustment=None) -> nn.Module:
    """Loss ``name`` for a classifier; ``n_classes`` (optional) checks 'bce' up front."""
    if name not in CLASSIFICATION_LOSSES:
        raise InputError(None, f"unknown classification loss {name!r}; use one of {', '.join(CLASSIFICATION_LOSSES)}")
    if name == "bce" and n_classes is not None and n_classes != 2:
        raise InputError(None, f"loss 'bce' needs exactly two classes, the dataset has {n_classes}; "
                               "use ce, focal or ce_focal")
    if class_weights is not None and n_classes is not None and len(class_weights) != n_classes:
        raise ValueError(f"{len(class_weights)} class weights for {n_classes} classes")
    return ClassificationLoss(name, class_weights, label_smoothing, focal_gamma, logit_adjustment)
