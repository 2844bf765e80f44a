"""sparsify / densify / summary: convert whole models between dense and sparse layers."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..init.sampling import check_density
from .modules import SparseConv2d, SparseLayer, SparseLinear, _real_number

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


def check_exclude(model: nn.Module, exclude: Union[str, Iterable[str]], option: str = "--exclude",
                  model_name: str = "") -> None:
    """ValueError for an ``exclude`` pattern that matches none of the model's Linear/Conv2d layers
    (a typo would otherwise leave every layer sparse without a word)."""
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    names = [name for name, _ in maskable_layers(model)]
    for pattern in patterns:
        if not any(_excluded(name, (pattern,)) for name in names):
            of = f" of {model_name}" if model_name else ""
            raise ValueError(f"{option} {pattern!r} matches no Linear/Conv2d layer{of}; its layers are: "
                             f"{', '.join(names) or '(none)'}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, density: Union[float, dict], distribution: str = "erk", *, format: str = "csr",
             block_size: Optional[int] = None, seed: Optional[int] = None, exclude: Union[str, Iterable[str]] = (),
             flow: Optional[str] = None, exact: bool = True, **options) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of ``model`` (in place) by its sparse counterpart.

    Each layer keeps its current weights at an ER-random structure. The
    per-layer densities come from :func:`sparsestart.init.allocate_densities`
    with ``distribution`` (default "erk"; "uniform", "uniform_plus", "er",
    "erk_plus", "balanced", "pyramidal", "snip", "grasp", "synflow", "custom")
    and its ``**options`` (e.g. ``power=``, ``data=(x, y)``, ``input_shape=``),
    or from a dict {qualified name: density} given as ``density``. The budget is
    exact: the masked layers keep round(density * their weights) in total
    (counted in blocks for BSR). ``exclude`` (names or glob patterns) leaves
    layers dense and outside the budget. ``seed`` makes the structures
    reproducible (None: torch's global RNG). ``exact=False`` keeps each weight
    with probability p instead of exactly round(p * numel) (budget met only in
    expectation). ``flow="random_addition"`` or ``"rejection"`` then repairs dead
    units with :func:`sparsestart.init.repair_flow` (``keep_budget=True``: exact
    except in layers with fewer weights than units, see ``over_budget``); its
    :class:`~sparsestart.init.FlowReport` is stored as ``model.flow_report``.
    Returns ``model``.
    """
    from ..init.densities import allocate_densities
    from ..init.flow import METHODS, repair_flow

    if flow is not None and flow not in METHODS:
        raise ValueError(f"sparsify: flow must be None or one of {list(METHODS)}, got {flow!r}")
    layers = maskable_layers(model, exclude)
    if not layers:
        raise ValueError("sparsify: the model has no nn.Linear or nn.Conv2d layer to sparsify "
                         "(or exclude matched all of them)")
    for name, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise NotImplementedError(f"sparsify: layer {name!r} is a grouped convolution (groups={m.groups}); "
                                      f"SparseConv2d supports groups=1 only; pass exclude=[{name!r}]")
    unit = 1 if format != "bsr" or block_size is None else block_size
    if isinstance(density, dict):
        if options:
            raise TypeError(f"sparsify: options {sorted(options)} apply to a distribution, not to a density dict")
        names = {n for n, _ in layers}
        unknown = set(density) - names
        missing = [n for n, _ in layers if n not in density]
        if unknown or missing:
            raise ValueError(f"sparsify: density dict must name exactly the maskable layers; "
                             f"unknown: {sorted(unknown)}, missing: {missing}")
        densities = {}
        for n, d in density.items():
            densities[n] = check_density(_real_number(d, f"density[{n!r}]"), f"density[{n!r}]")
    else:
        if density is not None:  # None: the 'custom' distribution's own densities
            density = _real_number(density, "density")  # numpy scalars and 0-d tensors are numbers too
        densities = allocate_densities(model, density, distribution, exclude=exclude, block_size=unit, **options)
    for i, (name, m) in enumerate(layers):
        sparse_cls = _DENSE_TO_SPARSE[type(m)]
        layer_seed = None if seed is None else int(seed) * 1_000_003 + i
        sparse = sparse_cls.from_dense(m, density=densities[name], format=format, block_size=block_size,
                                       seed=layer_seed, exact=exact)
        _set_submodule(model, name, sparse)
    if flow is not None:
        model.flow_report = repair_flow(model, flow, keep_budget=True,
                                        seed=None if seed is None else int(seed) + 7_919,
                                        input_shape=options.get("input_shape"))
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
    """Per-layer storage and compute report; ``str()`` gives a table.

    Each row: name, type, shape, numel, nnz, density, ``sparse_bytes`` (all the
    layer stores: values at full capacity, index, bias), ``dense_bytes`` (what
    the dense layer stores), ``param_bytes`` (values at full capacity plus bias:
    the parameters an optimizer sees), ``index_bytes``, and ``dense_flops`` /
    ``sparse_flops``: multiply-adds per sample of the weight product (bias
    additions not counted), dense and counting only stored nonzeros; None for
    a convolution when no ``input_size`` was given to :func:`summary`.
    """

    rows: list[dict] = field(default_factory=list)

    @property
    def total(self) -> dict:
        keys = ("numel", "nnz", "sparse_bytes", "dense_bytes", "param_bytes", "index_bytes")
        t = {k: sum(r[k] for r in self.rows) for k in keys}
        t["density"] = t["nnz"] / t["numel"] if t["numel"] else 1.0
        for k in ("dense_flops", "sparse_flops"):
            vals = [r[k] for r in self.rows]
            t[k] = None if any(v is None for v in vals) else sum(vals)
        return t

    def __str__(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:,}"
        head = (f"{'layer':<28} {'type':<13} {'shape':<20} {'nnz':>10} {'density':>8} {'bytes':>12} "
                f"{'dense bytes':>12} {'sparse MACs':>14} {'dense MACs':>14}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['name']:<28} {r['type']:<13} {str(r['shape']):<20} {r['nnz']:>10} "
                         f"{r['density']:>8.4f} {r['sparse_bytes']:>12} {r['dense_bytes']:>12} "
                         f"{num(r['sparse_flops']):>14} {num(r['dense_flops']):>14}")
        t = self.total
        lines.append(f"{'total':<28} {'':<13} {'':<20} {t['nnz']:>10} {t['density']:>8.4f} "
                     f"{t['sparse_bytes']:>12} {t['dense_bytes']:>12} {num(t['sparse_flops']):>14} "
                     f"{num(t['dense_flops']):>14}")
        return "\n".join(lines)


def _bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _positions_per_sample(model: nn.Module, input_size, modules: dict) -> dict[str, int]:
    """Output positions per sample of every Linear/Conv layer (spatial size; leading dims for Linear),
    from one forward pass at batch size 1 with hooks."""
    shapes: dict[str, int] = {}
    handles = []
    for name, m in modules.items():
        def hook(mod, inputs, output, name=name):
            if name not in shapes and torch.is_tensor(output):
                if isinstance(mod, (nn.Conv2d, SparseConv2d)):
                    shapes[name] = int(output.shape[-1] * output.shape[-2])
                else:
                    shapes[name] = int(output.numel() // output.shape[-1])
        handles.append(m.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        p = next(iter(model.parameters()), None)
        x = torch.zeros((1, *input_size), dtype=p.dtype if p is not None else None,
                        device=p.device if p is not None else None)
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    return shapes


def summary(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Summary:
    """Storage and compute of every Linear/Conv2d layer, sparse or dense.

    ``sparse_bytes`` counts what the layer really stores (values, index and
    bias for sparse layers); ``dense_bytes`` what the dense layer would.
    FLOPs are multiply-adds per sample: ``nnz * positions`` (sparse) and
    ``numel * positions`` (dense), positions being the output spatial size of a
    convolution (1 for a Linear on a [batch, features] input). Give
    ``input_size`` (per-sample input shape, e.g. (3, 32, 32)) to run one
    forward pass at batch size 1 (eval mode, no gradient) that measures the
    positions; without it Linear layers assume one position and convolution
    FLOPs are None.
    """
    modules = {name: m for name, m in model.named_modules()
               if isinstance(m, SparseLayer) or type(m) in _DENSE_TO_SPARSE}
    positions: dict[str, int] = {}
    if input_size is not None:
        if isinstance(input_size, int):
            input_size = (input_size,)
        input_size = tuple(input_size)
        if not input_size or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_size):
            raise ValueError(f"summary: input_size must be the per-sample input shape as positive ints, "
                             f"e.g. (3, 32, 32), got {input_size!r}")
        positions = _positions_per_sample(model, input_size, modules)
    out = Summary()
    for name, m in modules.items():
        is_conv = isinstance(m, (nn.Conv2d, SparseConv2d))
        pos = positions.get(name, None if is_conv or input_size is not None else 1)
        if isinstance(m, SparseLayer):
            shape = m.weight_shape
            numel = int(torch.Size(shape).numel())
            nnz = m.nnz
            index = sum(_bytes(t) for t in m.buffers(recurse=False))
            params = _bytes(m.values) + _bytes(m.bias)
            dense = numel * m.values.element_size() + _bytes(m.bias)
            row = dict(name=name, type=type(m).__name__, shape=tuple(shape), numel=numel, nnz=nnz,
                       density=m.density, sparse_bytes=params + index, dense_bytes=dense, param_bytes=params,
                       index_bytes=index)
        else:
            numel = m.weight.numel()
            nnz = numel
            b = _bytes(m.weight) + _bytes(m.bias)
            row = dict(name=name, type=type(m).__name__, shape=tuple(m.weight.shape), numel=numel,
                       nnz=numel, density=1.0, sparse_bytes=b, dense_bytes=b, param_bytes=b, index_bytes=0)
        row["dense_flops"] = None if pos is None else numel * pos
        row["sparse_flops"] = None if pos is None else nnz * pos
        out.rows.append(row)
    return out
