"""Small VGG-style CNN for 28x28 inputs."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._checks import check_input_size, positive_int


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        bn=nn.BatchNorm2d(cout),
        relu=nn.ReLU(),
    ))


def _convnet_out_size(s: int) -> int:
    return (s // 2) // 2  # two 2x2 max-pools; the padded 3x3 convs keep the size


class ConvNetSmall(nn.Module):
    """conv3x3 32-32, maxpool, 64-64, maxpool (BN + ReLU after every conv), fc 256, fc classes.

    For 28x28 inputs the flattened size is 64x7x7 = 3136.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        where = "convnet_small"
        in_channels = positive_int("in_channels", in_channels, where=where)
        num_classes = positive_int("num_classes", num_classes, where=where)
        input_size = check_input_size(input_size, _convnet_out_size, where=where)
        side = _convnet_out_size(input_size)
        self.features = nn.Sequential(OrderedDict(
            block1=_conv_bn_relu(in_channels, 32),
            block2=_conv_bn_relu(32, 32),
            pool1=nn.MaxPool2d(2),
            block3=_conv_bn_relu(32, 64),
            block4=_conv_bn_relu(64, 64),
            pool2=nn.MaxPool2d(2),
        ))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(64 * side * side, 256),
            relu=nn.ReLU(),
            fc2=nn.Linear(256, num_classes),
        ))
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def convnet_small(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> ConvNetSmall:
    """Small VGG-style CNN (about 0.87M parameters for 28x28, 10 classes); ``input_size`` >= 4."""
    return ConvNetSmall(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
