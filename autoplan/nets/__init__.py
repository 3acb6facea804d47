"""Networks: the planned U-Net, ResNet classifiers and Grad-CAM heat maps."""

from autoplan.nets.gradcam import grad_cam
from autoplan.nets.resnet import (ResNet, build_resnet, freeze_stages, load_pretrained,
                                  unfreeze_all)
from autoplan.nets.unet import UNet, build_unet, deep_supervision_scales, downsample_target

__all__ = ["UNet", "build_unet", "deep_supervision_scales", "downsample_target", "ResNet",
           "build_resnet", "load_pretrained", "freeze_stages", "unfreeze_all", "grad_cam"]
