"""VGG with BatchNorm, CIFAR variant (one linear layer to the classes)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._checks import check_input_size, positive_float, positive_int, scaled

# Standard configurations (Simonyan & Zisserman, configs A, B, D, E); "M" is a 2x2 max-pool.
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _vgg_out_size(s: int, n_pools: int = 5) -> int:
    # ceil_mode pools: ceil(s / 2) per pool; a 1x1 map stays 1x1.
    for _ in range(n_pools):
        s = -(-s // 2)
    return s


class VGG(nn.Module):
    """VGG-BN for small images: 3x3 convs (no bias) + BN + ReLU, max-pools, one Linear.

    Pools use ceil_mode=True, which equals the usual floor mode on 32x32 inputs
    (32 -> 16 -> 8 -> 4 -> 2 -> 1) and lets 28x28 inputs pass all five pools
    (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of reaching an empty map. An
    AdaptiveAvgPool2d(1) follows the last pool: it is the identity when the map
    is already 1x1 and averages it otherwise (inputs larger than 32), so the
    classifier always sees the last conv width.
    """

    def __init__(self, config: str, in_channels: int = 3, num_classes: int = 10,
                 input_size: int = 32, width: float = 1.0):
        super().__init__()
        if config not in CONFIGS:
            raise ValueError(f"vgg: invalid config={config!r}; expected one of {sorted(CONFIGS)}")
        where = config
        in_channels = positive_int("in_channels", in_channels, where=where)
        num_classes = positive_int("num_classes", num_classes, where=where)
        input_size = check_input_size(input_size, _vgg_out_size, where=where)
        width = positive_float("width", width, where=where)

        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        cin, n_conv, n_pool = in_channels, 0, 0
        for item in CONFIGS[config]:
            if item == "M":
                n_pool += 1
                layers[f"pool{n_pool}"] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
                continue
            cout = scaled(item, width)
            n_conv += 1
            layers[f"conv{n_conv}"] = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
            layers[f"bn{n_conv}"] = nn.BatchNorm2d(cout)
            layers[f"relu{n_conv}"] = nn.ReLU()
            cin = cout
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)
        self.config, self.width = config, width
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def _builder(config: str):
    def build(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: float = 1.0) -> VGG:
        return VGG(config, in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)

    build.__name__ = build.__qualname__ = config
    n_conv = sum(1 for c in CONFIGS[config] if c != "M")
    build.__doc__ = (
        f"{config.upper()}-BN, CIFAR variant: {n_conv} 3x3 convs (widths times ``width``), "
        "5 max-pools, global pooling, one Linear to ``num_classes``."
    )
    return build


vgg11 = _builder("vgg11")
vgg13 = _builder("vgg13")
vgg16 = _builder("vgg16")
vgg19 = _builder("vgg19")
