"""Shared helpers of the test suite: random sparse matrices and tolerance rules."""
from __future__ import annotations

import contextlib

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


def rel_err(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def compare_with_dense(sparse, x, tol=1e-5, device_type=None):
    """Outputs and gradients (input, values, bias) of a sparse layer equal those of its dense twin
    (``sparse.to_dense()``); free value slots get zero gradient. ``device_type``, when given, is
    the device the output must be on."""
    sparse.zero_grad(set_to_none=True)
    dense = sparse.to_dense()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = sparse(x1), dense(x2)
    assert y1.shape == y2.shape
    if device_type is not None:
        assert y1.device.type == device_type
    assert rel_err(y1, y2) <= tol
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert rel_err(x1.grad, x2.grad) <= tol
    # The value gradient is the dense weight gradient read at the stored positions.
    m = sparse.sparse_weight
    grad = type(m)(sparse.values.grad, *m.index_tensors(), m.shape).to_dense().reshape(dense.weight.shape)
    assert rel_err(grad, dense.weight.grad * sparse.mask()) <= tol
    assert bool((sparse.values.grad[m.slot[m.nnz:].long()] == 0).all())
    if sparse.bias is not None:
        assert rel_err(sparse.bias.grad, dense.bias.grad) <= tol


@contextlib.contextmanager
def threads(n):
    """Run the block on ``n`` torch threads, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
