"""Shared helpers of the test suite: random sparse matrices and tolerance rules."""
from __future__ import annotations

import torch

from sparsestart.formats import BSR, CSR


def random_matrix(M, K, density, *, block_size=1, dtype=torch.float64, capacity_extra=0, empty_rows=(),
                  empty_cols=(), seed=0, index_dtype=None):
    """A CSR (block_size 1) or BSR matrix with random support and values.

    ``empty_rows``/``empty_cols`` are (block) rows/columns forced empty;
    ``capacity_extra`` free slots are added after the live ones.
    """
    g = torch.Generator().manual_seed(seed)
    R, Q = M // block_size, K // block_size
    bm = torch.rand(R, Q, generator=g) < density
    for r in empty_rows:
        bm[r] = False
    for c in empty_cols:
        bm[:, c] = False
    rows, cols = bm.nonzero(as_tuple=True)
    shape = (rows.numel(),) if block_size == 1 else (rows.numel(), block_size, block_size)
    vals = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    cls = CSR if block_size == 1 else BSR
    m = cls.from_indices(rows, cols, (M, K), vals, block_size=block_size, capacity=rows.numel() + capacity_extra,
                         index_dtype=index_dtype)
    # Shuffle slots so that slot order differs from CSR order (kernels must follow `slot`).
    perm = torch.randperm(m.capacity, generator=g)
    with torch.no_grad():
        new_values = torch.zeros_like(m.values)
        new_values[perm] = m.values
    return cls(new_values, m.rowptr, m.col, perm[m.slot.long()].to(m.slot.dtype), m.colptr, m.row,
               perm[m.slot_t.long()].to(m.slot.dtype), m.shape)


def assert_close_to_reference(out, ref64, bound64, dtype):
    """``out`` equals the float64 ``ref64`` within the rounding error of ``dtype``.

    ``bound64`` is the same computation on absolute values (sum |a||b|), the
    scale of the rounding error of any summation order.
    """
    tol = 32 * torch.finfo(dtype).eps * bound64 + 1e-300
    err = (out.double() - ref64).abs()
    bad = err > tol
    assert not bool(bad.any()), f"max error {err.max().item():.3g} exceeds tolerance (dtype {dtype})"
