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

Layout
------
:mod:`.bounds` (the formulas), :mod:`.construction` (the proof's subnetwork),
:mod:`.network` (the ER source network and target parsing), :mod:`.figure2`
(Figure 2) and :mod:`.checks` (argument checks); every public name is
importable from ``sparsestart.theory``.
"""
from __future__ import annotations

from .bounds import (lower_bound_width, required_widths, subset_sum_size, success_probability, width_factors,
                     width_factors_conv)
from .construction import Construction, construct
from .figure2 import FIG2_COLUMNS, FIG2_SPARSITIES, fig2, plot_fig2, write_fig2_csv  # noqa: F401  (constants too)
from .network import ERSourceNetwork, target_forward

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
