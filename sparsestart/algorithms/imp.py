"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019) inside an ER start (Gadhikar et al. §3).

The trainer trains a level, then calls ``prune_and_rewind()``: the smallest-|w|
``prune_fraction`` of the remaining weights go, globally across layers
(level k keeps round(nnz_0 * (1 - p)^k) weights, never fewer than
``final_density`` allows); the survivors are rewound to their values at
``rewind_step`` and the optimizer state is reset. Entries only ever leave the
structure, so the rewind snapshot is one copy of every layer's value slots
(slots do not move) taken when the rewind step is reached.

A level whose target lies within ``merge_tolerance`` (default 0.5%) of the
final budget is not a level of its own: the level before it prunes straight to
the final density (otherwise, e.g. ERK 0.1 -> 0.064 on a small convnet, a third
level would prune a single weight and cost a whole training phase).

The rewind point is explicit: ``rewind_step=0`` is the initialisation (snapshot
taken when the algorithm is built), ``rewind_step=k`` the values after k
optimizer steps ("late rewinding"). The released code of Gadhikar et al.
(STR/main.py) has a learning-rate warm-up that defaults to 10 epochs and cannot
be switched off except through ``--warmup-epochs``; its released IMP commands
(run_imp.py, README) pass ``--warmup-epochs 0``, so those runs rewind to the
true initialisation. Only a run that omits the flag would, in effect, rewind to
the end of a 10-epoch warm-up.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .base import SparseAlgorithm, check_density_arg, check_fraction, check_nonnegative_int, check_positive_int
from .structure import entry_magnitude, prune, smallest_global

__all__ = ["IMP"]


class IMP(SparseAlgorithm):
    """Iterative magnitude pruning with rewinding, one ``prune_and_rewind()`` per level.

    Arguments: ``final_density`` (overall target, at most the current density),
    ``prune_fraction`` (p in (0, 1), default 0.2: the share of the remaining
    weights pruned per level), ``rewind_step`` (optimizer steps after which the
    rewind snapshot is taken; 0 = initialisation), ``rewind_dense`` (also rewind
    every other parameter and buffer of the model — biases, normalisation
    layers — as the lottery-ticket procedure does; default True),
    ``reset_optimizer`` (clear the optimizer state at every rewind, default True),
    ``min_keep`` (entries every layer keeps, default 1), ``merge_tolerance``
    (a level whose target is within this relative distance of the final
    budget, nnz <= final * (1 + tol), is merged into the final level; default
    0.005; 0 merges only exact ties), ``on_level_end``
    (callables ``fn(algo)`` run after every prune-and-rewind, e.g. to restart the
    learning-rate schedule of the next level).

    ``levels`` is the number of prune-and-rewind calls that reach the final
    density; ``level`` counts the calls so far; ``done`` tells whether the final
    density has been reached (further calls then change nothing).
    """

    name = "imp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, final_density: float = 0.01,
                 prune_fraction: float = 0.2, rewind_step: int = 0, *, rewind_dense: bool = True,
                 reset_optimizer: bool = True, min_keep: int = 1, merge_tolerance: float = 0.005,
                 on_level_end: Optional[Iterable[Callable[["IMP"], Any]]] = None):
        super().__init__(model, optimizer)
        self.final_density = check_density_arg("final_density", final_density)
        self.initial_density = self.density
        if self.final_density > self.initial_density:
            raise ValueError(f"final_density must not exceed the model's current density "
                             f"{self.initial_density:.6g}, got {final_density!r}")
        self.prune_fraction = check_fraction("prune_fraction", prune_fraction)
        self.rewind_step = check_nonnegative_int("rewind_step", rewind_step)
        self.rewind_dense = bool(rewind_dense)
        self.reset_optimizer = bool(reset_optimizer)
        self.min_keep = check_positive_int("min_keep", min_keep)
        if (isinstance(merge_tolerance, bool) or not isinstance(merge_tolerance, (int, float))
                or not 0 <= merge_tolerance < 1):
            raise ValueError(f"merge_tolerance must be a number in [0, 1), got {merge_tolerance!r}")
        self.merge_tolerance = float(merge_tolerance)
        self.on_level_end: list[Callable[[IMP], Any]] = list(on_level_end or [])
        for fn in self.on_level_end:
            if not callable(fn):
                raise TypeError(f"on_level_end must hold callables fn(algo), got {fn!r}")
        self.initial_nnz = self.nnz
        self.level = 0
        self.snapshot_step: Optional[int] = None
        self._snapshot: Optional[dict[str, torch.Tensor]] = None
        self._dense_snapshot: Optional[dict[str, torch.Tensor]] = None
        if self.rewind_step == 0:
            self._take_snapshot()

    # ------------------------------------------------------------ schedule
    @property
    def final_nnz(self) -> int:
        return round(self.final_density * self.numel)

    def level_nnz(self, level: int) -> int:
        """Weights kept after ``level`` prune-and-rewind calls: round(nnz_0 (1 - p)^level), at least the final;
        the final itself once that is within ``merge_tolerance`` of it."""
        final = self.final_nnz
        if level <= 0:
            return max(final, self.initial_nnz)
        nnz = round(self.initial_nnz * (1 - self.prune_fraction) ** level)
        return final if nnz <= final * (1 + self.merge_tolerance) else nnz

    @property
    def levels(self) -> int:
        """Number of prune-and-rewind calls from the initial to the final density."""
        if self.initial_nnz <= self.final_nnz:
            return 0
        # Solve nnz_0 (1-p)^L <= final, then correct the float estimate against the rounding rule.
        level = max(0, math.floor(math.log(self.final_nnz / self.initial_nnz) / math.log(1 - self.prune_fraction))
                    if self.final_nnz > 0 else 0)
        while self.level_nnz(level) > self.final_nnz:
            level += 1
        while level > 0 and self.level_nnz(level - 1) <= self.final_nnz:
            level -= 1
        return level

    @property
    def done(self) -> bool:
        return self.level >= self.levels

    # ------------------------------------------------------------ snapshot
    def _dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the model except the sparse layers' values and index."""
        sparse = set()
        for layer in self.layers.values():
            sparse.add(id(layer.values))
            sparse.update(id(b) for b in layer.buffers(recurse=False))
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return {n: t for n, t in named if id(t) not in sparse}

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        self._snapshot = {name: layer.values.detach().clone() for name, layer in self.layers.items()}
        self._dense_snapshot = ({n: t.detach().clone() for n, t in self._dense_tensors().items()}
                                if self.rewind_dense else None)
        self.snapshot_step = self.step_count

    def _step(self, t: int) -> None:
        if self._snapshot is None and t >= self.rewind_step:
            self._take_snapshot()

    # ------------------------------------------------------------ prune + rewind
    def prune_and_rewind(self) -> float:
        """End the current level: prune globally to the next level's density, rewind, reset the optimizer.

        Returns the new overall density. Once the final density is reached
        (``done``), it returns the density and changes nothing.
        """
        if self._snapshot is None:
            raise RuntimeError(f"IMP: prune_and_rewind() called at step {self.step_count}, before the rewind point "
                               f"rewind_step={self.rewind_step} was reached; no values to rewind to")
        if self.done:
            warnings.warn(f"IMP: the final density {self.final_density} is already reached after {self.level} "
                          f"levels; prune_and_rewind() changes nothing", RuntimeWarning, stacklevel=2)
            return self.density
        self.level += 1
        names = list(self.layers)
        matrices = [self.layers[n].sparse_weight for n in names]
        scores = [entry_magnitude(m, reduce="mean") for m in matrices]
        sizes = [m.block_size ** 2 for m in matrices]
        drops = smallest_global(scores, sizes, self.nnz - self.level_nnz(self.level), self.min_keep)
        for name, positions in zip(names, drops):
            prune(self.layers[name], positions, self.optimizer)
            self._record(self.step_count, name, positions.numel(), 0, event="prune", level=self.level)
        self._rewind()
        for fn in self.on_level_end:
            fn(self)
        return self.density

    @torch.no_grad()
    def _rewind(self) -> None:
        for name, layer in self.layers.items():
            matrix = layer.sparse_weight
            live = matrix.slot[:matrix.nnz].long()
            layer.values[live] = self._snapshot[name][live].to(layer.values.device)
        if self.rewind_dense:
            current = self._dense_tensors()
            for n, saved in self._dense_snapshot.items():
                if n in current:
                    current[n].copy_(saved)
        if self.reset_optimizer:
            self.optimizer.state.clear()

    # ------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"level": self.level, "initial_nnz": self.initial_nnz, "initial_density": self.initial_density,
                "snapshot_step": self.snapshot_step,
                "snapshot": None if self._snapshot is None else {n: t.clone() for n, t in self._snapshot.items()},
                "dense_snapshot": (None if self._dense_snapshot is None
                                   else {n: t.clone() for n, t in self._dense_snapshot.items()})}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.level = int(state["level"])
        self.initial_nnz = int(state["initial_nnz"])
        self.initial_density = float(state["initial_density"])
        self.snapshot_step = state["snapshot_step"]
        snap = state["snapshot"]
        if snap is not None:
            self._check_layer_names(snap, "the saved rewind snapshot")
            snap = {n: t.clone().to(self.layers[n].values.device) for n, t in snap.items()}
        self._snapshot = snap
        dense = state["dense_snapshot"]
        if dense is None:
            self._dense_snapshot = None
        else:  # kept beside the tensors it rewinds (a checkpoint may have been loaded onto another device)
            current = self._dense_tensors()
            self._dense_snapshot = {n: t.clone().to(current[n].device if n in current else t.device)
                                    for n, t in dense.items()}
