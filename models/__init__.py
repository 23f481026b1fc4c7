"""Model registry: every architecture takes ``num_classes``, ``norm_layer``, ``in_channels``, ``width``.

``create_model("resnet18", num_classes=10, masked=True)`` builds the network with
:class:`MaskedBatchNorm2d` layers (ANP/RNP); ``masked=False`` gives plain BatchNorm.
The original call signature works too: ``models.resnet18(num_classes=10, norm_layer=models.NoisyBatchNorm2d)``.
"""
from __future__ import annotations

from torch import nn

from utils.errors import OptionError

from .masked_batchnorm import (MaskBatchNorm2d, MaskedBatchNorm1d, MaskedBatchNorm2d, NoisyBatchNorm2d,
                               clip_masks, is_mask_parameter, mask_parameters, masked_layers, noise_parameters,
                               reset_perturbation, set_perturbation, train_only)
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet18, resnet34, resnet50
from .vgg import VGG, vgg19_bn

ARCHITECTURES = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg19_bn": vgg19_bn,
    "mobilenetv2": mobilenetv2,
}


def create_model(arch: str, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 masked: bool = False) -> nn.Module:
    """Build ``arch`` from the registry; ``masked`` swaps in the mask-carrying BatchNorm."""
    if arch not in ARCHITECTURES:
        raise OptionError("arch", f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    norm_layer = MaskedBatchNorm2d if masked else nn.BatchNorm2d
    return ARCHITECTURES[arch](num_classes=num_classes, norm_layer=norm_layer, in_channels=in_channels, width=width)


__all__ = [
    "ARCHITECTURES", "create_model", "resnet18", "resnet34", "resnet50", "vgg19_bn", "mobilenetv2",
    "ResNet", "VGG", "MobileNetV2", "MaskedBatchNorm2d", "MaskedBatchNorm1d", "NoisyBatchNorm2d",
    "MaskBatchNorm2d", "masked_layers", "mask_parameters", "noise_parameters", "set_perturbation",
    "reset_perturbation", "clip_masks", "is_mask_parameter", "train_only",
]
