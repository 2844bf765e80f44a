"""RigL (Evci et al. 2020) and SET (Mocanu et al. 2018): drop the weakest weights, grow as many new ones.

Every ``update_every`` steps until ``t_end * total_steps``, in every sparse
layer: drop the k = ceil(alpha_t * nnz) stored entries of smallest |w| and grow
k absent positions, chosen by largest |dense gradient| (RigL) or uniformly at
random (SET), with alpha_t = alpha / 2 * (1 + cos(pi * t / T_end)). Candidates
for growth are all positions not kept after the drop, so a position dropped in
this update may be regrown; such a position simply stays (value, slot and
optimizer state unchanged), as in RigL's reference code (``reinit_when_same``
False). Every other grown entry starts at 0 with zeroed optimizer state. nnz
per layer stays constant. BSR layers act on blocks (score = sum of |.| over the
block).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..nn.modules import SparseLayer
from .base import SparseAlgorithm, check_fraction, check_positive_int, new_generator
from .gradient import DEFAULT_MAX_CHUNK_ELEMENTS, GradientCapture, topk_absent_gradient
from .structure import entry_magnitude, rewire_keys, sample_absent, smallest

__all__ = ["RigL", "SET"]

_GROWTH = ("gradient", "random")


class _Rewiring(SparseAlgorithm):
    """Drop by magnitude and regrow (by gradient or at random) every ``update_every`` steps until ``t_end``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int, update_every: int,
                 drop_fraction: float, t_end: float, growth: str, seed: Optional[int], max_chunk_elements: int,
                 allow_zero_drop: bool = False):
        super().__init__(model, optimizer)
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.update_every = check_positive_int("update_every", update_every)
        self.drop_fraction = check_fraction("drop_fraction", drop_fraction, low_open=not allow_zero_drop)
        self.t_end = check_fraction("t_end", t_end, high_open=False)
        if growth not in _GROWTH:
            raise ValueError(f"growth must be one of {_GROWTH}, got {growth!r}")
        self.growth = growth
        self.max_chunk_elements = check_positive_int("max_chunk_elements", max_chunk_elements)
        self.end_step = int(self.t_end * self.total_steps)
        self.generator, self.seed = new_generator(seed)
        self._capture: Optional[GradientCapture] = None
        if growth == "gradient":
            self._capture = GradientCapture(self.layers, lambda: self._capture_due(self.step_count + 1))
            self._removers.append(self._capture.remove)

    # ------------------------------------------------------------ schedule
    def _rewire_due(self, t: int) -> bool:
        return self.drop_fraction > 0 and t % self.update_every == 0 and 0 < t < self.end_step

    def _capture_due(self, t: int) -> bool:
        return self._rewire_due(t)

    def drop_fraction_at(self, t: int) -> float:
        """alpha_t = alpha / 2 * (1 + cos(pi * t / T_end)); 0 from T_end on."""
        if t >= self.end_step:
            return 0.0
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * t / self.end_step))

    def _step(self, t: int) -> None:
        try:
            self._update(t)
        finally:
            if self._capture is not None:
                self._capture.clear()

    def _update(self, t: int) -> None:
        if self._rewire_due(t):
            self._rewire_all(t)

    def _rewire_all(self, t: int) -> None:
        fraction = self.drop_fraction_at(t)
        for name, layer in self.layers.items():
            self._rewire_layer(t, name, layer, fraction)

    # ------------------------------------------------------------ one layer
    def _rewire_layer(self, t: int, name: str, layer: SparseLayer, fraction: float) -> None:
        matrix = layer.sparse_weight
        nnz = matrix.nnz
        # The epsilon keeps a product like 0.3 * 10 = 3.0000000000000004 from rounding up to 4.
        k = min(nnz, math.ceil(fraction * nnz - 1e-9))
        if k <= 0:
            return
        if self.growth == "gradient" and not self._capture.pairs[name]:
            warnings.warn(f"{type(self).__name__}: no gradient was captured for layer {name!r} at step {t} (was it "
                          f"used in the forward pass with gradients enabled?); its structure is left unchanged",
                          RuntimeWarning, stacklevel=4)
            return
        R, Q = matrix.grid
        if nnz >= R * Q:
            # Nothing is absent: every dropped position would be the only candidate to grow, so the
            # update would regrow exactly what it dropped and leave the layer as it is.
            return
        drop_pos = smallest(entry_magnitude(matrix), k)
        keep = torch.ones(nnz, dtype=torch.bool, device=drop_pos.device).index_fill_(0, drop_pos, False)
        kept_keys = matrix.keys(keep)
        if self.growth == "gradient":
            grow_keys = topk_absent_gradient(layer, self._capture.pairs[name], k, kept_keys, self.max_chunk_elements,
                                             sync=self.sync)
        else:
            grow_keys = sample_absent(kept_keys, R * Q, k, self.generator).to(kept_keys.device)
        # One index rewrite: a grown key of a dropped entry keeps that entry (regrown), the rest are
        # dropped or new (drop_pos and both key lists are ascending, as smallest/top-k return them).
        freed, new = rewire_keys(layer, drop_pos, grow_keys, self.optimizer)
        self._record(t, name, freed.numel(), new.numel(), event="rewire", k=k, regrown=k - freed.numel())

    # ------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, wherever the state was loaded


class RigL(_Rewiring):
    """RigL: drop the smallest |w|, grow the absent positions of largest |dense gradient|.

    Arguments: ``total_steps`` (training length T), ``update_every`` (ΔT,
    default 100), ``drop_fraction`` (α in (0, 1), default 0.3), ``t_end``
    (fraction of T after which the structure is fixed, default 0.75),
    ``max_chunk_elements`` (bound on the gradient rows formed at once).

    The dense gradient is captured by forward hooks only for the forward and
    backward pass right before an update step, and formed in row chunks with a
    running top-k.
    """

    name = "rigl"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, update_every: int = 100,
                 drop_fraction: float = 0.3, t_end: float = 0.75, *,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS):
        super().__init__(model, optimizer, total_steps=total_steps, update_every=update_every,
                         drop_fraction=drop_fraction, t_end=t_end, growth="gradient", seed=0,
                         max_chunk_elements=max_chunk_elements)


class SET(_Rewiring):
    """SET: drop the smallest |w|, grow uniformly random absent positions.

    Arguments as :class:`RigL` plus ``seed`` of the algorithm's own generator
    (None: drawn from torch's global RNG); its state is part of ``state_dict()``.
    """

    name = "set"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, update_every: int = 100,
                 drop_fraction: float = 0.3, t_end: float = 0.75, *, seed: Optional[int] = None):
        super().__init__(model, optimizer, total_steps=total_steps, update_every=update_every,
                         drop_fraction=drop_fraction, t_end=t_end, growth="random", seed=seed,
                         max_chunk_elements=DEFAULT_MAX_CHUNK_ELEMENTS)
