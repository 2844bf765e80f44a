"""sparsify / densify / summary: convert whole models between dense and sparse layers."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..init.sampling import check_density
from .modules import SparseConv2d, SparseLayer, SparseLinear

__all__ = ["sparsify", "densify", "summary", "maskable_layers", "Summary"]

_DENSE_TO_SPARSE = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def maskable_layers(model: nn.Module, exclude: Union[str, Iterable[str]] = ()) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every nn.Linear / nn.Conv2d not matched by ``exclude``.

    Order is registration order (``named_modules``), which is forward order for
    sequentially built models. ``exclude`` takes qualified names or glob
    patterns ("classifier", "features.0", "*.downsample.*").
    """
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return [(name, m) for name, m in model.named_modules()
            if type(m) in _DENSE_TO_SPARSE and not _excluded(name, patterns)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, density: Union[float, dict], distribution: str = "uniform", *, format: str = "csr",
             block_size: Optional[int] = None, seed: Optional[int] = None, exclude: Union[str, Iterable[str]] = (),
             flow: Optional[str] = None, exact: bool = True) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of ``model`` (in place) by its sparse counterpart.

    Each layer keeps its current weights at an ER-random structure whose
    density comes from ``distribution`` (layer-wise allocation of the overall
    ``density``) or from a dict {qualified name: density}. Returns ``model``.
    ``seed`` makes the structures reproducible (None: torch's global RNG).
    ``exact=False`` keeps each weight with probability p instead of exactly round(p * numel).
    """
    if flow is not None:
        raise NotImplementedError(f"flow={flow!r}: flow repair is not implemented yet; use flow=None")
    layers = maskable_layers(model, exclude)
    if not layers:
        raise ValueError("sparsify: the model has no nn.Linear or nn.Conv2d layer to sparsify "
                         "(or exclude matched all of them)")
    for name, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise NotImplementedError(f"sparsify: layer {name!r} is a grouped convolution (groups={m.groups}); "
                                      f"SparseConv2d supports groups=1 only; pass exclude=[{name!r}]")
    if isinstance(density, dict):
        densities = dict(density)
        unknown = set(densities) - {n for n, _ in layers}
        missing = [n for n, _ in layers if n not in densities]
        if unknown or missing:
            raise ValueError(f"sparsify: density dict must name exactly the maskable layers; "
                             f"unknown: {sorted(unknown)}, missing: {missing}")
        for n, d in densities.items():
            check_density(d, f"density[{n!r}]")
    elif distribution == "uniform":
        d = check_density(density)
        densities = {n: d for n, _ in layers}
    else:
        raise ValueError(f"sparsify: unknown distribution {distribution!r}; available: ['uniform'] "
                         f"(or a dict of per-layer densities)")
    for i, (name, m) in enumerate(layers):
        sparse_cls = _DENSE_TO_SPARSE[type(m)]
        layer_seed = None if seed is None else int(seed) * 1_000_003 + i
        sparse = sparse_cls.from_dense(m, density=densities[name], format=format, block_size=block_size,
                                       seed=layer_seed, exact=exact)
        _set_submodule(model, name, sparse)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear/SparseConv2d of ``model`` (in place) by the torch layer with the masked weight."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseLayer):
            if name == "":
                return m.to_dense()
            _set_submodule(model, name, m.to_dense())
    return model


@dataclass
class Summary:
    """Per-layer storage report; ``str()`` gives a table."""

    rows: list[dict] = field(default_factory=list)

    @property
    def total(self) -> dict:
        keys = ("numel", "nnz", "sparse_bytes", "dense_bytes")
        t = {k: sum(r[k] for r in self.rows) for k in keys}
        t["density"] = t["nnz"] / t["numel"] if t["numel"] else 1.0
        return t

    def __str__(self) -> str:
        head = f"{'layer':<28} {'type':<13} {'shape':<20} {'nnz':>10} {'density':>8} {'bytes':>12} {'dense bytes':>12}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['name']:<28} {r['type']:<13} {str(r['shape']):<20} {r['nnz']:>10} "
                         f"{r['density']:>8.4f} {r['sparse_bytes']:>12} {r['dense_bytes']:>12}")
        t = self.total
        lines.append(f"{'total':<28} {'':<13} {'':<20} {t['nnz']:>10} {t['density']:>8.4f} "
                     f"{t['sparse_bytes']:>12} {t['dense_bytes']:>12}")
        return "\n".join(lines)


def _bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def summary(model: nn.Module) -> Summary:
    """Storage of every Linear/Conv2d layer, sparse or dense: shape, nnz, density, bytes.

    ``sparse_bytes`` counts what the layer really stores (values, index and
    bias for sparse layers); ``dense_bytes`` what the dense layer would.
    """
    out = Summary()
    for name, m in model.named_modules():
        if isinstance(m, SparseLayer):
            shape = m.weight_shape
            numel = int(torch.Size(shape).numel())
            stored = sum(_bytes(t) for t in (m.values, m.bias, *m.buffers(recurse=False)))
            dense = numel * m.values.element_size() + _bytes(m.bias)
            out.rows.append(dict(name=name, type=type(m).__name__, shape=tuple(shape), numel=numel, nnz=m.nnz,
                                 density=m.density, sparse_bytes=stored, dense_bytes=dense))
        elif type(m) in _DENSE_TO_SPARSE:
            numel = m.weight.numel()
            b = _bytes(m.weight) + _bytes(m.bias)
            out.rows.append(dict(name=name, type=type(m).__name__, shape=tuple(m.weight.shape), numel=numel,
                                 nnz=numel, density=1.0, sparse_bytes=b, dense_bytes=b))
    return out
