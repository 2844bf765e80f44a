"""Build models by name: ``get("resnet20", num_classes=100)``."""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .convnet import convnet_small
from .lenet import lenet5
from .mlp import mlp
from .resnet import resnet18, resnet20, resnet32, resnet44, resnet56, resnet110
from .vgg import vgg11, vgg13, vgg16, vgg19

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (mlp, lenet5, convnet_small, vgg11, vgg13, vgg16, vgg19,
              resnet20, resnet32, resnet44, resnet56, resnet110, resnet18)
}


def names() -> List[str]:
    """Sorted names accepted by :func:`get`."""
    return sorted(_BUILDERS)


def _normalise(name: str) -> str:
    # "ResNet-20" and "VGG16" resolve too; no registered name contains "-".
    return name.strip().lower().replace("-", "")


def get(name: str, **kwargs) -> nn.Module:
    """Build the model called ``name`` (case-insensitive) with the builder's keyword arguments.

    Example: ``get("mlp", sizes=[784, 300, 100, 10])``, ``get("vgg16", num_classes=100)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"get: name must be a str, got {name!r} ({type(name).__name__})")
    key = _normalise(name)
    if key not in _BUILDERS:
        raise ValueError(f"get: unknown model name {name!r}; valid names are: {', '.join(names())}")
    return _BUILDERS[key](**kwargs)
