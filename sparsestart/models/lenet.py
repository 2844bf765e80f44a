"""LeNet-5-like CNN."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._checks import check_input_size, positive_int


def _lenet_out_size(s: int) -> int:
    # conv5x5 (no padding) -> maxpool 2 -> conv5x5 -> maxpool 2
    s = s - 4
    if s < 1:
        return 0
    s //= 2
    s -= 4
    if s < 1:
        return 0
    return s // 2


class LeNet5(nn.Module):
    """conv5x5(6) - pool - conv5x5(16) - pool - fc 120 - fc 84 - fc classes.

    Convolutions without padding, as in the original LeNet-5 on 32x32 inputs
    (16x5x5 = 400 features); on 28x28 MNIST the flattened size is 16x4x4 = 256.
    Modernised like most "LeNet-5" baselines: ReLU and max-pooling.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        where = "lenet5"
        in_channels = positive_int("in_channels", in_channels, where=where)
        num_classes = positive_int("num_classes", num_classes, where=where)
        input_size = check_input_size(input_size, _lenet_out_size, where=where)
        side = _lenet_out_size(input_size)
        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_channels, 6, kernel_size=5),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, kernel_size=5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
        ))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(16 * side * side, 120),
            relu1=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu2=nn.ReLU(),
            fc3=nn.Linear(84, num_classes),
        ))
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> LeNet5:
    """LeNet-5-like CNN; the first linear layer's size follows from ``input_size`` (>= 16)."""
    return LeNet5(in_channels=in_channels, num_classes=num_classes, input_size=input_size)
