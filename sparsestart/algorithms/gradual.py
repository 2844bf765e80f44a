"""Gradual magnitude pruning with regrowth (GraNet, Liu et al. 2021), from an ER start.

From the initial overall density d_i (the model's density when the algorithm is
built) to ``final_density`` d_f with the cubic schedule

    d_t = d_f + (d_i - d_f) * (1 - (t - t_0) / (t_1 - t_0))^3,   t_0 <= t <= t_1,

(t_1 - t_0 = n ΔT in GraNet's notation). At every update step (multiples of
``update_every``) from t_0 on: prune globally by magnitude to d_t (until d_f is
reached), then, until ``t_end``, drop and regrow per layer as RigL (gradient
growth) or SET (``growth="random"``) with the cosine-decayed fraction alpha_t.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import check_density_arg, check_fraction, check_positive_int
from .gradient import DEFAULT_MAX_CHUNK_ELEMENTS
from .rigl import _Rewiring
from .structure import entry_magnitude, prune, smallest_global

__all__ = ["Gradual"]


class Gradual(_Rewiring):
    """GraNet-style gradual pruning to ``final_density`` plus RigL-style drop/regrow.

    Arguments: ``final_density`` (d_f, at most the current overall density),
    ``total_steps`` (T), ``update_every`` (ΔT), ``prune_start``/``prune_end``
    (t_0 and t_1 as fractions of T, default 0 and 0.5), ``drop_fraction`` (α of the
    regrowth, in [0, 1); 0 turns regrowth off: plain gradual magnitude pruning),
    ``t_end`` (fraction of T at which regrowth stops, default 0.75), ``growth``
    ("gradient" or "random"), ``seed`` (random growth), ``min_keep`` (entries
    every layer keeps in global pruning, default 1, so no layer empties).
    """

    name = "gradual"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, final_density: float = 0.01, *,
                 total_steps: int, update_every: int = 100, prune_start: float = 0.0, prune_end: float = 0.5,
                 drop_fraction: float = 0.3, t_end: float = 0.75, growth: str = "gradient",
                 seed: Optional[int] = None, min_keep: int = 1,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS):
        super().__init__(model, optimizer, total_steps=total_steps, update_every=update_every,
                         drop_fraction=drop_fraction, t_end=t_end, growth=growth, seed=seed,
                         max_chunk_elements=max_chunk_elements, allow_zero_drop=True)
        try:
            self.final_density = check_density_arg("final_density", final_density)
            self.initial_density = self.density
            if self.final_density > self.initial_density:
                raise ValueError(f"final_density must not exceed the model's current density "
                                 f"{self.initial_density:.6g}, got {final_density!r}")
            self.prune_start = check_fraction("prune_start", prune_start, low_open=False)
            self.prune_end = check_fraction("prune_end", prune_end, high_open=False)
            if self.prune_end <= self.prune_start:
                raise ValueError(f"prune_end must be greater than prune_start={prune_start!r}, got {prune_end!r}")
            self.min_keep = check_positive_int("min_keep", min_keep)
        except Exception:
            self.remove()  # the gradient hooks are already on the model
            raise
        self.start_step = int(self.prune_start * self.total_steps)
        self.stop_step = max(self.start_step + 1, int(self.prune_end * self.total_steps))

    # ------------------------------------------------------------ schedule
    def density_at(self, t: int) -> float:
        """The scheduled overall density d_t (d_i before t_0, d_f from t_1 on)."""
        progress = min(1.0, max(0.0, (t - self.start_step) / (self.stop_step - self.start_step)))
        return self.final_density + (self.initial_density - self.final_density) * (1 - progress) ** 3

    def target_nnz(self, t: int) -> int:
        return round(self.density_at(t) * self.numel)

    def _prune_due(self, t: int) -> bool:
        return t > 0 and t % self.update_every == 0 and t >= self.start_step and self.nnz > self.target_nnz(t)

    def _update(self, t: int) -> None:
        if self._prune_due(t):
            self._prune_global(t)
        if self._rewire_due(t):
            self._rewire_all(t)

    def _prune_global(self, t: int) -> None:
        names = list(self.layers)
        matrices = [self.layers[n].sparse_weight for n in names]
        scores = [entry_magnitude(m, reduce="mean") for m in matrices]
        sizes = [m.block_size ** 2 for m in matrices]
        drops = smallest_global(scores, sizes, self.nnz - self.target_nnz(t), self.min_keep)
        for name, positions in zip(names, drops):
            if positions.numel():
                prune(self.layers[name], positions, self.optimizer)
                self._record(t, name, positions.numel(), 0, event="prune", target_density=self.density_at(t))

    # ------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        state = super()._extra_state()
        state["initial_density"] = self.initial_density
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.initial_density = float(state["initial_density"])
