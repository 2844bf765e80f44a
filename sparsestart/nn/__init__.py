"""Sparse layers and whole-model conversion."""
from .convert import Summary, check_exclude, densify, maskable_layers, sparsify, summary
from .modules import SparseConv2d, SparseLayer, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "SparseLayer", "sparsify", "densify", "summary", "maskable_layers", "check_exclude",
           "Summary"]
