"""The networks of the construction: the ER source network, and the target as construct() takes it."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_Layers = Tuple[List[torch.Tensor], List[torch.Tensor], List[bool]]


class ERSourceNetwork(nn.Module):
    """An MLP of depth ``L + 1`` whose weights are masked by fixed ER masks.

    ``layers[l]`` is an ``nn.Linear`` for source layer ``l``; ``mask{l}`` (buffer,
    bool, same shape as the weight) is its ER mask; the forward pass uses
    ``weight * mask``. ``relu[l]`` says whether source layer ``l`` is followed by a
    ReLU (always for layer 0; for ``l >= 1`` as target layer ``l``).
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 masks: Sequence[torch.Tensor], relu: Sequence[bool]):
        super().__init__()
        self.layers = nn.ModuleList()
        for l, (w, b, m) in enumerate(zip(weights, biases, masks)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=True, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.layers.append(lin)
            self.register_buffer(f"mask{l}", m.to(torch.bool))
        self.relu = [bool(r) for r in relu]

    def masks(self) -> List[torch.Tensor]:
        return [getattr(self, f"mask{l}") for l in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for l, lin in enumerate(self.layers):
            m = getattr(self, f"mask{l}")
            x = F.linear(x, lin.weight * m.to(lin.weight.dtype), lin.bias)
            if self.relu[l]:
                x = F.relu(x)
        return x


def _parse_sequential(target: nn.Module, dtype) -> _Layers:
    """Layers of an nn.Sequential of nn.Linear and nn.ReLU (or of one nn.Linear)."""
    weights: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    relu: List[bool] = []
    mods = list(target) if isinstance(target, nn.Sequential) else [target]
    for k, mod in enumerate(mods):
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().to(dtype).clone()
            b = (mod.bias.detach().to(dtype).clone() if mod.bias is not None
                 else torch.zeros(w.shape[0], dtype=dtype))
            weights.append(w)
            biases.append(b)
            relu.append(False)
        elif isinstance(mod, nn.ReLU):
            if not weights or relu[-1]:
                raise ValueError(f"target[{k}]: nn.ReLU must directly follow an nn.Linear")
            relu[-1] = True
        else:
            raise ValueError(
                f"target[{k}] is {type(mod).__name__}; only nn.Linear and nn.ReLU are supported"
            )
    return weights, biases, relu


def _parse_pairs(target: Sequence, dtype) -> _Layers:
    """Layers of a list of (weight, bias) pairs: ReLU between layers, none at the output."""
    weights: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    relu: List[bool] = []
    for k, item in enumerate(target):
        if not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"target[{k}] must be a (weight, bias) pair, got {type(item).__name__}")
        w, b = item
        w = torch.as_tensor(w).detach().to(dtype).clone()
        if w.dim() != 2:
            raise ValueError(f"target[{k}] weight must be 2-D (n_out, n_in), got shape {tuple(w.shape)}")
        b = (torch.zeros(w.shape[0], dtype=dtype) if b is None
             else torch.as_tensor(b).detach().to(dtype).clone().reshape(-1))
        weights.append(w)
        biases.append(b)
        relu.append(True)
    if relu:
        relu[-1] = False
    return weights, biases, relu


def _check_chain(weights: List[torch.Tensor], biases: List[torch.Tensor]) -> None:
    """Each bias fits its layer and each layer takes the outputs of the one before."""
    for l in range(len(weights)):
        if biases[l].shape[0] != weights[l].shape[0]:
            raise ValueError(f"target layer {l + 1}: bias has {biases[l].shape[0]} entries, "
                             f"weight has {weights[l].shape[0]} rows")
        if l > 0 and weights[l].shape[1] != weights[l - 1].shape[0]:
            raise ValueError(f"target layer {l + 1} expects {weights[l].shape[1]} inputs, "
                             f"layer {l} has {weights[l - 1].shape[0]} outputs")


def _parse_target(target, dtype) -> _Layers:
    """Weights ``(n_l, n_{l-1})``, biases and ReLU flags of target layers 1..L."""
    if isinstance(target, nn.Module):
        weights, biases, relu = _parse_sequential(target, dtype)
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        weights, biases, relu = _parse_pairs(target, dtype)
    else:
        raise ValueError(
            f"target must be an nn.Sequential of nn.Linear/nn.ReLU or a list of (weight, bias), "
            f"got {type(target).__name__}"
        )
    if not weights:
        raise ValueError("target has no linear layer")
    _check_chain(weights, biases)
    return weights, biases, relu


def target_forward(target, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a target given as :func:`construct` accepts it (in ``x.dtype``)."""
    ws, bs, relu = _parse_target(target, x.dtype)
    for w, b, r in zip(ws, bs, relu):
        x = F.linear(x, w, b)
        if r:
            x = F.relu(x)
    return x
