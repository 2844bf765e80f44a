"""Static sparse training: the ER structure never changes, only the stored values train."""
from __future__ import annotations

import torch
from torch import nn

from .base import SparseAlgorithm

__all__ = ["Static"]


class Static(SparseAlgorithm):
    """The baseline: counts steps, never changes the structure (``history`` stays empty)."""

    name = "static"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model, optimizer)
