"""sparsify / densify / summary: convert whole models between dense and sparse layers."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..init.densities import allocate_densities
from ..init.flow import METHODS, repair_flow
from ..init.sampling import check_density
from .modules import SparseConv2d, SparseLayer, SparseLinear, _real_number
from .walk import check_exclude, maskable_layers, module_paths

__all__ = ["sparsify", "densify", "summary", "maskable_layers", "check_exclude", "Summary", "defer_large_weights",
           "LARGE_LAYER_NUMEL"]

_DENSE_TO_SPARSE = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}

#: Weights with more elements than this are never allocated densely inside :func:`defer_large_weights`
#: (what ``sparsestart train`` builds its sparse runs in). 64 Mi elements (256 MiB in float32) is far above
#: every layer of the zoo at its usual sizes (the largest, a ResNet-18 3x3 conv of 512 channels, has 2.4 Mi),
#: so every run that fitted in memory before builds exactly as before, bit for bit; above it the dense
#: weight would cost more memory than the sparse layer made from it by orders of magnitude.
LARGE_LAYER_NUMEL = 64 * 2 ** 20

#: nn.Module's hook tables (and flag) that concern calling the module, not the layout of its parameters:
#: they follow a layer into its replacement as the same dict objects, so the handles returned when the
#: hooks were registered still remove them.
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")
#: Hook tables written against the layer's state-dict keys ("weight"), which the replacement does not have.
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_replaceable(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], params: Sequence[str],
                       where: str) -> None:
    """ValueError for a layer that cannot be replaced without losing something the model says about it:
    a Parameter it shares with another module (tied weights would be untied), a gradient hook on one of its
    Parameters, or a state-dict hook (both written for tensors and keys the replacement does not have)."""
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for m, names in module_paths(model):
        for pname, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((names[0], pname, m))
    for name, m in layers:
        for pname in params:
            p = getattr(m, pname)
            if p is None:
                continue
            others = [(n, a) for n, a, holder in holders.get(id(p), []) if holder is not m]
            if others:
                with_ = ", ".join(f"{n!r} ({a})" for n, a in others)
                raise ValueError(f"{where}: layer {name!r} shares its {pname} Parameter with {with_} (tied weights); "
                                 f"a sparse layer keeps its own compressed values, so replacing {name!r} would untie "
                                 f"them. Keep the tied layers dense with exclude=[{name!r}, ...], or untie them first")
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                raise ValueError(f"{where}: layer {name!r} has a gradient hook on its {pname} Parameter; the "
                                 f"replacement layer has other parameters, so the hook cannot follow. Remove it and "
                                 f"register it on the new layer, or exclude {name!r}")
        state = [h for h in _STATE_HOOKS if getattr(m, h)]
        if state:
            raise ValueError(f"{where}: layer {name!r} has state-dict hooks ({', '.join(state)}) written for its "
                             f"present state-dict keys, which the replacement does not have; remove them or "
                             f"exclude {name!r}")


def _replace(model: nn.Module, paths: Sequence[str], old: nn.Module, new: nn.Module,
             params: Sequence[tuple[str, str]]) -> nn.Module:
    """Put ``new`` at every place ``old`` is registered in ``model``, its ``paths`` (one module stays one module), with
    old's call hooks, train/eval mode and, per (old, new) parameter pair, requires_grad. Returns the
    model, or ``new`` when ``old`` is the model itself."""
    for a, b in params:
        p, q = getattr(old, a), getattr(new, b)
        if p is not None and q is not None:
            q.requires_grad_(p.requires_grad)
    for attr in _CALL_HOOKS:
        setattr(new, attr, getattr(old, attr))
    new.train(old.training)
    if "" in paths:
        return new
    for path in paths:
        _set_submodule(model, path, new)
    return model


def _sparse_from_meta(m: nn.Module, density: float, *, format: str, block_size: Optional[int], seed: Optional[int],
                      exact: bool) -> SparseLayer:
    """The sparse twin of a layer whose weight is on the meta device (it holds no values): built directly,
    in O(nnz) memory, its kept values drawn from torch's default init of the dense layer. A real bias is
    kept; a meta one is drawn as torch draws it. Built on the bias's device, else on the CPU."""
    bias = m.bias
    fresh_bias = bias is not None and bias.is_meta
    device = bias.device if bias is not None and not fresh_bias else torch.device("cpu")
    kw = dict(density=density, format=format, block_size=block_size, exact=exact, seed=seed, device=device,
              dtype=m.weight.dtype)
    if isinstance(m, nn.Linear):
        new = SparseLinear(m.in_features, m.out_features, fresh_bias, **kw)
    else:
        new = SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                           fresh_bias, m.padding_mode, **kw)
    if bias is not None and not fresh_bias:
        new.bias = nn.Parameter(bias.detach().clone())
    return new


class _LargeEmptyOnMeta(TorchFunctionMode):
    """torch.empty of more than ``min_numel`` elements, with no device asked for, lands on the meta device."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
            if all(isinstance(s, int) for s in size) and math.prod(size) > self.min_numel:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextmanager
def defer_large_weights(min_numel: Optional[int] = None) -> Iterator[None]:
    """Build a model to sparsify without allocating its large dense weights.

    Inside the block, every ``torch.empty`` of more than ``min_numel`` elements
    (None: :data:`LARGE_LAYER_NUMEL`) made without a device (what nn.Linear and
    nn.Conv2d create their weights with) is created on the meta device: no
    memory, and its init draws nothing from the RNG. :func:`sparsify` then
    builds such layers sparse directly (see there); everything smaller is
    built, and draws from the RNG, exactly as without the block. A large layer left dense (excluded) must be materialised
    by the caller (``to_empty`` and ``reset_parameters``)::

        with defer_large_weights():
            model = mlp([784, 1_500_000, 10])
        sparsify(model, 0.001)
    """
    if min_numel is None:
        min_numel = LARGE_LAYER_NUMEL
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"defer_large_weights: min_numel must be a non-negative int, got {min_numel!r}")
    with _LargeEmptyOnMeta(min_numel):
        yield


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

    What the model says about a layer is kept: a module registered at several
    places is replaced by one sparse module at all of them (and is excluded
    when ``exclude`` matches any of its names); ``requires_grad`` of the weight
    and bias (a frozen layer stays frozen), forward hooks and pre-hooks, module
    backward hooks and the train/eval mode carry over. A layer sharing a
    Parameter with another module (tied weights), or with a gradient hook on its
    weight or bias, or with state-dict hooks, is refused with a ValueError (the
    replacement cannot honour them); exclude it to keep it dense.

    A layer whose weight is on the meta device (see :func:`defer_large_weights`)
    has no weights to keep: it is built sparse directly, in O(nnz) memory, with
    its kept values drawn from torch's default init of the dense layer
    (U(-1/sqrt(fan_in), 1/sqrt(fan_in))); a custom init applied to the meta
    weight is not seen. Returns ``model``, or the sparse layer when ``model`` is
    itself a Linear/Conv2d.
    """
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
    _check_replaceable(model, layers, ("weight", "bias"), "sparsify")
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
    paths = {id(m): names for m, names in module_paths(model)}
    for i, (name, m) in enumerate(layers):
        layer_seed = None if seed is None else int(seed) * 1_000_003 + i
        if m.weight.is_meta:
            sparse = _sparse_from_meta(m, densities[name], format=format, block_size=block_size, seed=layer_seed,
                                       exact=exact)
        else:
            sparse = _DENSE_TO_SPARSE[type(m)].from_dense(m, density=densities[name], format=format,
                                                          block_size=block_size, seed=layer_seed, exact=exact)
        model = _replace(model, paths[id(m)], m, sparse, (("weight", "values"), ("bias", "bias")))
    if flow is not None:
        model.flow_report = repair_flow(model, flow, keep_budget=True,
                                        seed=None if seed is None else int(seed) + 7_919,
                                        input_shape=options.get("input_shape"))
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replace every SparseLinear/SparseConv2d of ``model`` (in place) by the torch layer with the masked weight.

    As :func:`sparsify` does the other way: a sparse module registered at several places becomes one dense
    module at all of them, and requires_grad, call hooks and the train/eval mode carry over. Returns
    ``model``, or the dense layer when ``model`` is itself a sparse layer.
    """
    paths = [(names, m) for m, names in module_paths(model) if isinstance(m, SparseLayer)]
    _check_replaceable(model, [(names[0], m) for names, m in paths], ("values", "bias"), "densify")
    for names, m in paths:
        model = _replace(model, names, m, m.to_dense(), (("values", "weight"), ("bias", "bias")))
    return model


@dataclass
class Summary:
    """Per-layer storage and compute report; ``str()`` gives a table.

    Each row: name, type, shape, numel, nnz, density, ``sparse_bytes`` (all the
    layer stores: values at full capacity, index, bias), ``dense_bytes`` (what
    the dense layer stores), ``param_bytes`` (values at full capacity plus bias:
    the parameters an optimizer sees), ``index_bytes``, ``weight_bytes_per_nnz`` (values at full
    capacity plus index, per stored weight: what a nonzero really costs; the dense element size
    for a dense layer) and ``index_bytes_per_nnz`` (None when nnz is 0), and ``dense_flops`` /
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
        def per(v):
            return "-" if v is None else f"{v:.1f}"
        head = (f"{'layer':<28} {'type':<13} {'shape':<20} {'nnz':>10} {'density':>8} {'bytes':>12} "
                f"{'dense bytes':>12} {'B/nnz':>6} {'sparse MACs':>14} {'dense MACs':>14}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['name']:<28} {r['type']:<13} {str(r['shape']):<20} {r['nnz']:>10} "
                         f"{r['density']:>8.4f} {r['sparse_bytes']:>12} {r['dense_bytes']:>12} "
                         f"{per(r['weight_bytes_per_nnz']):>6} {num(r['sparse_flops']):>14} {num(r['dense_flops']):>14}")
        t = self.total
        lines.append(f"{'total':<28} {'':<13} {'':<20} {t['nnz']:>10} {t['density']:>8.4f} "
                     f"{t['sparse_bytes']:>12} {t['dense_bytes']:>12} {'':>6} {num(t['sparse_flops']):>14} "
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
                       index_bytes=index,
                       weight_bytes_per_nnz=(_bytes(m.values) + index) / nnz if nnz else None,
                       index_bytes_per_nnz=index / nnz if nnz else None)
        else:
            numel = m.weight.numel()
            nnz = numel
            b = _bytes(m.weight) + _bytes(m.bias)
            row = dict(name=name, type=type(m).__name__, shape=tuple(m.weight.shape), numel=numel,
                       nnz=numel, density=1.0, sparse_bytes=b, dense_bytes=b, param_bytes=b, index_bytes=0,
                       weight_bytes_per_nnz=float(m.weight.element_size()), index_bytes_per_nnz=0.0)
        row["dense_flops"] = None if pos is None else numel * pos
        row["sparse_flops"] = None if pos is None else nnz * pos
        out.rows.append(row)
    return out
