"""The common base of every sparse-to-sparse algorithm and the argument checks they share.

An algorithm is built from (model, optimizer, hyper-parameters), finds the
model's sparse layers, and is called once per training step, after
``optimizer.step()``. It changes each layer's compressed structure in place
(``layer.sparse_weight.drop/grow``); it never keeps a dense mask or a dense
weight. ``state_dict()``/``load_state_dict()`` carry everything a resumed run
needs to continue bit-identically; ``history`` lists the structure changes.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..nn.modules import SparseLayer

__all__ = ["SparseAlgorithm", "check_fraction", "check_positive_int", "check_nonnegative_int", "check_density_arg"]


# ------------------------------------------------------------------ argument checks
def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def check_fraction(name: str, value, *, low_open: bool = True, high_open: bool = True) -> float:
    """A float in (0, 1) (ends included where ``*_open`` is False); ValueError naming the argument otherwise."""
    if not _is_number(value) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                         f"got {value!r}")
    v = float(value)
    ok_low = v > 0 if low_open else v >= 0
    ok_high = v < 1 if high_open else v <= 1
    if not (ok_low and ok_high):
        raise ValueError(f"{name} must lie in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}")
    return v


def check_density_arg(name: str, value) -> float:
    return check_fraction(name, value, low_open=True, high_open=False)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def new_generator(seed: Optional[int]) -> tuple[torch.Generator, int]:
    """A CPU generator and the seed it was made from (drawn from torch's global RNG when None)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed)), int(seed)


# ----------------------------------------------------------------------- the base
class SparseAlgorithm:
    """Base class: layer discovery, the step counter, history and (de)serialisation.

    Subclasses set ``name`` and override ``_step(t)`` (called with the number of
    optimizer steps done so far, starting at 1), and ``_extra_state`` /
    ``_load_extra_state`` for their own state.

    ``layers`` maps qualified names to the model's SparseLinear/SparseConv2d
    modules in registration (forward) order.
    """

    name = "base"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.layers: dict[str, SparseLayer] = {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}
        if not self.layers:
            raise ValueError("model has no SparseLinear/SparseConv2d layer; call sparsestart.sparsify(model, ...) "
                             "first")
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._removers: list[Callable[[], None]] = []
        # Applied in place to scores computed from this process's data alone (chunks of RigL's dense
        # gradient) before they are ranked; data-parallel training sets it to the average over the ranks,
        # so that every rank takes the same structure decision. None: the local scores are used.
        self.sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    # ------------------------------------------------------------------ stepping
    def step(self) -> None:
        """Call once per training step, after ``optimizer.step()``."""
        self.step_count += 1
        self._step(self.step_count)

    def _step(self, t: int) -> None:  # pragma: no cover - overridden
        pass

    # ------------------------------------------------------------------- totals
    @property
    def numel(self) -> int:
        """Weights of all sparse layers if they were dense."""
        return sum(math.prod(m.matrix_shape) for m in self.layers.values())

    @property
    def nnz(self) -> int:
        """Stored weights of all sparse layers (elements, counting every entry of a block)."""
        return sum(m.nnz for m in self.layers.values())

    @property
    def density(self) -> float:
        """Overall density of the sparse layers."""
        n = self.numel
        return self.nnz / n if n else 1.0

    def densities(self) -> dict[str, float]:
        return {n: m.density for n, m in self.layers.items()}

    def _record(self, t: int, name: str, dropped: int, grown: int, **extra) -> None:
        entry = {"step": int(t), "layer": name, "dropped": int(dropped), "grown": int(grown),
                 "density": self.layers[name].density}
        entry.update(extra)
        self.history.append(entry)

    # --------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Detach every hook and forward override this algorithm installed on the model."""
        while self._removers:
            self._removers.pop()()

    # ------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: step counter, history, RNG states, method state.

        Save it with the model's and the optimizer's state dicts. To resume,
        build model, optimizer and algorithm as before, then load all three.
        """
        state = {"algorithm": self.name, "step": self.step_count, "history": copy.deepcopy(self.history)}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "algorithm" not in state:
            raise ValueError("state must be a dict produced by state_dict()")
        if state["algorithm"] != self.name:
            raise ValueError(f"state was saved by algorithm {state['algorithm']!r}, cannot load it into {self.name!r}")
        self.step_count = int(state["step"])
        self.history = copy.deepcopy(list(state["history"]))
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _check_layer_names(self, saved, what: str) -> None:
        if set(saved) != set(self.layers):
            raise ValueError(f"{what} names layers {sorted(saved)} but the model has {sorted(self.layers)}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.layers)}, step={self.step_count}, "
                f"density={self.density:.4g})")
