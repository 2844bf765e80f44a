"""Edge-popup (Ramanujan et al. 2020) inside an ER support (Gadhikar et al. §3), with annealing.

The weights are frozen at initialisation (signed constant ±sqrt(2/fan_in) by
default, Kaiming normal, or Kaiming normal with zero, frozen biases, the
``--initBias kn-zero-bias`` setting of the paper's released runs); every ER
entry carries a trainable score
(Kaiming-uniform init). A layer computes with the top-k entries of largest
|score|; the score gradient is straight-through: dL/ds_e = dL/dw_e · w_e ·
sign(s_e) for every ER entry e, selected or not (the sign comes from selecting
by |score|, as the released code differentiates through ``abs``).

The selection is real structure: the algorithm keeps the ER support (its own
CSR/BSR index over the frozen weights) and the scores; the layer's compressed
structure holds exactly the selected entries with their frozen values. So
``layer.mask()`` is the selected subnetwork, ``layer.to_dense()`` the effective
weight, and the forward and input-gradient products cost the selected nnz; only
the score gradient (``sddmm`` over the ER index) costs the ER nnz. After every
optimizer step, ``step()`` re-selects: entries that leave are dropped, entries
that enter are grown and given their frozen value back.

Annealing: training is split into ``levels`` equal parts; in level j
(0-based) every layer keeps round(r_j · nnz_ER) entries with
r_j = (final_density / d_ER)^((j+1)/levels), d_ER the initial overall density,
so the density shrinks geometrically and reaches ``final_density`` in the last
level. The released code (ER_SLT/resnet_new.py, ``GetSubnetER``) restricts the
scores to the ER mask with dim-0 positions instead of flat positions, and it
writes 0/1 only at those positions of a clone of |score|: every other position
keeps its raw |score| as a continuous multiplier of its weight, so the released
"edge-popup within ER" trains, in effect, a dense network with weights times
|score|. Here the support is the ER index itself and the forward uses exactly
the selected entries.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from ..formats import SparseMatrix
from ..nn.modules import SparseLayer
from .base import SparseAlgorithm, check_density_arg, check_positive_int, new_generator
from .gradient import feature_major
from .structure import isin_sorted, rewire_keys, top_k

__all__ = ["EdgePopup"]

_WEIGHT_INITS = ("signed_constant", "kaiming_normal", "kaiming_normal_zero_bias")


class _ScoreGradient(torch.autograd.Function):
    """Identity on a layer's output whose backward also yields the straight-through score gradient
    dL/ds_e = (dY X^T)_e * w_e * sign(s_e) at every ER entry e (``sddmm`` over the ER index)."""

    @staticmethod
    def forward(ctx, output, scores, x, er_values, layer, *er_index):
        ctx.layer = layer
        ctx.save_for_backward(scores, x, er_values, *er_index)
        return output.clone()  # a fresh tensor, so a following in-place op (ReLU(inplace=True)) is allowed

    @staticmethod
    def backward(ctx, dy):
        scores, x, er_values, *er_index = ctx.saved_tensors
        dscores = None
        if ctx.needs_input_grad[1]:
            x_fm, dy_fm = feature_major(ctx.layer, x, dy)
            b = 1 if er_values.dim() == 1 else er_values.shape[1]
            dw = torch.ops.sparsestart.sddmm(*er_index, dy_fm, x_fm.to(dy_fm.dtype), er_values.shape[0], b)
            dscores = dw * er_values if b == 1 else (dw * er_values).sum(dim=(1, 2))
            dscores = dscores * torch.sign(scores)
        return (dy, dscores) + (None,) * (3 + len(er_index))


class EdgePopup(SparseAlgorithm):
    """Edge-popup within the ER support: frozen weights, trainable scores, top-k selection per layer.

    Arguments: ``final_density`` (overall density of the last level, at most the
    ER density), ``total_steps`` (T), ``levels`` (annealing levels, default 5),
    ``weight_init`` ("signed_constant", "kaiming_normal", both with the dense
    fan-in, or "kaiming_normal_zero_bias": Kaiming normal weights and the sparse
    layers' biases set to zero and frozen, as the paper's released runs do with
    ``--initBias kn-zero-bias``), ``score_weight_decay``/``score_lr`` (of the scores' parameter group;
    None: the optimizer's defaults), ``seed`` (weights and scores),
    ``record_every`` (steps between history records; structure changes
    accumulate in between; a level change records the end of the old level
    and the switch to the new one).

    The layers' ``values`` are frozen (``requires_grad=False``); biases and
    other parameters train as the optimizer says. Scores are added to the
    optimizer as a new parameter group when the algorithm is built, so build it
    before loading an optimizer state dict.
    """

    name = "edgepopup"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, final_density: float = 0.1, *,
                 total_steps: int, levels: int = 5, weight_init: str = "signed_constant",
                 score_weight_decay: Optional[float] = None, score_lr: Optional[float] = None,
                 seed: Optional[int] = None, record_every: int = 100):
        super().__init__(model, optimizer)
        self.final_density = check_density_arg("final_density", final_density)
        self.initial_density = self.density
        if self.final_density > self.initial_density:
            raise ValueError(f"final_density must not exceed the ER density {self.initial_density:.6g}, "
                             f"got {final_density!r}")
        self.total_steps = check_positive_int("total_steps", total_steps)
        self.levels = check_positive_int("levels", levels)
        if weight_init not in _WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {_WEIGHT_INITS}, got {weight_init!r}")
        for name, v in (("score_weight_decay", score_weight_decay), ("score_lr", score_lr)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{name} must be a non-negative number or None, got {v!r}")
        if score_weight_decay is not None and "weight_decay" not in optimizer.defaults:
            raise ValueError(f"score_weight_decay={score_weight_decay!r} was given but {type(optimizer).__name__} "
                             f"has no weight_decay option")
        self.weight_init = weight_init
        self.record_every = check_positive_int("record_every", record_every)
        self.generator, self.seed = new_generator(seed)
        self.er: dict[str, SparseMatrix] = {}
        self.scores: dict[str, nn.Parameter] = {}
        for name, layer in self.layers.items():
            self.er[name], self.scores[name] = self._init_layer(layer)
        group: dict[str, Any] = {"params": list(self.scores.values())}
        if score_weight_decay is not None:
            group["weight_decay"] = float(score_weight_decay)
        if score_lr is not None:
            group["lr"] = float(score_lr)
        optimizer.add_param_group(group)
        self._pending = {name: [0, 0] for name in self.layers}  # dropped, grown since the last record
        self._er_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.level = 0
        for name, layer in self.layers.items():
            self._removers.append(layer.register_forward_hook(partial(self._score_hook, name)).remove)
        self._select(0, record=False)

    # Opaque to torch.compile (--compile): traced, it would guard on each layer's name and structure and
    # compile once per layer; eager, it adds the score path to the compiled layer's output.
    @torch.compiler.disable
    def _score_hook(self, name, module, inputs, output):
        scores = self.scores[name]
        if not (torch.is_grad_enabled() and scores.requires_grad):
            return None
        er = self.er[name]
        return _ScoreGradient.apply(output, scores, inputs[0], er.values, module, *er.index_tensors())

    # ------------------------------------------------------------ set-up
    @torch.no_grad()
    def _init_layer(self, layer: SparseLayer) -> tuple[SparseMatrix, nn.Parameter]:
        m = layer.sparse_weight
        nnz, fan_in = m.nnz, layer.fan_in
        live = m.slot[:nnz].long()
        shape = m.values[live].shape
        std = math.sqrt(2.0 / fan_in) if fan_in else 0.0
        if self.weight_init == "signed_constant":
            w = (torch.randint(0, 2, shape, generator=self.generator) * 2 - 1).to(m.values.dtype) * std
        else:
            w = torch.randn(shape, generator=self.generator, dtype=m.values.dtype) * std
        if self.weight_init == "kaiming_normal_zero_bias" and layer.bias is not None:
            layer.bias.zero_()
            layer.bias.requires_grad_(False)
            layer.bias.grad = None
        frozen = torch.zeros_like(m.values)
        frozen[live] = w.to(frozen.device)
        er = type(m)(frozen, *(t.clone() for t in m.index_tensors()), m.shape)
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        scores = torch.zeros(m.capacity, dtype=m.values.dtype, device=m.values.device)
        scores[live] = (torch.rand(nnz, generator=self.generator, dtype=m.values.dtype) * 2 - 1).mul_(bound).to(
            scores.device)
        layer.values.copy_(frozen)
        layer.values.requires_grad_(False)
        layer.values.grad = None
        return er, nn.Parameter(scores)

    # ------------------------------------------------------------ schedule
    def level_at(self, t: int) -> int:
        """Annealing level used by the forward passes after ``t`` optimizer steps."""
        return min(self.levels - 1, t * self.levels // self.total_steps)

    def keep_ratio(self, level: int) -> float:
        """Fraction of each layer's ER entries kept in ``level``."""
        return (self.final_density / self.initial_density) ** ((level + 1) / self.levels)

    def keep_count(self, name: str, level: int) -> int:
        return max(1, round(self.keep_ratio(level) * self.er[name].nnz))

    # ------------------------------------------------------------ selection
    def _step(self, t: int) -> None:
        self._select(t, record=True)

    @torch.no_grad()
    def _select(self, t: int, record: bool) -> None:
        level = self.level_at(t)
        level_changed = level != self.level
        if record and level_changed:
            self._flush(t, self.level)  # what happened within the level that ends here
        self.level = level
        for name, layer in self.layers.items():
            er = self.er[name]
            Q = er.grid[1]
            er_keys, er_slots = self._er_entries(name)
            score = self.scores[name].detach()[er_slots].abs()
            chosen = torch.sort(er_keys[top_k(score, self.keep_count(name, level))]).values
            m = layer.sparse_weight
            rows, cols, _ = m.coo()
            keys = rows * Q + cols  # CSR order: ascending
            leave = (~isin_sorted(keys, chosen, values_sorted=True)).nonzero().flatten()
            enter = chosen[~isin_sorted(chosen, keys, values_sorted=True)]
            if leave.numel() or enter.numel():
                _, new_slots = rewire_keys(layer, leave, enter, None)
                at = torch.searchsorted(er_keys, enter)
                layer.values[new_slots] = er.values[er_slots[at]]
            self._pending[name][0] += leave.numel()
            self._pending[name][1] += enter.numel()
        if record and (level_changed or t % self.record_every == 0):
            self._flush(t, level)

    def _er_entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, slots) of the ER entries in CSR order; the ER support never changes, so computed once."""
        if name not in self._er_cache:
            er = self.er[name]
            rows, cols, slots = er.coo()
            self._er_cache[name] = (rows * er.grid[1] + cols, slots)
        return self._er_cache[name]

    def _flush(self, t: int, level: int) -> None:
        """One history record per layer with the changes accumulated since the last one."""
        for name in self.layers:
            dropped, grown = self._pending[name]
            self._record(t, name, dropped, grown, event="select", level=level)
            self._pending[name] = [0, 0]

    # ------------------------------------------------------------ inspection
    def er_mask(self, name: str) -> torch.Tensor:
        """The ER support of layer ``name`` as a dense bool mask of the torch weight shape (for inspection)."""
        return self.er[name].mask().reshape(self.layers[name].weight_shape)

    # ------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state(), "level": self.level,
                "initial_density": self.initial_density,
                "pending": {n: list(v) for n, v in self._pending.items()},
                "er": {n: {"values": er.values.clone(), "index": [t.clone() for t in er.index_tensors()]}
                       for n, er in self.er.items()},
                "scores": {n: s.detach().clone() for n, s in self.scores.items()}}

    @torch.no_grad()
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._check_layer_names(state["er"], "the saved ER supports")
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].cpu())  # a CPU generator, wherever the state was loaded
        self.level = int(state["level"])
        self.initial_density = float(state["initial_density"])
        self._pending = {n: list(v) for n, v in state["pending"].items()}
        self._er_cache = {}
        for n, saved in state["er"].items():
            er = self.er[n]
            dev = er.values.device
            er.values = saved["values"].clone().to(dev)
            er.rowptr, er.col, er.slot, er.colptr, er.row, er.slot_t = (t.clone().to(dev) for t in saved["index"])
            er.validate()
            s = self.scores[n]
            s.data = state["scores"][n].clone().to(dev)
        # Re-derive the selection from the scores (a no-op when the model's state was loaded too).
        self._select(self.step_count, record=False)
