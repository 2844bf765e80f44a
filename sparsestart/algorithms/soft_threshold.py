"""STR: soft threshold reparameterisation (Kusupati et al. 2020) on the ER support, with compaction.

Every sparse layer l computes with w_eff = sign(w) * relu(|w| - sigmoid(s_l)),
where s_l is one learnable scalar per layer, trained by the same optimizer in a
parameter group of its own (own weight decay / learning rate). The final
sparsity emerges from ``s_init`` and weight decay: while s_l is very negative,
sigmoid'(s_l) underflows, the loss cannot move s_l and only weight decay pulls
it up, geometrically (s_t ~ s_0 exp(-sum_t lr_t wd / (1 - momentum)) for SGD).

The initial s therefore decides *when* pruning starts. Gadhikar et al. run the
released STR code with s_init = -200 over 160 CIFAR epochs (wd 5e-4 / 1e-3):
the threshold first matters around epoch 17-36 there, but a run of a few
hundred steps only moves s from -200 to about -160 and prunes nothing. So by
default (``s_init=None``) s_init is derived from the run: the value from which
weight decay alone, through the thresholds' own parameter group, brings s to
``s_start`` (default -6, threshold sigmoid(-6) = 0.0025) after the fraction
``prune_start`` (default 0.1) of ``total_steps``. The derivation replays the
optimizer's update of a scalar with zero loss gradient (SGD with its momentum,
dampening and Nesterov flag, or AdamW's decoupled decay; other optimizers: the
SGD form), at the group's learning rate times ``lr_factor(t)`` when given
(constant otherwise). For the paper's 160-epoch setting (391 steps per epoch,
lr 0.1, momentum 0.9, wd 5e-4, constant lr) this gives about -133, close to
its -200; for a 2-epoch run about -6. Without ``total_steps``, or with no
weight decay on s, s_init = ``s_start``. Pass ``s_init=-200`` to reproduce the
paper's runs exactly.

Entries whose w_eff has stayed exactly zero for ``window`` consecutive steps
are dropped from the structure (every ``compact_every`` steps), so compute and
memory shrink as sparsity grows. Such entries get no gradient from the loss
(the relu is flat there), so in the dense formulation only a later fall of the
threshold could revive them; compaction gives up that possibility.
``finalize()`` (run automatically at ``total_steps`` when given) bakes w_eff
into the stored values, drops its zeros and, with ``target_density``, prunes
globally by magnitude to exactly that density. That last cut has no training
after it when it runs at the final step: a short run whose thresholds stopped at
density 0.14 and is cut to 0.05 at its last step collapses to chance (ResNet-20
on Fashion-MNIST, experiments/table4-str.yaml, version 1). ``finalize_at=f``
(a fraction of ``total_steps``, default 1.0) runs ``finalize()`` after step
round(f * total_steps) instead, so the rest of the run trains the final
structure statically and can recover from the cut.

While training, ``layer.values`` hold the raw w; ``effective_values(name)``
gives w_eff, and ``layer.to_dense()`` shows raw values until ``finalize()``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .base import SparseAlgorithm, check_density_arg, check_positive_int
from .forward import substitute_values
from .structure import entry_magnitude, prune, smallest_global

__all__ = ["STR", "soft_threshold", "derive_s_init"]

#: s at which pruning counts as started in the derivation of the default s_init (sigmoid(-6) = 0.0025).
S_START = -6.0
#: Fraction of the run after which weight decay alone brings s to ``S_START`` (default s_init).
PRUNE_START = 0.1


def soft_threshold(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sign(w) * relu(|w| - sigmoid(s)), differentiable in both."""
    return torch.sign(values) * torch.relu(values.abs() - torch.sigmoid(s))


def _decay_factor(optimizer: torch.optim.Optimizer, group: dict, steps: int,
                  lr_factor: Optional[Callable[[int], float]]) -> float:
    """G with s_steps = G * s_0 when only weight decay acts on s (zero loss gradient), for ``group``'s settings.

    The update of a scalar under zero loss gradient is linear in s_0, so G is the
    result of replaying it from s_0 = 1 (float64)."""
    lr0 = float(group.get("lr", optimizer.defaults.get("lr", 0.0)))
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if steps <= 0 or wd == 0.0 or lr0 == 0.0:
        return 1.0
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    momentum = float(group.get("momentum", 0.0) or 0.0)
    dampening = float(group.get("dampening", 0.0) or 0.0)
    nesterov = bool(group.get("nesterov", False))
    s, buf = 1.0, None
    for t in range(steps):
        lr = lr0 * (float(lr_factor(t)) if lr_factor is not None else 1.0)
        if decoupled:  # AdamW: s *= 1 - lr wd; Adam's own update of a zero gradient is zero
            s *= 1.0 - lr * wd
            continue
        g = wd * s
        if momentum:
            buf = g if buf is None else momentum * buf + (1.0 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        s -= lr * g
        if s <= 0.0 or not math.isfinite(s):  # overshoot (lr * wd >= 1): decay reaches 0 at once
            return 0.0
    return s


def derive_s_init(optimizer: torch.optim.Optimizer, total_steps: Optional[int], *, s_start: float = S_START,
                  prune_start: float = PRUNE_START, group: Optional[dict] = None,
                  lr_factor: Optional[Callable[[int], float]] = None) -> float:
    """The s_init from which weight decay alone brings s to ``s_start`` after ``prune_start * total_steps`` steps.

    ``group``: the thresholds' parameter group (its lr, weight decay, momentum;
    default: the optimizer's defaults). ``lr_factor(t)``: the learning-rate
    multiplier at step t (default: constant). Returns ``s_start`` when there is
    no run length, no weight decay or ``prune_start`` is 0.
    """
    if total_steps is None or prune_start <= 0:
        return float(s_start)
    g = _decay_factor(optimizer, dict(optimizer.defaults) if group is None else group,
                      round(prune_start * total_steps), lr_factor)
    if g <= 0.0:
        return float(s_start)
    return float(s_start) / g


class _SoftThresholded:
    """values -> their soft threshold with this layer's s (a module-level class, so models stay picklable)."""

    def __init__(self, s: nn.Parameter):
        self.s = s

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return soft_threshold(values, self.s)


class STR(SparseAlgorithm):
    """Soft threshold reparameterisation with one learnable threshold per layer.

    Arguments: ``s_init`` (initial s_l; None, the default: derived so that
    pruning starts at the fraction ``prune_start`` of ``total_steps``, see the
    module docstring; the paper's runs use -200), ``s_start`` (default -6) and
    ``prune_start`` (default 0.1) of that derivation, ``lr_factor`` (optional
    callable t -> learning-rate multiplier used by the derivation),
    ``s_weight_decay`` and ``s_lr`` (of the thresholds' parameter group; None:
    the optimizer's defaults), ``window`` (steps w_eff must stay zero before an
    entry is dropped, default 100), ``compact_every`` (steps between
    compactions, default 100), ``target_density`` (optional exact final overall
    density, applied by ``finalize()``), ``total_steps`` (when given,
    ``finalize()`` runs after that step), ``finalize_at`` (fraction of
    ``total_steps`` after which ``finalize()`` runs, default 1.0: the end; below
    1 the remaining steps fine-tune the final structure). ``s_init_derived``
    tells whether ``s_init`` was derived.

    The thresholds are ``thresholds[name]`` (Parameters); they are added to the
    optimizer as a new parameter group when the algorithm is built, so build it
    before loading an optimizer state dict.
    """

    name = "str"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, s_init: Optional[float] = None, *,
                 s_start: float = S_START, prune_start: float = PRUNE_START,
                 lr_factor: Optional[Callable[[int], float]] = None,
                 s_weight_decay: Optional[float] = None, s_lr: Optional[float] = None, window: int = 100,
                 compact_every: int = 100, target_density: Optional[float] = None,
                 total_steps: Optional[int] = None, finalize_at: float = 1.0):
        super().__init__(model, optimizer)
        for name, v in (("s_init", s_init), ("s_start", s_start)):
            if v is None and name == "s_init":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if isinstance(prune_start, bool) or not isinstance(prune_start, (int, float)) or not 0 <= prune_start <= 1:
            raise ValueError(f"prune_start must be a number in [0, 1], got {prune_start!r}")
        if lr_factor is not None and not callable(lr_factor):
            raise TypeError(f"lr_factor must be a callable t -> float or None, got {lr_factor!r}")
        for name, v in (("s_weight_decay", s_weight_decay), ("s_lr", s_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {v!r}")
        if s_weight_decay is not None and "weight_decay" not in optimizer.defaults:
            raise ValueError(f"s_weight_decay={s_weight_decay!r} was given but {type(optimizer).__name__} has no "
                             f"weight_decay option")
        self.window = check_positive_int("window", window)
        self.compact_every = check_positive_int("compact_every", compact_every)
        self.target_density = None if target_density is None else check_density_arg("target_density", target_density)
        self.total_steps = None if total_steps is None else check_positive_int("total_steps", total_steps)
        self.s_start, self.prune_start = float(s_start), float(prune_start)
        if (isinstance(finalize_at, bool) or not isinstance(finalize_at, (int, float))
                or not 0 < finalize_at <= 1):
            raise ValueError(f"finalize_at must be a fraction of total_steps in (0, 1], got {finalize_at!r}")
        if finalize_at != 1 and self.total_steps is None:
            raise ValueError(f"finalize_at={finalize_at!r} needs total_steps (the step it is a fraction of)")
        if finalize_at != 1 and prune_start >= finalize_at:
            raise ValueError(f"finalize_at={finalize_at!r} must come after prune_start={prune_start!r}: "
                             f"the thresholds would be baked in before they prune")
        self.finalize_at = float(finalize_at)
        #: The step after which finalize() runs (None: only when called).
        self.finalize_step = (None if self.total_steps is None
                              else max(1, round(self.finalize_at * self.total_steps)))
        group: dict[str, Any] = {"params": []}
        if s_weight_decay is not None:
            group["weight_decay"] = float(s_weight_decay)
        if s_lr is not None:
            group["lr"] = float(s_lr)
        self.s_init_derived = s_init is None
        if s_init is None:
            s_init = derive_s_init(optimizer, self.total_steps, s_start=self.s_start, prune_start=self.prune_start,
                                   group={**optimizer.defaults, **group}, lr_factor=lr_factor)
        self.s_init = float(s_init)
        self.thresholds: dict[str, nn.Parameter] = {
            name: nn.Parameter(torch.tensor(self.s_init, dtype=layer.values.dtype, device=layer.values.device))
            for name, layer in self.layers.items()}
        group["params"] = list(self.thresholds.values())
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
        if self.finalize_step is not None and t == self.finalize_step:
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
