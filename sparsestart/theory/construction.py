"""The constructive proof: an ER source and the subnetwork in it that equals the target.

The construction (Appendix A.3-A.4), as :func:`construct` builds it (index conventions in
:mod:`sparsestart.theory`):

* masks: ``mask_l[a, b] ~ Bernoulli(p_l)`` independently, shape
  ``(n_S,l, n_S,l-1)`` (``(n_S,0, d)`` for layer 0).
* layer 0 (univariate): neuron ``a`` of block ``k`` copies input ``k`` with weight
  1 and bias ``c`` if its ER edge to ``k`` exists. If it does not (only possible
  for ``p_0 < 1``), the neuron is reassigned to an input it *is* connected to,
  the one with the fewest copies so far; a neuron without any ER input edge is
  unused. With ``p_0 = 1`` every input has exactly its block of copies, which is
  the setting of the theorem (its bound does not involve ``p_0``).
* layer ``l >= 1``: every source neuron ``a`` in block ``i`` (a copy of target
  neuron ``i``) gets bias ``b_T^(l)[i]`` and, for every nonzero target weight
  ``W_T^(l)[i, j]``, the full value on *one* available ER edge from the copies
  of ``j`` (the lowest-index one). All copies of ``j`` compute the same value,
  so every copy of ``i`` reproduces the target pre-activation exactly. A pair
  (weight, copy) without any such edge is counted as missing.
* layer-1 bias compensation: copy ``a`` of neuron ``i`` in source layer 1 gets
  bias ``b_T^(1)[i] - c * sum_j W_T^(1)[i, j]``, cancelling the ``+c`` of layer 0.
* the output layer has ``q_L = 1`` (widths[L] = n_L), so ``f_S = f_T`` when
  nothing is missing.

:func:`_univariate_layer` builds layer 0, :func:`_copy_layer` each layer ``l >= 1``; the masks are
sampled layer by layer from one generator.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .bounds import _blocks, required_widths
from .checks import _check_densities, _check_positive_int
from .network import ERSourceNetwork, _parse_target, target_forward


@dataclass
class Construction:
    """Result of :func:`construct`.

    Attributes:
        source: the ER source network (``ERSourceNetwork``; masks = the sampled ER
            masks, weights = the subnetwork of the proof, zero on unused ER edges).
        success: every target weight found an available ER edge for every copy of
            its output neuron (and every input needed by the target has a copy).
            Then ``source`` computes the target exactly on the input domain.
        widths: source widths ``[n_S,0, ..., n_S,L]``.
        densities: ``[p_0, ..., p_L]``.
        subnetwork_masks: the ER edges used by the construction, per source layer.
        diagnostics: one dict per source layer (see :func:`construct`).
        missing: total number of (target weight, copy) pairs without an ER edge.
        input_min: inputs must satisfy ``x_k >= input_min``.
        layer0_bias: the bias ``c = max(0, -input_min)`` of the univariate layer.
    """

    source: ERSourceNetwork
    success: bool
    widths: List[int]
    densities: List[float]
    subnetwork_masks: List[torch.Tensor]
    diagnostics: List[Dict[str, Any]]
    missing: int
    input_min: float
    layer0_bias: float
    target: Any = field(repr=False, default=None)

    def max_error(self, n: int = 2048, seed: int = 0, low: Optional[float] = None,
                  high: float = 1.0) -> float:
        """``max |f_S(x) - f_T(x)|`` over ``n`` uniform inputs in ``[low, high]^d``
        (``low`` defaults to ``input_min``); the target is evaluated in float64, the
        source in its own dtype (float64 by default)."""
        low = self.input_min if low is None else float(low)
        d = self.source.layers[0].in_features
        g = torch.Generator().manual_seed(seed)
        x = low + (high - low) * torch.rand(n, d, generator=g, dtype=torch.float64)
        dt = self.source.layers[0].weight.dtype
        with torch.no_grad():
            ys = self.source(x.to(dt)).to(torch.float64)
            yt = target_forward(self.target, x)
        return float((ys - yt).abs().max())


@dataclass
class _SourceLayer:
    """One source layer as built: ER mask, weight and bias of the subnetwork, diagnostics."""

    mask: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    diagnostics: Dict[str, Any]


def _check_input_min(input_min: Any) -> None:
    if isinstance(input_min, bool) or not isinstance(input_min, numbers.Real) or not math.isfinite(input_min):
        raise ValueError(f"input_min must be a finite number, got {input_min!r}")


def _source_widths(widths: Optional[Sequence[int]], sizes: List[int], ps: List[float], delta: float,
                   nonzeros: List[int]) -> List[int]:
    """``[n_S,0, ..., n_S,L]``: the guaranteed widths when ``widths`` is None, else ``widths`` checked
    (and completed by ``n_S,L = n_L`` when it has ``L`` entries)."""
    L = len(sizes) - 1
    if widths is None:
        return required_widths(sizes, ps, delta, target_nonzeros=nonzeros, include_p0=True)
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"widths must be a list of positive integers, got {widths!r}")
    widths_ = [_check_positive_int(f"widths[{i}]", w) for i, w in enumerate(widths)]
    if len(widths_) == L:
        widths_ = widths_ + [sizes[L]]
    if len(widths_) != L + 1:
        raise ValueError(f"widths must have {L + 1} entries (n_S,0 .. n_S,L) or {L}, "
                         f"got {len(widths_)}: {list(widths)!r}")
    if widths_[L] != sizes[L]:
        raise ValueError(f"widths[{L}] must equal the target's output size {sizes[L]} (q_L = 1), "
                         f"got {widths_[L]}")
    for l in range(L):
        if widths_[l] < sizes[l]:
            raise ValueError(f"widths[{l}] = {widths_[l]} is smaller than the number of target "
                             f"neurons it must copy ({sizes[l]})")
    return widths_


def _mask_generator(seed: Optional[int]) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _er_mask(n_out: int, n_in: int, p: float, gen: torch.Generator) -> np.ndarray:
    """``mask[a, b] ~ Bernoulli(p)`` independently, shape ``(n_out, n_in)``."""
    return (torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) < p).numpy()


def _assign_inputs(m0: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """Input copied by each layer-0 neuron (-1: none), copies per input, reassigned and dead neurons.

    Neuron ``a`` of block ``k`` copies input ``k`` if its ER edge to ``k`` exists; otherwise (only for
    ``p_0 < 1``) the connected input with the fewest copies so far; without any ER input edge it is dead.
    """
    n0, d = m0.shape
    block0 = _blocks(n0, d)
    owner = np.full(n0, -1, dtype=np.int64)
    counts = np.zeros(d, dtype=np.int64)
    direct = m0[np.arange(n0), block0]
    owner[direct] = block0[direct]
    np.add.at(counts, block0[direct], 1)
    reassigned = 0
    dead = 0
    for a in np.flatnonzero(~direct):  # only when p_0 < 1
        avail = np.flatnonzero(m0[a])
        if avail.size == 0:
            dead += 1
            continue
        k = avail[np.argmin(counts[avail])]
        owner[a] = k
        counts[k] += 1
        reassigned += 1
    return owner, counts, reassigned, dead


def _univariate_layer(m0: np.ndarray, c: float) -> Tuple[_SourceLayer, np.ndarray]:
    """Source layer 0: each live neuron computes ``relu(x_k + c)`` of the input ``k`` it copies.
    Also returns that input per neuron (-1 for dead neurons)."""
    n0, d = m0.shape
    owner, counts, reassigned, dead = _assign_inputs(m0)
    w0 = np.zeros((n0, d))
    b0 = np.zeros(n0)
    live = owner >= 0
    w0[np.flatnonzero(live), owner[live]] = 1.0
    b0[live] = c
    diag = {
        "layer": 0, "er_edges": int(m0.sum()), "used_edges": int(live.sum()),
        "min_copies": int(counts.min()), "max_copies": int(counts.max()),
        "dead_neurons": dead, "reassigned": reassigned,
    }
    return _SourceLayer(m0, w0, b0, diag), owner


def _place_weights(W: np.ndarray, m: np.ndarray, prev_owner: np.ndarray,
                   own: np.ndarray) -> Tuple[np.ndarray, int, int]:
    """Source weight putting each target weight ``W[i, j]``, for every copy ``a`` of ``i``
    (``own[a] == i``), on the lowest-index ER edge of row ``a`` from a copy of ``j``
    (``prev_owner == j``); also the number of (weight, copy) pairs placed and missing."""
    Ws = np.zeros(m.shape)
    placed = 0
    missing = 0
    for j in range(W.shape[1]):
        cols = np.flatnonzero(prev_owner == j)  # copies of target neuron j in layer l-1
        need = W[own, j] != 0  # copies a whose target neuron has a weight from j
        if not need.any():
            continue
        if cols.size == 0:
            missing += int(need.sum())
            continue
        sub = m[:, cols]
        has = sub.any(axis=1)
        first = cols[sub.argmax(axis=1)]
        ok = need & has
        rows = np.flatnonzero(ok)
        Ws[rows, first[rows]] = W[own[rows], j]
        placed += int(ok.sum())
        missing += int((need & ~has).sum())
    return Ws, placed, missing


def _copy_layer(l: int, W: np.ndarray, b: np.ndarray, m: np.ndarray, prev_owner: np.ndarray,
                c: float) -> Tuple[_SourceLayer, np.ndarray]:
    """Source layer ``l >= 1``: ``q_l`` copies of each neuron of target layer ``l`` (weight ``W``,
    bias ``b``); layer 1 subtracts ``c * sum_j W[i, j]``, the ``+c`` of layer 0. Also returns the
    target neuron each source neuron copies."""
    own = _blocks(m.shape[0], W.shape[0])  # copy a of target neuron own[a]
    Ws, placed, missing = _place_weights(W, m, prev_owner, own)
    bias = b[own].copy()
    if l == 1:
        bias = bias - c * W.sum(axis=1)[own]
    copies = np.bincount(own, minlength=W.shape[0])
    diag = {
        "layer": l, "er_edges": int(m.sum()), "used_edges": int((Ws != 0).sum()),
        "min_copies": int(copies.min()), "max_copies": int(copies.max()),
        "target_nonzeros": int(np.count_nonzero(W)), "pairs": int((W[own] != 0).sum()),
        "placed": placed, "missing": missing,
    }
    return _SourceLayer(m, Ws, bias, diag), own


def construct(
    target,
    densities: Union[float, Sequence[float]],
    delta: float = 0.1,
    seed: Optional[int] = None,
    widths: Optional[Sequence[int]] = None,
    input_min: float = -1.0,
    dtype: torch.dtype = torch.float64,
) -> Construction:
    """Sample an ER source and build the subnetwork of the proof that equals ``target``.

    Args:
        target: dense (or sparse-valued) target MLP, an ``nn.Sequential`` of
            ``nn.Linear`` and ``nn.ReLU`` (a ReLU after a linear layer is mirrored in
            the source; typically none after the last layer), or a list of
            ``(weight, bias)`` pairs, weight of shape ``(n_out, n_in)``, with ReLU
            between layers and none at the output.
        densities: ``[p_0, ..., p_L]`` ER densities of the ``L + 1`` source layers (or
            one number for all).
        delta: failure probability used to size the source when ``widths`` is None:
            ``widths = required_widths(sizes, densities, delta, target_nonzeros,
            include_p0=True)`` with the target's actual nonzero counts (at ``p_0 = 1``
            exactly the widths of Theorem 2.2; for ``p_0 < 1`` layer 0 is accounted
            for, see :func:`width_factors`). Success then has probability >= 1 - delta.
        seed: seed of the ``torch.Generator`` that samples the masks (None: random).
        widths: source widths ``[n_S,0, ..., n_S,L]`` (``n_S,L`` must equal the target's
            output size) or ``[n_S,0, ..., n_S,L-1]``. Width ``n_S,l`` is split into
            ``n_l`` contiguous blocks of (near-)equal size, block ``i`` holding the
            copies of target neuron ``i`` (of input ``i`` for layer 0); each block
            must be nonempty, i.e. ``n_S,0 >= d`` and ``n_S,l >= n_l``.
        input_min: lower end of the input domain. The construction is exact for
            inputs with every ``x_k >= input_min`` (e.g. ``[-1, 1]^d``, the default):
            layer 0 computes ``relu(x_k + c)`` with ``c = max(0, -input_min)``, which is
            ``x_k + c`` there. The upper end of the domain does not matter.
        dtype: dtype of the source network (float64 for exact checks).

    The construction (Appendix A.3-A.4, step by step in the docstring of
    :mod:`sparsestart.theory.construction`): ER masks, a univariate layer 0 copying the
    inputs, then for each target layer ``l`` its weights placed on one ER edge per
    (weight, copy of the output neuron), so that ``f_S = f_T`` when nothing is missing.

    Returns:
        :class:`Construction`. ``diagnostics[l]`` holds ``er_edges`` (ER mask nonzeros),
        ``used_edges``, ``min_copies``/``max_copies`` of the target neurons (inputs for
        layer 0) represented by this layer; for layer 0 ``dead_neurons`` (no ER input
        edge) and ``reassigned``; for ``l >= 1`` ``target_nonzeros``, ``pairs``
        (= nonzeros x copies to serve), ``placed`` and ``missing``.
    """
    ws, bs, relu_t = _parse_target(target, torch.float64)
    L = len(ws)
    sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    ps = _check_densities(densities, L + 1)
    _check_input_min(input_min)
    nonzeros = [int(torch.count_nonzero(w)) for w in ws]
    widths_ = _source_widths(widths, sizes, ps, delta, nonzeros)
    gen = _mask_generator(seed)
    c = max(0.0, -float(input_min))

    layer0, prev_owner = _univariate_layer(_er_mask(widths_[0], sizes[0], ps[0], gen), c)
    layers = [layer0]
    for l in range(1, L + 1):
        m = _er_mask(widths_[l], widths_[l - 1], ps[l], gen)
        layer, prev_owner = _copy_layer(l, ws[l - 1].numpy(), bs[l - 1].numpy(), m, prev_owner, c)
        layers.append(layer)

    source = ERSourceNetwork(
        [torch.from_numpy(s.weight).to(dtype) for s in layers],
        [torch.from_numpy(s.bias).to(dtype) for s in layers],
        [torch.from_numpy(s.mask) for s in layers],
        [True] + relu_t,
    )
    total_missing = sum(s.diagnostics["missing"] for s in layers[1:])
    return Construction(
        source=source, success=total_missing == 0, widths=list(widths_), densities=ps,
        subnetwork_masks=[torch.from_numpy(s.weight != 0) for s in layers],
        diagnostics=[s.diagnostics for s in layers], missing=total_missing,
        input_min=float(input_min), layer0_bias=c, target=target,
    )
