"""Sparse kernels of sparsestart behind one op contract (see library.py).

Convenience wrappers take a :class:`sparsestart.formats.SparseMatrix`; the raw
ops are ``torch.ops.sparsestart.{spmm, spmm_t, sddmm}`` (the wrappers and the layers call them
through ``library.call_*``, the same impl without the dispatcher's host overhead when nothing
needs it).
"""
from __future__ import annotations

import torch

from . import cpu, library, reference, registry
from .cpu import NATIVE_AVAILABLE
from .registry import NoBackendError, backends, use_backend
from . import gpu  # noqa: E402,F401  (registers the triton and cuda backends)
from . import batching  # noqa: E402,F401  (registers the ops' vmap rules)

__all__ = ["matmul", "matmul_t", "sampled_matmul", "use_backend", "backends", "NoBackendError", "NATIVE_AVAILABLE",
           "reference", "registry"]


def matmul(weight, x: torch.Tensor) -> torch.Tensor:
    """W @ x for a sparse W (M, K) and feature-major x [K, N]; differentiable in values and x."""
    return library.call_spmm(weight.values, *weight.index_tensors(), x)


def matmul_t(weight, dy: torch.Tensor) -> torch.Tensor:
    """W^T @ dy for dy [M, N] (the input gradient), walking the CSC view."""
    return library.call_spmm_t(weight.values, *weight.index_tensors(), dy)


def sampled_matmul(weight, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(dy @ x^T) at W's stored entries, laid out like W.values (the value gradient)."""
    return library.call_sddmm(*weight.index_tensors(), dy, x, weight.capacity, weight.block_size)
