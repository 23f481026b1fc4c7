"""CIFAR-style ResNets (3x3 stem, no max-pool) with the parameter names of the original tools.

Names: ``conv1``, ``bn1``, ``layer1`` … ``layer4`` (blocks ``0``, ``1``, … holding ``conv1``,
``bn1``, ``conv2``, ``bn2`` [, ``conv3``, ``bn3``] and ``shortcut.0`` / ``shortcut.1`` where the
shape changes) and the classifier ``linear``. A checkpoint of the original ANP/RNP tools
loads as is. ``width`` is the base channel count (64 in the papers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int, norm_layer) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), norm_layer(out_planes))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes: int = 10, norm_layer=None,
                 in_channels: int = 3, width: int = 64):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(width)
        strides = (1, 2, 2, 2)
        for i, (n, stride) in enumerate(zip(num_blocks, strides)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2 ** i, n, stride, norm_layer))
        self.linear = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int, norm_layer) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s, norm_layer))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def stages(self) -> list:
        """(name, function) in forward order; ``models.split`` cuts the network between two of them."""
        return [("stem", lambda x: F.relu(self.bn1(self.conv1(x)))),
                ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3), ("layer4", self.layer4),
                # Adaptive pooling equals the original's avg_pool2d(out, 4) on 32x32 (and 28x28) inputs.
                ("pool", lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1)),
                ("linear", self.linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x


def resnet18(num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, norm_layer, in_channels, width)


def resnet34(num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, norm_layer, in_channels, width)


def resnet50(num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, norm_layer, in_channels, width)
