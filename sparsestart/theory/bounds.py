"""The width bounds: Theorems 2.1-2.3 and Lemma 2.4 of Gadhikar et al. as numbers.

See :mod:`sparsestart.theory` for the index conventions.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import numpy as np

from .checks import _check_delta, _check_densities, _check_density, _check_nonzeros, _check_positive_int, _check_sizes

# Relative slack when rounding a real factor up to whole copies, so that a value
# like 6.000000000000001 (floating-point noise on an exact 6) is not rounded to 7.
_CEIL_RTOL = 1e-12


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


def _blocks(width: int, n: int) -> np.ndarray:
    """Owner (target neuron) of each of ``width`` source neurons: ``n`` contiguous
    blocks of sizes as equal as possible (``width // n`` or one more)."""
    base, extra = divmod(width, n)
    sizes = np.full(n, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.repeat(np.arange(n), sizes)
