"""Model zoo: MLP, LeNet-5, a small CNN, VGG-BN and ResNets for small images.

Plain torch.nn modules (nn.Conv2d, nn.Linear, nn.BatchNorm2d), so
``sparsestart.sparsify`` can swap the Linear/Conv2d layers for sparse ones.
In every model the Linear/Conv2d modules are registered in the order in which
forward executes them (first masked layer first, classifier last): layer-wise
density rules identify the first and last layer by that order.

Initialisation is torch's default for every layer (Kaiming-uniform with
a = sqrt(5) for Linear/Conv2d weights, BatchNorm weight 1 and bias 0); the
models apply no custom init, so re-initialise after building if a recipe
needs e.g. Kaiming-normal fan-out.
"""
from .convnet import ConvNetSmall, convnet_small
from .lenet import LeNet5, lenet5
from .mlp import MLP, mlp
from .registry import get, names
from .resnet import (BasicBlock, ResNet, cifar_resnet, resnet18, resnet20, resnet32, resnet44, resnet56,
                     resnet110)
from .vgg import VGG, vgg11, vgg13, vgg16, vgg19

__all__ = [
    "get", "names",
    "mlp", "lenet5", "convnet_small",
    "vgg11", "vgg13", "vgg16", "vgg19",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "cifar_resnet",
    "MLP", "LeNet5", "ConvNetSmall", "VGG", "ResNet", "BasicBlock",
]
