"""MobileNetV2 for 32x32 inputs (stride 1 in the stem and first stage, as in the CIFAR variants).

``width`` rescales every channel count relative to the reference 32-channel stem
(``width=64`` gives the paper's network, as for the other architectures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expansion, output channels at the reference width, blocks, stride)
CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class Block(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, norm_layer):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = norm_layer(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), norm_layer(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d

        def scaled(c: int) -> int:
            return max(1, round(c * width / 64))

        stem = scaled(32)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(stem)
        blocks, in_planes = [], stem
        for expansion, out, n, stride in CFG:
            for s in [stride] + [1] * (n - 1):
                blocks.append(Block(in_planes, scaled(out), expansion, s, norm_layer))
                in_planes = scaled(out)
        self.layers = nn.Sequential(*blocks)
        head = scaled(1280)
        self.conv2 = nn.Conv2d(in_planes, head, 1, bias=False)
        self.bn2 = norm_layer(head)
        self.linear = nn.Linear(head, num_classes)

    def stages(self) -> list:
        """(name, function) in forward order; ``models.split`` cuts the network between two of them."""
        return [("stem", lambda x: F.relu(self.bn1(self.conv1(x)))), ("layers", self.layers),
                ("conv2", lambda x: F.relu(self.bn2(self.conv2(x)))),
                ("pool", lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1)), ("linear", self.linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x


def mobilenetv2(num_classes: int = 10, norm_layer=None, in_channels: int = 3, width: int = 64) -> MobileNetV2:
    return MobileNetV2(num_classes, norm_layer, in_channels, width)


