"""VGG-19 with BatchNorm for 32x32 inputs (the CIFAR variant used by ANP's and RNP's tools).

Parameter names: ``features.<i>`` (conv, BatchNorm, ReLU, pooling in sequence) and ``classifier``.
``width`` scales every stage (64 in the paper, the first stage's channel count).
"""
from __future__ import annotations

import torch
from torch import nn

# Channel counts in units of the base width; "M" is a 2x2 max-pool.
VGG19_LAYOUT = [1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M"]


class VGG(nn.Module):
    def __init__(self, layout, num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        layers, channels = [], in_channels
        for item in layout:
            if item == "M":
                # ceil_mode keeps 28x28 inputs (Fashion-MNIST) alive through five pools.
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                out = item * width
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), norm_layer(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def stages(self) -> list:
        """(name, function) in forward order; ``models.split`` cuts the network between two of them."""
        return [("features", self.features),
                ("pool", lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)),
                ("classifier", self.classifier)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x


def vgg19_bn(num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64) -> VGG:
    return VGG(VGG19_LAYOUT, num_classes, norm_layer, in_channels, width)
