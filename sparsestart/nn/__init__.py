"""Sparse layers and whole-model conversion."""
from . import autotune
from .convert import LARGE_LAYER_NUMEL, Summary, defer_large_weights, densify, sparsify, summary
from .modules import SparseConv2d, SparseLayer, SparseLinear
from .walk import check_exclude, maskable_layers

__all__ = ["SparseLinear", "SparseConv2d", "SparseLayer", "sparsify", "densify", "summary", "maskable_layers", "check_exclude",
           "Summary", "defer_large_weights", "LARGE_LAYER_NUMEL", "autotune"]
