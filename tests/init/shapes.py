"""Small test models and the layer shapes of the papers' architectures, built inline.

The CIFAR VGG-16 and ResNet-18 are built here (not taken from the model zoo) so
these tests depend only on the layer shapes: 3x3 convs without bias, one Linear
to the classes; ResNet-18 with option-B 1x1 shortcuts, registered after the
main path (forward order). Build them under ``torch.device("meta")`` when only
shapes are needed.
"""
from __future__ import annotations

import torch
from torch import nn


def mlp(sizes=(784, 300, 100, 10)) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet5(num_classes=10) -> nn.Sequential:
    """LeNet-5-like on 28x28 inputs: 16 * 4 * 4 = 256 features after the convs."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg(config=VGG16, num_classes=10) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(c, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            c = item
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 64-128-256-512, average pool, Linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, c = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_Block(c, planes, stride), _Block(planes, planes, 1)]
            c = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes=10) -> ResNet18:
    return ResNet18(num_classes)


#: name -> (builder, per-sample input shape)
MODELS = {
    "mlp": (mlp, (1, 28, 28)),
    "lenet5": (lenet5, (1, 28, 28)),
    "vgg16": (vgg, (3, 32, 32)),
    "resnet18": (resnet18, (3, 32, 32)),
}


def build(name, device="cpu"):
    with torch.device(device):
        return MODELS[name][0]()


def weights(model) -> dict[str, int]:
    """{name: numel} of every Linear/Conv2d weight in registration order."""
    return {n: m.weight.numel() for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
