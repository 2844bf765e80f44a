"""Sparse-to-sparse training algorithms acting in place on the compressed structure.

Every algorithm is built from (model, optimizer, hyper-parameters) after
``sparsestart.sparsify(model, ...)`` and called once per step after
``optimizer.step()``::

    algo = sparsestart.algorithms.get("rigl", model, optimizer, total_steps=T)
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step(); algo.step()

Each changes the layers' CSR/BSR index through ``drop``/``grow``; none keeps a
dense mask or weight. New entries start at 0 with zeroed optimizer state.
``state_dict()``/``load_state_dict()`` resume a run bit-identically;
``history`` lists the structure changes. See docs/algorithms.md.
"""
from __future__ import annotations

from torch import nn
import torch

from .base import SparseAlgorithm
from .edgepopup import EdgePopup
from .gradient import GradientCapture, dense_gradient, topk_absent_gradient
from .gradual import Gradual
from .imp import IMP
from .rigl import SET, RigL
from .soft_threshold import STR
from .static import Static
from .structure import zero_slot_state

__all__ = ["SparseAlgorithm", "Static", "IMP", "STR", "RigL", "SET", "Gradual", "EdgePopup", "ALGORITHMS", "get",
           "dense_gradient", "topk_absent_gradient", "GradientCapture", "zero_slot_state"]

ALGORITHMS: dict[str, type[SparseAlgorithm]] = {
    "static": Static, "imp": IMP, "str": STR, "rigl": RigL, "set": SET, "gradual": Gradual, "edgepopup": EdgePopup,
}


def get(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs) -> SparseAlgorithm:
    """Build the algorithm called ``name`` (case-insensitive; one of ALGORITHMS) with its keyword arguments."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid names: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[key](model, optimizer, **kwargs)
