"""Pure-PyTorch reference of the native kernels: the fallback backend and the test oracle.

Written for clarity, not speed: it materialises one [nnz, N] (or [nnz, b, N])
product. Layouts are those of csrc/ops.cpp.
"""
from __future__ import annotations

import torch


def _live(ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor):
    """(row, idx, slot) of the live entries, int64."""
    counts = (ptr[1:] - ptr[:-1]).long()
    nnz = int(ptr[-1])
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts, output_size=nnz)
    return rows, idx[:nnz].long(), slot[:nnz].long()


def native_spmm(values, ptr, idx, slot, x, rows: int, transpose_blocks: bool) -> torch.Tensor:
    """out[r] = sum_e values[slot[e]] (or its transpose) applied to x at (block) column idx[e]."""
    r, c, s = _live(ptr, idx, slot)
    x = x.contiguous()
    N = x.shape[1]
    out = x.new_zeros(rows, N)
    if values.dim() == 1:
        return out.index_add_(0, r, values[s].unsqueeze(1) * x[c])
    b = values.shape[1]
    blocks = values[s]
    if transpose_blocks:
        blocks = blocks.transpose(1, 2)
    prod = torch.bmm(blocks, x.view(-1, b, N)[c])  # [nnz, b, N]
    out.view(-1, b, N).index_add_(0, r, prod)
    return out


def native_sddmm(ptr, idx, slot, a, b, capacity: int, block_size: int) -> torch.Tensor:
    """out[slot[e]] = a[row of e] . b[idx[e]] (BSR: the b x b block of dot products)."""
    r, c, s = _live(ptr, idx, slot)
    a, b = a.contiguous(), b.contiguous()
    if block_size == 1:
        out = a.new_zeros(capacity)
        out[s] = (a[r] * b[c]).sum(-1)
        return out
    N = a.shape[1]
    out = a.new_zeros(capacity, block_size, block_size)
    out[s] = torch.bmm(a.view(-1, block_size, N)[r], b.view(-1, block_size, N)[c].transpose(1, 2))
    return out
