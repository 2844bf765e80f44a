"""Width bounds of Gadhikar, Mukherjee & Burkholz (ICML 2023) and a constructive check.

"Why Random Pruning Is All We Need to Start Sparse" shows that an Erdős–Rényi (ER)
source network, i.e. a network whose weights are kept independently with
probability ``p_l`` in layer ``l``, contains any given target network as a
subnetwork with probability at least ``1 - delta`` once the source is wider than
the target by a factor of order ``log(...) / log(1/(1 - p))``. This module turns
the bounds into numbers and builds the subnetwork of the proof on a sampled mask,
so that the theorem can be checked numerically.

Index conventions (used everywhere in this module)
--------------------------------------------------
Target ``f_T`` (fully connected, depth ``L``): layer sizes
``target_sizes = [d, n_1, ..., n_L]`` (``n_0 = d`` are the inputs). Target layer
``l = 1..L`` has the weight ``W_T^(l)`` of shape ``(n_l, n_{l-1})``, bias
``b_T^(l)`` and ``m_l`` nonzero weights (dense: ``m_l = n_{l-1} * n_l``).

Source ``f_S`` (ER, depth ``L + 1``): source layers ``l = 0..L``.

* source layer 0 maps the ``d`` inputs to ``n_S,0 = q_0 * d`` neurons. In the
  construction it is *univariate*: each neuron copies one input (weight 1 plus a
  bias that keeps the ReLU in its linear range). It has no counterpart in the
  target.
* source layer ``l >= 1`` maps ``n_S,l-1`` to ``n_S,l = q_l * n_l`` neurons and plays
  the role of target layer ``l``: its input neurons are ``q_{l-1}`` copies of each
  target neuron of layer ``l - 1`` (of each input when ``l = 1``), its output
  neurons are ``q_l`` copies of each target neuron of layer ``l``.
* ``densities = [p_0, p_1, ..., p_L]``: ``p_l`` is the ER density of source layer
  ``l`` (one entry per source layer, ``L + 1`` entries).
* ``q_L = 1``: the output layer is not copied.

A target weight ``W_T^(l)[i, j]`` must be realised, for *each* of the ``q_l`` copies
of neuron ``i``, by one ER edge of source layer ``l`` from *some* of the ``q_{l-1}``
copies of ``j``. All ``q_{l-1}`` candidate edges are missing with probability
``(1 - p_l)^{q_{l-1}}``; a union bound over the ``m_l * q_l`` (weight, copy) pairs
of each of the ``L`` layers gives Theorem 2.2:

    q_L = 1,   q_l >= log(L * m_{l+1} * q_{l+1} / delta) / log(1 / (1 - p_{l+1})),
    l = L-1, ..., 0.

So ``q_l`` (the copies *feeding* source layer ``l + 1``) is governed by the density
``p_{l+1}`` of source layer ``l + 1`` and the nonzeros ``m_{l+1}`` of target layer
``l + 1``. ``p_0`` never enters the bound: the theorem takes the univariate layer 0
as given, which an ER layer 0 realises for sure only at ``p_0 = 1``. For ``p_0 < 1``
``include_p0=True`` (an extension, used by :func:`construct` by default) charges
layer 0 as well: the step for ``q_0`` uses the availability ``p_0 * p_1``.
Theorem 2.1 is the case ``L = 2`` (``delta`` split in two):
``q_1 >= log(2 m_2 / delta) / log(1/(1-p_2))``,
``q_0 >= log(2 m_1 q_1 / delta) / log(1/(1-p_1))``.

Two choices of this module go beyond the formulas as printed:

* ``q_l`` is clamped at 1: a neuron needs at least one copy, and ``q_l = 1``
  already satisfies the union bound whenever the formula gives a value <= 1
  (``p_{l+1}`` close to 1; at ``p_{l+1} = 1`` the formula gives 0).
* with ``integer=True`` (used by :func:`required_widths` and :func:`construct`) the
  copies are rounded up *inside* the backward recursion, so ``q_l`` is computed
  from the integer ``q_{l+1}`` actually used. This keeps the union bound, and hence
  the ``1 - delta`` guarantee, exact for the integer widths.
"""
from __future__ import annotations

import csv
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "width_factors",
    "width_factors_conv",
    "required_widths",
    "lower_bound_width",
    "subset_sum_size",
    "success_probability",
    "fig2",
    "write_fig2_csv",
    "plot_fig2",
    "ERSourceNetwork",
    "Construction",
    "construct",
    "target_forward",
]

# Relative slack when rounding a real factor up to whole copies, so that a value
# like 6.000000000000001 (floating-point noise on an exact 6) is not rounded to 7.
_CEIL_RTOL = 1e-12


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def _check_density(name: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {p!r}")
    p = float(p)
    if not (0.0 < p <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {p!r}")
    return p


def _check_delta(delta: Any, name: str = "delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return delta


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_sizes(name: str, sizes: Any, min_len: int = 2) -> List[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {sizes!r}")
    if len(sizes) < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {list(sizes)!r}")
    return [_check_positive_int(f"{name}[{i}]", s) for i, s in enumerate(sizes)]


def _check_densities(densities: Any, n: int) -> List[float]:
    """``n`` densities p_0..p_{n-1}; a single number is broadcast to all layers."""
    if isinstance(densities, numbers.Real) and not isinstance(densities, bool):
        return [_check_density("densities", densities)] * n
    if isinstance(densities, (str, bytes)) or not isinstance(densities, Sequence):
        raise ValueError(f"densities must be a list of numbers in (0, 1], got {densities!r}")
    if len(densities) != n:
        raise ValueError(
            f"densities must have one entry per source layer ({n} = target depth + 1: "
            f"p_0 .. p_{n - 1}), got {len(densities)} entries: {list(densities)!r}"
        )
    return [_check_density(f"densities[{i}]", p) for i, p in enumerate(densities)]


def _check_nonzeros(target_nonzeros: Any, dense: List[int]) -> List[int]:
    if target_nonzeros is None:
        return list(dense)
    if isinstance(target_nonzeros, (str, bytes)) or not isinstance(target_nonzeros, Sequence):
        raise ValueError(f"target_nonzeros must be a list of integers, got {target_nonzeros!r}")
    if len(target_nonzeros) != len(dense):
        raise ValueError(
            f"target_nonzeros must have one entry per target layer ({len(dense)}: m_1 .. m_L), "
            f"got {len(target_nonzeros)} entries: {list(target_nonzeros)!r}"
        )
    out = []
    for i, (m, full) in enumerate(zip(target_nonzeros, dense)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or int(m) < 0:
            raise ValueError(f"target_nonzeros[{i}] must be a nonnegative integer, got {m!r}")
        if int(m) > full:
            raise ValueError(
                f"target_nonzeros[{i}] = {m!r} exceeds the size of target layer {i + 1} ({full})"
            )
        out.append(int(m))
    return out


def _inv_log_sparsity(p: float) -> float:
    """``log(1 / (1 - p))``; ``inf`` at ``p = 1``."""
    return math.inf if p >= 1.0 else -math.log1p(-p)


def _ceil(q: float) -> int:
    return int(math.ceil(q * (1.0 - _CEIL_RTOL)))


def _factors(nonzeros: List[int], densities: List[float], delta: float, integer: bool,
             include_p0: bool = False) -> List[float]:
    """Backward recursion of Theorem 2.2 on ``m_1..m_L`` and ``p_0..p_L``."""
    L = len(nonzeros)
    q: List[float] = [0.0] * (L + 1)
    q[L] = 1.0
    for l in range(L - 1, -1, -1):
        m_next = nonzeros[l]  # m_{l+1}: nonzeros of target layer l+1 (list is 0-based)
        p_next = densities[l + 1]  # density of source layer l+1
        if l == 0 and include_p0:
            # a copy of input j is usable only if its layer-0 edge exists too
            p_next = densities[0] * densities[1]
        if m_next == 0:
            val = 1.0  # nothing to place: a single copy suffices
        else:
            val = math.log(L * m_next * q[l + 1] / delta) / _inv_log_sparsity(p_next)
        val = max(1.0, val)
        q[l] = float(_ceil(val)) if integer else val
    return q


# ---------------------------------------------------------------------------
# bounds
# ---------------------------------------------------------------------------

def width_factors(
    target_sizes: Sequence[int],
    densities: Union[float, Sequence[float]],
    delta: float,
    target_nonzeros: Optional[Sequence[int]] = None,
    integer: bool = False,
    include_p0: bool = False,
) -> List[float]:
    """Width multipliers ``[q_0, ..., q_L]`` of Theorem 2.2 (Theorem 2.1 for ``L = 2``).

    Args:
        target_sizes: ``[d, n_1, ..., n_L]``, the target's input size and layer widths;
            the target has depth ``L = len(target_sizes) - 1``.
        densities: ``[p_0, ..., p_L]``, the ER density of each of the ``L + 1`` source
            layers (source layer 0 is the univariate layer on the inputs; source
            layer ``l >= 1`` realises target layer ``l``). A single number is used for
            every layer.
        delta: allowed failure probability, in (0, 1).
        target_nonzeros: ``[m_1, ..., m_L]``, nonzero weights of each target layer;
            default dense, ``m_l = n_{l-1} * n_l``.
        integer: round each ``q_l`` up to whole copies inside the recursion (the
            integer ``q_{l+1}`` then enters ``q_l``).
        include_p0: extension beyond the paper. The theorem takes the univariate
            source layer 0 as given, so ``p_0`` does not enter. When layer 0 is an ER
            layer too (``p_0 < 1``), a copy of input ``j`` is usable only if its own
            layer-0 edge to ``j`` exists; with ``include_p0=True`` the step for ``q_0``
            uses the availability ``p_0 * p_1`` instead of ``p_1``:
            ``q_0 = log(L m_1 q_1 / delta) / log(1 / (1 - p_0 p_1))``, which restores
            the ``1 - delta`` guarantee for :func:`construct` with ``p_0 < 1``.
            Identical to the theorem at ``p_0 = 1``.

    Returns:
        ``[q_0, ..., q_L]`` with ``q_L = 1`` and, for ``l = L-1 .. 0``,
        ``q_l = max(1, log(L * m_{l+1} * q_{l+1} / delta) / log(1 / (1 - p_{l+1})))``.
        The source widths are ``n_S,0 = q_0 * d`` and ``n_S,l = q_l * n_l``. ``p_0``
        does not enter (it is validated only) unless ``include_p0``.
    """
    sizes = _check_sizes("target_sizes", target_sizes)
    L = len(sizes) - 1
    ps = _check_densities(densities, L + 1)
    delta = _check_delta(delta)
    dense = [sizes[l - 1] * sizes[l] for l in range(1, L + 1)]
    ms = _check_nonzeros(target_nonzeros, dense)
    return _factors(ms, ps, delta, integer, include_p0)


def width_factors_conv(
    channels: Sequence[int],
    kernel_sizes: Sequence[Union[int, Sequence[int]]],
    densities: Union[float, Sequence[float]],
    delta: float,
    target_nonzeros: Optional[Sequence[int]] = None,
    integer: bool = False,
    include_p0: bool = False,
) -> List[float]:
    """Channel multipliers ``[q_0, ..., q_L]`` for a convolutional target (Theorem A.5).

    The same recursion as :func:`width_factors` with channels in place of neurons:
    ``channels = [c_0, c_1, ..., c_L]`` (``c_0`` input channels), target layer ``l``
    has a weight of shape ``(c_l, c_{l-1}, *kernel_sizes[l-1])`` and
    ``m_l = c_l * c_{l-1} * k_l`` nonzeros (``k_l`` the number of kernel positions,
    the product of the kernel size) unless ``target_nonzeros`` is given. A target
    weight ``W[i, j, k]`` needs, for every copy of output channel ``i``, an ER edge at
    kernel position ``k`` from some copy of input channel ``j``.
    ``kernel_sizes`` has ``L`` entries (ints or tuples); ``densities`` has ``L + 1``
    (``p_0`` of the univariate source layer 0, then one per target layer).
    Source channel counts are ``q_0 * c_0`` and ``q_l * c_l``. ``include_p0`` as in
    :func:`width_factors` (a copy of an input channel uses one fixed kernel position
    of source layer 0).
    """
    chans = _check_sizes("channels", channels)
    L = len(chans) - 1
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence):
        raise ValueError(f"kernel_sizes must be a list with one entry per target layer, got {kernel_sizes!r}")
    if len(kernel_sizes) != L:
        raise ValueError(
            f"kernel_sizes must have one entry per target layer ({L}), "
            f"got {len(kernel_sizes)} entries: {list(kernel_sizes)!r}"
        )
    ks = []
    for i, k in enumerate(kernel_sizes):
        if isinstance(k, Sequence) and not isinstance(k, (str, bytes)):
            ks.append(int(np.prod([_check_positive_int(f"kernel_sizes[{i}]", kk) for kk in k])))
        else:
            ks.append(_check_positive_int(f"kernel_sizes[{i}]", k))
    ps = _check_densities(densities, L + 1)
    delta = _check_delta(delta)
    dense = [chans[l - 1] * chans[l] * ks[l - 1] for l in range(1, L + 1)]
    ms = _check_nonzeros(target_nonzeros, dense)
    return _factors(ms, ps, delta, integer, include_p0)


def required_widths(
    target_sizes: Sequence[int],
    densities: Union[float, Sequence[float]],
    delta: float,
    target_nonzeros: Optional[Sequence[int]] = None,
    kernel_sizes: Optional[Sequence[Union[int, Sequence[int]]]] = None,
    include_p0: bool = False,
) -> List[int]:
    """Integer source widths ``[n_S,0, ..., n_S,L]`` that carry the ``1 - delta`` guarantee.

    ``n_S,0 = q_0 * d`` and ``n_S,l = q_l * n_l`` with whole numbers of copies ``q_l``
    (the factors of :func:`width_factors` with ``integer=True``: rounded up inside
    the recursion), so ``n_S,L = n_L``. With ``kernel_sizes`` the target is
    convolutional, ``target_sizes`` are channel counts and the result is source
    channel counts (:func:`width_factors_conv`). ``include_p0``: see
    :func:`width_factors`.
    """
    if kernel_sizes is None:
        q = width_factors(target_sizes, densities, delta, target_nonzeros, integer=True,
                          include_p0=include_p0)
    else:
        q = width_factors_conv(target_sizes, kernel_sizes, densities, delta, target_nonzeros,
                               integer=True, include_p0=include_p0)
    return [int(qq) * int(n) for qq, n in zip(q, target_sizes)]


def lower_bound_width(d_in: int, density: float, delta: float) -> float:
    """Theorem 2.3: width a one-hidden-layer ER source needs (lower bound).

    For a univariate-per-input target on ``d_in`` inputs, every input must be
    connected to the hidden layer: with ``n`` hidden neurons this holds with
    probability ``(1 - (1 - p)^n)^d``, which is at least ``1 - delta`` only if

        n_S,1 >= log(1 / (1 - (1 - delta)^(1/d))) / log(1 / (1 - p)).

    Returns the real-valued right-hand side (0 at ``density = 1``).
    """
    d = _check_positive_int("d_in", d_in)
    p = _check_density("density", density)
    delta = _check_delta(delta)
    # 1 - (1 - delta)^(1/d), computed without cancellation
    tail = -math.expm1(math.log1p(-delta) / d)
    return math.log(1.0 / tail) / _inv_log_sparsity(p)


def subset_sum_size(density: float, delta: float, eps: float, C: float = 1.0) -> float:
    """Lemma 2.4: subset-sum size with Bernoulli(``density``) available variables.

    ``n >= C / log(1 / (1 - p)) * log(1 / min(delta, eps))`` random variables suffice to
    approximate every target value in the range up to ``eps`` with probability
    ``1 - delta``. The paper leaves the constant ``C`` unspecified; it is a
    parameter here (default 1). Returns the real-valued bound (0 at ``density = 1``).
    """
    p = _check_density("density", density)
    delta = _check_delta(delta)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (float(eps) > 0.0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not (float(C) > 0.0) or math.isinf(C):
        raise ValueError(f"C must be a positive finite number, got {C!r}")
    return float(C) / _inv_log_sparsity(p) * math.log(1.0 / min(delta, float(eps)))


def success_probability(
    target_sizes: Sequence[int],
    densities: Union[float, Sequence[float]],
    widths: Sequence[int],
    target_nonzeros: Optional[Sequence[int]] = None,
) -> float:
    """Exact probability that :func:`construct` succeeds when layer 0 is univariate.

    With ``p_0 = 1`` (the setting of the theorem) the events "(target weight
    ``(i, j)`` of layer ``l``, copy ``a`` of ``i``) finds an ER edge" involve disjoint
    sets of mask entries (row ``a`` of source layer ``l``, the columns of the copies
    of ``j``), so they are independent and

        P(success) = prod_l prod_{(i, j, a)} (1 - (1 - p_l)^{|copies of j|}).

    The union bound of Theorem 2.2 is ``P(success) >= 1 - sum_l m_l q_l (1-p_l)^{q_{l-1}}``.
    ``p_0`` is ignored. Widths are split into blocks as in :func:`construct`. With
    ``target_nonzeros`` (sparse target) every width must be a multiple of its
    target size (equal block sizes).
    """
    sizes = _check_sizes("target_sizes", target_sizes)
    L = len(sizes) - 1
    ps = _check_densities(densities, L + 1)
    ws = _check_sizes("widths", widths)
    if len(ws) != L + 1:
        raise ValueError(f"widths must have {L + 1} entries (n_S,0 .. n_S,L), got {len(ws)}: {list(widths)!r}")
    for l in range(L + 1):
        if ws[l] < sizes[l]:
            raise ValueError(f"widths[{l}] = {ws[l]} is smaller than target_sizes[{l}] = {sizes[l]}")
    if ws[L] != sizes[L]:
        raise ValueError(f"widths[{L}] must equal the target's output size {sizes[L]}, got {ws[L]}")
    dense = [sizes[l - 1] * sizes[l] for l in range(1, L + 1)]
    ms = None if target_nonzeros is None else _check_nonzeros(target_nonzeros, dense)
    log_p = 0.0
    for l in range(1, L + 1):
        fail = lambda c: (1.0 - ps[l]) ** c  # noqa: E731  all c candidate edges missing
        if ms is None:
            c_in = np.bincount(_blocks(ws[l - 1], sizes[l - 1]))  # copies of each j
            n_copies_out = ws[l]  # sum over i of the copies of i
            log_p += n_copies_out * float(np.sum(np.log1p(-np.array([fail(c) for c in c_in]))))
        else:
            if ws[l] % sizes[l] or ws[l - 1] % sizes[l - 1]:
                raise ValueError("with target_nonzeros every widths[l] must be a multiple of target_sizes[l]")
            c_in, c_out = ws[l - 1] // sizes[l - 1], ws[l] // sizes[l]
            log_p += ms[l - 1] * c_out * math.log1p(-fail(c_in))
    return math.exp(log_p)


# ---------------------------------------------------------------------------
# Figure 2
# ---------------------------------------------------------------------------

FIG2_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95,
                   0.96, 0.97, 0.98, 0.99)
FIG2_COLUMNS = ("sparsity", "density", "q1", "width", "width_int")


def fig2(
    sparsities: Optional[Sequence[float]] = None,
    delta: float = 0.001,
    hidden: int = 128,
    outputs: int = 10,
    inputs: int = 784,
) -> List[Dict[str, float]]:
    """Rows of Figure 2: required width of source layer 1 against sparsity.

    Target: ``inputs -> hidden -> outputs`` (depth ``L = 2``), dense; the ER source
    has the same density ``p = 1 - sparsity`` in every layer. By Theorem 2.1
    ``q_1 = max(1, log(2 * hidden * outputs / delta) / log(1 / sparsity))``, which
    depends on neither ``inputs`` nor ``p_0, p_1``. Each row has

    * ``sparsity``, ``density``;
    * ``q1``: the real factor;
    * ``width``: ``q1 * hidden`` (the curve of the figure);
    * ``width_int``: ``ceil(q1) * hidden``, whole copies as :func:`required_widths`.
    """
    if sparsities is None:
        sparsities = FIG2_SPARSITIES
    hidden = _check_positive_int("hidden", hidden)
    outputs = _check_positive_int("outputs", outputs)
    inputs = _check_positive_int("inputs", inputs)
    rows = []
    for i, s in enumerate(sparsities):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (0.0 <= float(s) < 1.0):
            raise ValueError(f"sparsities[{i}] must be in [0, 1), got {s!r}")
        p = 1.0 - float(s)
        q = width_factors([inputs, hidden, outputs], [p, p, p], delta)
        qi = width_factors([inputs, hidden, outputs], [p, p, p], delta, integer=True)
        rows.append({
            "sparsity": float(s),
            "density": p,
            "q1": q[1],
            "width": q[1] * hidden,
            "width_int": int(qi[1]) * hidden,
        })
    return rows


def write_fig2_csv(rows: Sequence[Dict[str, float]], path) -> None:
    """Write the rows of :func:`fig2` as CSV with header ``FIG2_COLUMNS``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIG2_COLUMNS)
        for r in rows:
            w.writerow([
                f"{r['sparsity']:.6g}", f"{r['density']:.6g}", f"{r['q1']:.6f}",
                f"{r['width']:.3f}", str(int(r["width_int"])),
            ])


def plot_fig2(rows: Sequence[Dict[str, float]], path, delta: float = 0.001,
              hidden: int = 128, outputs: int = 10) -> None:
    """Plot the rows of :func:`fig2` to ``path`` (PNG; matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(s, [r["width"] for r in rows], "o-", ms=4, label=r"$q_1 \cdot n_{T,1}$ (Thm 2.1)")
    ax.plot(s, [r["width_int"] for r in rows], "x", ms=5,
            label=r"$\lceil q_1\rceil \cdot n_{T,1}$ (whole copies)")
    ax.axhline(hidden, color="gray", lw=0.8, ls=":", label=f"target width {hidden}")
    ax.set_xlabel("sparsity $1 - p$")
    ax.set_ylabel("required width of source layer 1")
    ax.set_title(f"target {hidden}-{outputs}, $\\delta$ = {delta:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------
# the construction of the proof (Appendix A.3-A.4)
# ---------------------------------------------------------------------------

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


def _parse_target(target, dtype) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[bool]]:
    """Weights ``(n_l, n_{l-1})``, biases and ReLU flags of target layers 1..L."""
    weights: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    relu: List[bool] = []
    if isinstance(target, nn.Module):
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
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
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
            relu[-1] = False  # (weight, bias) lists: ReLU between layers, none at the output
    else:
        raise ValueError(
            f"target must be an nn.Sequential of nn.Linear/nn.ReLU or a list of (weight, bias), "
            f"got {type(target).__name__}"
        )
    if not weights:
        raise ValueError("target has no linear layer")
    for l in range(len(weights)):
        if biases[l].shape[0] != weights[l].shape[0]:
            raise ValueError(f"target layer {l + 1}: bias has {biases[l].shape[0]} entries, "
                             f"weight has {weights[l].shape[0]} rows")
        if l > 0 and weights[l].shape[1] != weights[l - 1].shape[0]:
            raise ValueError(f"target layer {l + 1} expects {weights[l].shape[1]} inputs, "
                             f"layer {l} has {weights[l - 1].shape[0]} outputs")
    return weights, biases, relu


def target_forward(target, x: torch.Tensor) -> torch.Tensor:
    """Evaluate a target given as :func:`construct` accepts it (in ``x.dtype``)."""
    ws, bs, relu = _parse_target(target, x.dtype)
    for w, b, r in zip(ws, bs, relu):
        x = F.linear(x, w, b)
        if r:
            x = F.relu(x)
    return x


def _blocks(width: int, n: int) -> np.ndarray:
    """Owner (target neuron) of each of ``width`` source neurons: ``n`` contiguous
    blocks of sizes as equal as possible (``width // n`` or one more)."""
    base, extra = divmod(width, n)
    sizes = np.full(n, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.repeat(np.arange(n), sizes)


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

    The construction (Appendix A.3-A.4):

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
    if isinstance(input_min, bool) or not isinstance(input_min, numbers.Real) or not math.isfinite(input_min):
        raise ValueError(f"input_min must be a finite number, got {input_min!r}")
    nonzeros = [int(torch.count_nonzero(w)) for w in ws]

    if widths is None:
        widths_ = required_widths(sizes, ps, delta, target_nonzeros=nonzeros, include_p0=True)
    else:
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

    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))

    c = max(0.0, -float(input_min))
    masks: List[torch.Tensor] = []
    weights: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    used: List[torch.Tensor] = []
    diags: List[Dict[str, Any]] = []

    # ---- source layer 0: univariate copies of the inputs ---------------------
    d, n0 = sizes[0], widths_[0]
    m0 = (torch.rand(n0, d, generator=gen, dtype=torch.float64) < ps[0]).numpy()
    block0 = _blocks(n0, d)
    owner = np.full(n0, -1, dtype=np.int64)  # input copied by each layer-0 neuron
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
    w0 = np.zeros((n0, d))
    b0 = np.zeros(n0)
    live = owner >= 0
    w0[np.flatnonzero(live), owner[live]] = 1.0
    b0[live] = c
    masks.append(torch.from_numpy(m0))
    weights.append(torch.from_numpy(w0))
    biases.append(torch.from_numpy(b0))
    used.append(torch.from_numpy(w0 != 0))
    diags.append({
        "layer": 0, "er_edges": int(m0.sum()), "used_edges": int(live.sum()),
        "min_copies": int(counts.min()), "max_copies": int(counts.max()),
        "dead_neurons": dead, "reassigned": reassigned,
    })
    prev_owner = owner  # target neuron (here: input) copied by each source neuron of the previous layer

    # ---- source layers 1..L ---------------------------------------------------
    total_missing = 0
    for l in range(1, L + 1):
        W = ws[l - 1].numpy()
        b = bs[l - 1].numpy()
        n_in, n_out = widths_[l - 1], widths_[l]
        m = (torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) < ps[l]).numpy()
        own = _blocks(n_out, sizes[l])  # copy a of target neuron own[a]
        Ws = np.zeros((n_out, n_in))
        placed = 0
        missing = 0
        for j in range(sizes[l - 1]):
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
        bias = b[own].copy()
        if l == 1:
            bias = bias - c * W.sum(axis=1)[own]
        total_missing += missing
        copies = np.bincount(own, minlength=sizes[l])
        masks.append(torch.from_numpy(m))
        weights.append(torch.from_numpy(Ws))
        biases.append(torch.from_numpy(bias))
        used.append(torch.from_numpy(Ws != 0))
        diags.append({
            "layer": l, "er_edges": int(m.sum()), "used_edges": int((Ws != 0).sum()),
            "min_copies": int(copies.min()), "max_copies": int(copies.max()),
            "target_nonzeros": nonzeros[l - 1], "pairs": int((W[own] != 0).sum()),
            "placed": placed, "missing": missing,
        })
        prev_owner = own

    source = ERSourceNetwork(
        [w.to(dtype) for w in weights], [bb.to(dtype) for bb in biases], masks,
        [True] + relu_t,
    )
    return Construction(
        source=source, success=total_missing == 0, widths=list(widths_), densities=ps,
        subnetwork_masks=used, diagnostics=diags, missing=total_missing,
        input_min=float(input_min), layer0_bias=c, target=target,
    )
