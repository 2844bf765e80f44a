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


# Direct convolution kernels (stride 1, CSR weight viewed as [Cout, Cin*KH*KW]); the
# reference goes through unfold (im2col) and the matrix kernels above.
def _conv_out(h: int, k: int, p: int, d: int) -> int:
    return h + 2 * p - d * (k - 1)


def native_conv2d(values, ptr, idx, slot, x, kernel_size, padding, dilation) -> torch.Tensor:
    n, _, h, w = x.shape
    ho, wo = _conv_out(h, kernel_size[0], padding[0], dilation[0]), _conv_out(w, kernel_size[1], padding[1], dilation[1])
    cols = torch.nn.functional.unfold(x, kernel_size, dilation=dilation, padding=padding)  # [n, CKK, L]
    xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    m = ptr.shape[0] - 1
    y = native_spmm(values, ptr, idx, slot, xt, m, False)
    return y.view(m, n, ho * wo).transpose(0, 1).reshape(n, m, ho, wo)


def native_conv2d_input_grad(values, ptr, idx, slot, dy, kernel_size, padding, dilation) -> torch.Tensor:
    n, m, ho, wo = dy.shape
    ckk = ptr.shape[0] - 1
    h = ho + dilation[0] * (kernel_size[0] - 1) - 2 * padding[0]
    w = wo + dilation[1] * (kernel_size[1] - 1) - 2 * padding[1]
    dyt = dy.reshape(n, m, ho * wo).transpose(0, 1).reshape(m, -1)
    cols = native_spmm(values, ptr, idx, slot, dyt, ckk, True).view(ckk, n, ho * wo).transpose(0, 1)
    return torch.nn.functional.fold(cols, (h, w), kernel_size, dilation=dilation, padding=padding)


def native_conv2d_weight_grad(ptr, idx, slot, dy, x, capacity, kernel_size, padding, dilation) -> torch.Tensor:
    n, m = dy.shape[:2]
    cols = torch.nn.functional.unfold(x, kernel_size, dilation=dilation, padding=padding)
    xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    dyt = dy.reshape(n, m, -1).transpose(0, 1).reshape(m, -1)
    return native_sddmm(ptr, idx, slot, dyt, xt, capacity, 1)
