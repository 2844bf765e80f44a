"""Fully connected network (the papers' tabular / MNIST model)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ._checks import positive_int

# Activation name -> module factory. Modules (not functional calls) so that the
# structure is visible in named_modules() and printing the model shows it.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "identity": nn.Identity,
}


class MLP(nn.Sequential):
    """Flatten, then Linear layers of the given sizes with an activation between them.

    sizes = [in_features, hidden_1, ..., out_features]; no activation after the
    last layer (it returns logits). Children are named flatten, fc1, act1, fc2, ...
    """

    def __init__(self, sizes: Sequence[int], *, activation: str = "relu", bias: bool = True):
        where = "mlp"
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"{where}: invalid sizes={sizes!r}; expected a sequence of ints such as [784, 300, 100, 10]")
        if len(sizes) < 2:
            raise ValueError(
                f"{where}: invalid sizes={list(sizes)!r}; expected at least 2 entries (in_features, ..., out_features)"
            )
        sizes = [positive_int(f"sizes[{i}]", s, where=where) for i, s in enumerate(sizes)]
        if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
            raise ValueError(
                f"{where}: invalid activation={activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        activation = activation.lower()
        if not isinstance(bias, bool):
            raise TypeError(f"{where}: invalid bias={bias!r}; expected a bool")

        layers: "OrderedDict[str, nn.Module]" = OrderedDict(flatten=nn.Flatten())
        n = len(sizes) - 1
        for i in range(n):
            layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1], bias=bias)
            if i < n - 1:
                layers[f"act{i + 1}"] = ACTIVATIONS[activation]()
        super().__init__(layers)
        self.sizes = tuple(sizes)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.sizes[0]:
            raise ValueError(
                f"mlp: expected input of shape (batch, ...) with {self.sizes[0]} features per sample, "
                f"got shape {tuple(x.shape)}"
            )
        return super().forward(x)


def mlp(sizes: Sequence[int], *, activation: str = "relu", bias: bool = True) -> MLP:
    """MLP with layer sizes ``sizes``, e.g. ``mlp([784, 300, 100, 10])`` (LeNet-300-100).

    The input is flattened from dimension 1 on, so (B, 1, 28, 28) images work
    directly with ``sizes[0] == 784``.
    """
    return MLP(sizes, activation=activation, bias=bias)
