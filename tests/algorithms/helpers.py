"""Tiny sparse models, deterministic data and a training loop shared by the algorithm tests."""
from __future__ import annotations

import io

import torch
from torch import nn

import sparsestart.algorithms as algorithms
from sparsestart.nn import SparseConv2d, SparseLayer, SparseLinear

IN_FEATURES, CLASSES = 12, 3


def mlp(seed: int = 0, density: float = 0.4, format: str = "csr", block_size=None) -> nn.Module:
    """12 -> 32 -> 32 -> 3 (BSR: 16 -> 32 -> 32 -> 4 with blocks of 4), ReLU in place after the first layer."""
    torch.manual_seed(seed)
    kw = dict(format=format, block_size=block_size)
    if format == "bsr":
        dims = (16, 32, 32, 4)
    else:
        dims = (IN_FEATURES, 32, 32, CLASSES)
    return nn.Sequential(
        SparseLinear(dims[0], dims[1], density=density, seed=seed * 10 + 1, **kw), nn.ReLU(inplace=True),
        SparseLinear(dims[1], dims[2], density=density, seed=seed * 10 + 2, **kw), nn.ReLU(),
        SparseLinear(dims[2], dims[3], density=min(1.0, 2 * density), seed=seed * 10 + 3, **kw))


def cnn(seed: int = 0, density: float = 0.4) -> nn.Module:
    """[2, 8, 8] -> conv 3x3 pad 1 -> ReLU -> conv 3x3 stride 2 pad 1 -> ReLU -> linear -> 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        SparseConv2d(2, 6, 3, padding=1, density=density, seed=seed * 10 + 1), nn.ReLU(inplace=True),
        SparseConv2d(6, 8, 3, stride=2, padding=1, density=density, seed=seed * 10 + 2), nn.ReLU(),
        nn.Flatten(), SparseLinear(8 * 4 * 4, CLASSES, density=density, seed=seed * 10 + 3))


def input_shape(model: nn.Module) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, SparseLayer))
    if isinstance(first, SparseConv2d):
        return (2, 8, 8)
    return (first.in_features,)


def batches(model: nn.Module, steps: int, batch: int = 32, seed: int = 123):
    """A learnable toy problem: labels of a fixed random linear teacher; the same batches for the same seed."""
    shape = input_shape(model)
    g = torch.Generator().manual_seed(seed)
    n_in = int(torch.Size(shape).numel())
    teacher = torch.randn(n_in, 4, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, *shape, generator=g)
        y = (x.reshape(batch, -1) @ teacher).argmax(1)
        out.append((x, y))
    return out


def n_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, SparseLayer)][-1].weight_shape[0]


def sgd(model: nn.Module, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def validate_all(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.validate()


def train(model, optimizer, algo, data, *, validate: bool = False, after_step=None) -> list[float]:
    """The normal loop: forward, zero_grad, backward, optimizer.step(), algo.step()."""
    losses = []
    classes = n_classes(model)
    for i, (x, y) in enumerate(data):
        loss = nn.functional.cross_entropy(model(x), y % classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        algo.step()
        losses.append(loss.item())
        if validate:
            validate_all(model)
        if after_step is not None:
            after_step(i + 1)
    return losses


def roundtrip(obj):
    """torch.save / torch.load through memory (default weights_only loading)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def build(name: str, make, kwargs: dict, opt_kwargs: dict | None = None):
    model = make()
    optimizer = sgd(model, **(opt_kwargs or {}))
    return model, optimizer, algorithms.get(name, model, optimizer, **kwargs)
