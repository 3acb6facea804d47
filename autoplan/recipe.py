"""The training recipe: one definition of a training step, its optimiser, loss and gradient clip.

The training loop runs :class:`TrainStep` and the planner's throughput probe times the very
same step (``planning/probe.py``) on a synthetic batch shaped like the loader's, so what the
planner measured is what training does: autocast, the configuration's loss with deep
supervision, backward with gradient scaling, the clip and the optimiser's step.
"""

import numpy as np
import torch

from autoplan.artifacts import Configuration, leaning_factors
from autoplan.nets import autocast

GRAD_CLIP = 12.0        # gradient-norm clip of every training step (nnU-Net's)


def task_type_of(configuration: Configuration) -> str:
    return "classification" if configuration.is_classifier else "segmentation"


def build_optimizer(name: str, params, lr: float, task_type: str) -> torch.optim.Optimizer:
    """The optimiser a run trains with."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)
    # fused: one kernel for all parameters instead of a loop over them; for a ResNet-18 on
    # 2 CPU cores the step goes from 18 to 4 ms (of a ~200 ms iteration), same arithmetic
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=3e-5, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2 if task_type == "classification" else 3e-5,
                                 fused=True)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adam, adamw)")


def build_loss(configuration: Configuration, loss_name: str | None = None, label_smoothing: float = 0.0,
               deep_supervision: bool = True) -> torch.nn.Module:
    """The loss a configuration trains with (``loss_name`` overrides the plan's).

    Segmentation: with ``deep_supervision`` nnU-Net's weights over the decoder outputs (the
    lowest one 0), else the full-resolution output alone (what validation scores). Classifier:
    cross-entropy-family loss with the plan's class weights when it planned a weighted loss.
    """
    from autoplan.losses import build_classification_loss, build_segmentation_loss, deep_supervision_weights
    from autoplan.nets.unet import deep_supervision_scales

    name = loss_name or configuration.loss
    if configuration.is_classifier:
        leaning, strategy = leaning_factors(configuration.imbalance), (configuration.imbalance or {}).get("strategy")
        # a weighted loss leans by weighting each image; a logit-adjusted one by shifting the logits
        weights = leaning if strategy == "weighted_loss" else None
        adjustment = -np.log(np.asarray(leaning, dtype=np.float64)) if strategy == "logit_adjusted" else None
        return build_classification_loss(name, class_weights=weights, label_smoothing=label_smoothing,
                                         logit_adjustment=adjustment)
    weights = None
    if deep_supervision:
        weights = deep_supervision_weights(len(deep_supervision_scales(configuration.network["strides"])))
    return build_segmentation_loss(name, configuration.n_outputs, batch_dice=configuration.batch_dice,
                                   deep_supervision_weights=weights)


class TrainStep:
    """One optimiser step: forward under autocast, loss, scaled backward, clip, step.

    Only fp16 scales the loss (bf16 keeps float32's exponent range); the scaler is a no-op
    otherwise and its state is saved with checkpoints all the same.
    """

    def __init__(self, network: torch.nn.Module, loss: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device_type: str, precision: str):
        self.network, self.loss, self.optimizer = network, loss, optimizer
        self.device_type, self.precision = device_type, precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def __call__(self, data: torch.Tensor, target) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device_type, self.precision):
            loss = self.loss(self.network(data), target)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def synthetic_batch(configuration: Configuration, device, generator: torch.Generator) -> tuple:
    """Random (data, target) shaped as the configuration's loader gives them: segmentation
    targets as one label map per deep-supervision output, classifier targets as class ids."""
    from autoplan.nets.unet import deep_supervision_scales, downsample_target

    batch, patch = configuration.batch_size, list(configuration.patch_size)
    data = torch.randn([batch, configuration.n_input_channels, *patch], generator=generator)
    if configuration.is_classifier:
        target = torch.randint(0, configuration.n_outputs, (batch,), generator=generator)
        return data.to(device), target.to(device)
    labels = torch.randint(0, configuration.n_outputs, (batch, 1, *patch), generator=generator).to(device)
    return data.to(device), downsample_target(labels, deep_supervision_scales(configuration.network["strides"]))
