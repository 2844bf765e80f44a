"""CIFAR ResNets (He et al. 2016, Sec. 4.2) and the CIFAR variant of ResNet-18."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Tuple

import torch
from torch import nn

from ._checks import check_input_size, positive_float, positive_int, scaled


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; option-B shortcut (1x1 conv + BN) when the shape changes.

    The shortcut is registered after the main path and computed after it, so
    the execution order of the convolutions equals their registration order
    (conv1, conv2, shortcut) -- layer-wise density rules rely on that order.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(planes),
            ))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in place: hooks or algorithms may keep a reference to the BN output.
        return self.relu2(out + self.shortcut(x))


def _resnet_out_size(s: int, n_downsamples: int) -> int:
    # A 3x3 conv with stride 2 and padding 1 maps s to ceil(s / 2); never below 1.
    for _ in range(n_downsamples):
        s = (s + 1) // 2
    return s


class ResNet(nn.Module):
    """3x3 stem conv (no bias) + BN + ReLU, stages of basic blocks, global average pool, Linear.

    ``stages`` is a sequence of (planes, num_blocks, stride) before the width
    multiplier. No max-pool after the stem (CIFAR variant).
    """

    def __init__(self, stem_planes: int, stages: Sequence[Tuple[int, int, int]], *, in_channels: int = 3,
                 num_classes: int = 10, input_size: int = 32, width: float = 1, name: str = "resnet"):
        super().__init__()
        where = name
        in_channels = positive_int("in_channels", in_channels, where=where)
        num_classes = positive_int("num_classes", num_classes, where=where)
        n_down = sum(1 for _, _, s in stages if s != 1)
        input_size = check_input_size(input_size, lambda s: _resnet_out_size(s, n_down), where=where)
        width = positive_float("width", width, where=where)

        planes = scaled(stem_planes, width)
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        for i, (stage_planes, num_blocks, stride) in enumerate(stages, start=1):
            out_planes = scaled(stage_planes, width)
            blocks = []
            for b in range(num_blocks):
                blocks.append(BasicBlock(planes, out_planes, stride if b == 0 else 1))
                planes = out_planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        self.name, self.width = name, width
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{i}")(out)
        return self.fc(self.flatten(self.avgpool(out)))


def cifar_resnet(depth: int, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 width: float = 1) -> ResNet:
    """CIFAR ResNet-``depth``, depth = 6n + 2: three stages of n basic blocks, 16/32/64 channels x ``width``."""
    depth = positive_int("depth", depth, where="cifar_resnet")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"cifar_resnet: invalid depth={depth}; expected 6n + 2 with n >= 1 (8, 14, 20, 32, ...)")
    n = (depth - 2) // 6
    return ResNet(16, [(16, n, 1), (32, n, 2), (64, n, 2)], in_channels=in_channels, num_classes=num_classes,
                  input_size=input_size, width=width, name=f"resnet{depth}")


def _cifar_builder(depth: int):
    def build(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1) -> ResNet:
        return cifar_resnet(depth, in_channels=in_channels, num_classes=num_classes,
                            input_size=input_size, width=width)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = (
        f"CIFAR ResNet-{depth}: 3 stages of {(depth - 2) // 6} basic blocks, 16/32/64 channels times ``width``, "
        "option-B projection shortcuts, global average pooling, Linear with bias."
    )
    return build


resnet20 = _cifar_builder(20)
resnet32 = _cifar_builder(32)
resnet44 = _cifar_builder(44)
resnet56 = _cifar_builder(56)
resnet110 = _cifar_builder(110)


def resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1) -> ResNet:
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, 2 basic blocks per stage, 64-128-256-512 x ``width``."""
    return ResNet(64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], in_channels=in_channels,
                  num_classes=num_classes, input_size=input_size, width=width, name="resnet18")
