"""STR: soft threshold reparameterisation (Kusupati et al. 2020) on the ER support, with compaction.

Every sparse layer l computes with w_eff = sign(w) * relu(|w| - sigmoid(s_l)),
where s_l is one learnable scalar per layer, trained by the same optimizer in a
parameter group of its own (own weight decay / learning rate). The final
sparsity emerges from ``s_init`` and weight decay: with s_init = -200 the
threshold starts at 0 and weight decay on s_l pulls it up over training.

Entries whose w_eff has stayed exactly zero for ``window`` consecutive steps
are dropped from the structure (every ``compact_every`` steps), so compute and
memory shrink as sparsity grows. Such entries get no gradient from the loss
(the relu is flat there), so in the dense formulation only a later fall of the
threshold could revive them; compaction gives up that possibility.
``finalize()`` (run automatically at ``total_steps`` when given) bakes w_eff
into the stored values, drops its zeros and, with ``target_density``, prunes
globally by magnitude to exactly that density.

While training, ``layer.values`` hold the raw w; ``effective_values(name)``
gives w_eff, and ``layer.to_dense()`` shows raw values until ``finalize()``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .base import SparseAlgorithm, check_density_arg, check_positive_int
from .forward import substitute_values
from .structure import entry_magnitude, prune, smallest_global

__all__ = ["STR", "soft_threshold"]


def soft_threshold(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sign(w) * relu(|w| - sigmoid(s)), differentiable in both."""
    return torch.sign(values) * torch.relu(values.abs() - torch.sigmoid(s))


class _SoftThresholded:
    """values -> their soft threshold with this layer's s (a module-level class, so models stay picklable)."""

    def __init__(self, s: nn.Parameter):
        self.s = s

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return soft_threshold(values, self.s)


class STR(SparseAlgorithm):
    """Soft threshold reparameterisation with one learnable threshold per layer.

    Arguments: ``s_init`` (initial s_l, default -200), ``s_weight_decay`` and
    ``s_lr`` (of the thresholds' parameter group; None: the optimizer's
    defaults), ``window`` (steps w_eff must stay zero before an entry is
    dropped, default 100), ``compact_every`` (steps between compactions, default
    100), ``target_density`` (optional exact final overall density, applied by
    ``finalize()``), ``total_steps`` (when given, ``finalize()`` runs after that
    step).

    The thresholds are ``thresholds[name]`` (Parameters); they are added to the
    optimizer as a new parameter group when the algorithm is built, so build it
    before loading an optimizer state dict.
    """

    name = "str"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, s_init: float = -200.0, *,
                 s_weight_decay: Optional[float] = None, s_lr: Optional[float] = None, window: int = 100,
                 compact_every: int = 100, target_density: Optional[float] = None,
                 total_steps: Optional[int] = None):
        super().__init__(model, optimizer)
        if isinstance(s_init, bool) or not isinstance(s_init, (int, float)) or not math.isfinite(s_init):
            raise ValueError(f"s_init must be a finite number, got {s_init!r}")
        for name, v in (("s_weight_decay", s_weight_decay), ("s_lr", s_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {v!r}")
        if s_weight_decay is not None and "weight_decay" not in optimizer.defaults:
            raise ValueError(f"s_weight_decay={s_weight_decay!r} was given but {type(optimizer).__name__} has no "
                             f"weight_decay option")
        self.s_init = float(s_init)
        self.window = check_positive_int("window", window)
        self.compact_every = check_positive_int("compact_every", compact_every)
        self.target_density = None if target_density is None else check_density_arg("target_density", target_density)
        self.total_steps = None if total_steps is None else check_positive_int("total_steps", total_steps)
        self.thresholds: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.tensor(self.s_init, dtype=layer.values.dtype, device=layer.values.device))
            for name, layer in self.layers.items()}
        group: dict[str, Any] = {"params": list(self.thresholds.values())}
        if s_weight_decay is not None:
            group["weight_decay"] = float(s_weight_decay)
        if s_lr is not None:
            group["lr"] = float(s_lr)
        optimizer.add_param_group(group)
        # Consecutive steps each slot's w_eff has been zero (for BSR: the whole block).
        self._zero_steps = {name: torch.zeros(layer.values.shape[0], dtype=torch.long, device=layer.values.device)
                            for name, layer in self.layers.items()}
        self.finalized = False
        self._install()

    def _install(self) -> None:
        for name, layer in self.layers.items():
            self._removers.append(substitute_values(layer, _SoftThresholded(self.thresholds[name])))

    # ------------------------------------------------------------ inspection
    def threshold(self, name: str) -> float:
        """The current threshold sigmoid(s_l) of layer ``name``."""
        return float(torch.sigmoid(self.thresholds[name].detach()))

    @torch.no_grad()
    def effective_values(self, name: str) -> torch.Tensor:
        """w_eff of layer ``name``, laid out like its ``values`` (slots)."""
        if self.finalized:
            return self.layers[name].values.detach().clone()
        return soft_threshold(self.layers[name].values.detach(), self.thresholds[name].detach())

    def effective_density(self) -> float:
        """Overall density counting only entries whose w_eff is nonzero."""
        nonzero = 0
        for name, layer in self.layers.items():
            m = layer.sparse_weight
            nonzero += int((self.effective_values(name)[m.slot[:m.nnz].long()] != 0).sum())
        return nonzero / self.numel

    # ------------------------------------------------------------ stepping
    @torch.no_grad()
    def _step(self, t: int) -> None:
        if self.finalized:
            return
        for name, layer in self.layers.items():
            m = layer.sparse_weight
            slots = m.slot[:m.nnz].long()
            zero = self.effective_values(name)[slots] == 0
            if zero.dim() == 3:
                zero = zero.all(dim=2).all(dim=1)
            counter = self._zero_steps[name]
            stayed = torch.where(zero, counter[slots] + 1, torch.zeros_like(slots))
            counter.zero_()
            counter[slots] = stayed
        if t % self.compact_every == 0:
            self._compact(t)
        if self.total_steps is not None and t == self.total_steps:
            self.finalize()

    def _compact(self, t: int) -> None:
        for name, layer in self.layers.items():
            m = layer.sparse_weight
            slots = m.slot[:m.nnz].long()
            positions = (self._zero_steps[name][slots] >= self.window).nonzero().flatten()
            if positions.numel():
                freed = prune(layer, positions, self.optimizer)
                self._zero_steps[name][freed] = 0
                self._record(t, name, positions.numel(), 0, event="compact", threshold=self.threshold(name))

    @torch.no_grad()
    def finalize(self, target_density: Optional[float] = None) -> float:
        """Bake w_eff into the values, drop its zeros, optionally prune globally to ``target_density``
        (default: the one given at construction), and restore the layers' plain forward.

        Returns the final overall density. Training after this is static training
        of the remaining weights.
        """
        if target_density is not None:
            target_density = check_density_arg("target_density", target_density)
        else:
            target_density = self.target_density
        if self.finalized:
            raise RuntimeError("STR.finalize() was already called")
        t = self.step_count
        for name, layer in self.layers.items():
            w = self.effective_values(name)
            layer.values.copy_(w)
            m = layer.sparse_weight
            zero = w[m.slot[:m.nnz].long()] == 0
            if zero.dim() == 3:
                zero = zero.all(dim=2).all(dim=1)
            positions = zero.nonzero().flatten()
            if positions.numel():
                prune(layer, positions, self.optimizer)
                self._record(t, name, positions.numel(), 0, event="finalize", threshold=self.threshold(name))
        if target_density is not None:
            target = round(target_density * self.numel)
            if self.nnz > target:
                names = list(self.layers)
                matrices = [self.layers[n].sparse_weight for n in names]
                drops = smallest_global([entry_magnitude(m, reduce="mean") for m in matrices],
                                        [m.block_size ** 2 for m in matrices], self.nnz - target, 1)
                for name, positions in zip(names, drops):
                    if positions.numel():
                        prune(self.layers[name], positions, self.optimizer)
                        self._record(t, name, positions.numel(), 0, event="target")
            elif self.nnz < target:
                warnings.warn(f"STR: the thresholds already reached density {self.density:.4g}, below "
                              f"target_density={target_density}; entries cannot be brought back",
                              RuntimeWarning, stacklevel=2)
        self.remove()
        self.finalized = True
        return self.density

    # ------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"thresholds": {n: p.detach().clone() for n, p in self.thresholds.items()},
                "zero_steps": {n: c.clone() for n, c in self._zero_steps.items()},
                "finalized": self.finalized}

    @torch.no_grad()
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._check_layer_names(state["thresholds"], "the saved thresholds")
        for n, v in state["thresholds"].items():
            self.thresholds[n].copy_(v)
        self._zero_steps = {n: c.clone().to(self.layers[n].values.device) for n, c in state["zero_steps"].items()}
        if state["finalized"] and not self.finalized:
            self.remove()
        elif not state["finalized"] and self.finalized:
            raise ValueError("cannot load the state of an unfinished STR run into a finalized STR")
        self.finalized = bool(state["finalized"])
