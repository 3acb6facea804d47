"""Grad-CAM heat maps (Selvaraju et al. 2017) for the classifier's report.

The heat map of class c is ReLU(sum_k w_k A_k), where A_k are the channels of a conv
layer's output and w_k the spatial mean of d(logit_c)/d(A_k).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(model: nn.Module, images: torch.Tensor, target_classes=None,
             layer: nn.Module | None = None) -> np.ndarray:
    """Heat maps ``(B, H, W)`` in 0..1 for ``images`` ``(B, C, H, W)``.

    ``target_classes`` (``(B,)``) defaults to the predicted classes; ``layer`` defaults to
    ``model.feature_layer``. Runs the model in eval mode (and restores its mode), computes
    the gradient with ``torch.autograd.grad`` so no parameter ``.grad`` is touched, and
    always removes its hook.
    """
    layer = layer if layer is not None else model.feature_layer
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    images = images.to(device)
    captured = {}

    def replace_output(_module, _inputs, output):
        # Continue the forward pass from a leaf copy of the activation: its gradient is
        # then available even when the backbone is frozen, and the graph below the layer
        # is not kept.
        activation = output.detach().requires_grad_(True)
        captured["activation"] = activation
        return activation

    was_training = model.training
    handle = layer.register_forward_hook(replace_output)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(images)
            if "activation" not in captured:
                raise ValueError("the Grad-CAM layer was not used in the model's forward pass")
            if target_classes is None:
                target_classes = logits.argmax(dim=1)
            target_classes = torch.as_tensor(target_classes, device=logits.device).long().view(-1, 1)
            score = logits.gather(1, target_classes).sum()
            activation = captured["activation"]
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        handle.remove()
        model.train(was_training)

    with torch.no_grad():
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        return _normalise_each(cam).cpu().numpy().astype(np.float32)


def _normalise_each(cam: torch.Tensor) -> torch.Tensor:
    """Scale every map to 0..1; a map without any positive evidence stays all zero."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1) - low)
    return torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
