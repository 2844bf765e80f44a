"""Pure-PyTorch reference of the native kernels: the fallback backend and the test oracle.

Written for clarity, not speed: it materialises one [nnz, N] (or [nnz, b, N])
product. Layouts are those of csrc/ops.cpp. float16/bfloat16 operands are
multiplied and summed in float32 (as the kernels do) and rounded once, at the
output; float32 and float64 compute in their own precision.
"""
from __future__ import annotations

import torch


def _live(ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor):
    """(row, idx, slot) of the live entries, int64."""
    counts = (ptr[1:] - ptr[:-1]).long()
    nnz = int(ptr[-1])
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts, output_size=nnz)
    return rows, idx[:nnz].long(), slot[:nnz].long()


_HALF = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: float32 for float16/bfloat16, else itself."""
    return torch.float32 if dtype in _HALF else dtype


def native_spmm(values, ptr, idx, slot, x, rows: int, transpose_blocks: bool) -> torch.Tensor:
    """out[r] = sum_e values[slot[e]] (or its transpose) applied to x at (block) column idx[e]."""
    r, c, s = _live(ptr, idx, slot)
    dtype, acc = x.dtype, _acc(x.dtype)
    x = x.contiguous()
    N = x.shape[1]
    out = x.new_zeros(rows, N, dtype=acc)
    if values.dim() == 1:
        out.index_add_(0, r, values[s].to(acc).unsqueeze(1) * x[c].to(acc))
        return out.to(dtype)
    b = values.shape[1]
    blocks = values[s].to(acc)
    if transpose_blocks:
        blocks = blocks.transpose(1, 2)
    prod = torch.bmm(blocks, x.view(-1, b, N)[c].to(acc))  # [nnz, b, N]
    out.view(-1, b, N).index_add_(0, r, prod)
    return out.to(dtype)


def native_sddmm(ptr, idx, slot, a, b, capacity: int, block_size: int) -> torch.Tensor:
    """out[slot[e]] = a[row of e] . b[idx[e]] (BSR: the b x b block of dot products)."""
    r, c, s = _live(ptr, idx, slot)
    dtype, acc = a.dtype, _acc(a.dtype)
    a, b = a.contiguous(), b.contiguous()
    if block_size == 1:
        out = a.new_zeros(capacity, dtype=acc)
        out[s] = (a[r].to(acc) * b[c].to(acc)).sum(-1)
        return out.to(dtype)
    N = a.shape[1]
    out = a.new_zeros(capacity, block_size, block_size, dtype=acc)
    out[s] = torch.bmm(a.view(-1, block_size, N)[r].to(acc), b.view(-1, block_size, N)[c].to(acc).transpose(1, 2))
    return out.to(dtype)


# Direct-convolution kernels (stride 1, CSR weight viewed as [Cout, Cin*KH*KW], NCHW
# operands) expressed through unfold (im2col) and a backend's spmm/sddmm. This is the
# reference semantics of _native_conv2d*, and the conv path of backends that have no
# direct convolution of their own. The unfolded input is KH*KW times the input (and its
# feature-major copy as much again), so the batch runs in chunks whose unfolded input holds
# at most UNFOLD_CHUNK_ELEMENTS elements: a VGG-11 layer 64 -> 64 at 32 x 32 and batch 256
# unfolds to 151M elements, twice, where the dense convolution needs none (the first H200
# run measured VGG-11's sparse step at 1.29x the dense one's peak memory). Chunks of 64M
# elements keep each product large (N >= 64M / (Cin*KH*KW) columns).
UNFOLD_CHUNK_ELEMENTS = 1 << 26


def _batch_chunks(n: int, per_sample: int) -> list[tuple[int, int]]:
    """[n0, n1) sample ranges whose unfolded input (per_sample elements each) stays within
    UNFOLD_CHUNK_ELEMENTS (at least one sample per chunk), of near-equal sizes; [(0, 0)] for n = 0."""
    per_chunk = max(1, UNFOLD_CHUNK_ELEMENTS // max(1, per_sample))  # samples a chunk may hold
    chunks = max(1, -(-n // per_chunk))  # then near-equal sizes, none above per_chunk
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(chunks)]


def unfold_conv_kernels(spmm, sddmm) -> dict:
    """{"conv2d", "conv2d_input_grad", "conv2d_weight_grad"} built on ``spmm``/``sddmm``
    (native-kernel signatures), over chunks of the batch (see UNFOLD_CHUNK_ELEMENTS)."""
    F = torch.nn.functional

    def conv2d(values, ptr, idx, slot, x, kernel_size, padding, dilation, bias=None):
        n, _, h, w = x.shape
        ho = h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1)
        wo = w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1)
        m = ptr.shape[0] - 1
        ckk = x.shape[1] * kernel_size[0] * kernel_size[1]
        # A fresh NCHW tensor, not a view of the product: a custom op's output that is a view
        # cannot be modified in place (nn.ReLU(inplace=True) after the layer raised on every
        # backend built on these kernels).
        out = x.new_empty(n, m, ho, wo, dtype=values.dtype)
        for n0, n1 in _batch_chunks(n, ckk * ho * wo):
            cols = F.unfold(x[n0:n1], kernel_size, dilation=dilation, padding=padding)  # [c, ckk, ho*wo]
            xt = cols.transpose(0, 1).reshape(ckk, (n1 - n0) * ho * wo)
            del cols
            y = spmm(values, ptr, idx, slot, xt, m, False)
            if bias is not None:  # on the [Cout, c * positions] product, before the layout copy
                y = y.view(m, -1).add_(bias.view(m, 1))
            out[n0:n1] = y.view(m, n1 - n0, ho, wo).transpose(0, 1)
        return out

    def conv2d_input_grad(values, ptr, idx, slot, dy, kernel_size, padding, dilation):
        n, m, ho, wo = dy.shape
        ckk = ptr.shape[0] - 1
        h = ho + dilation[0] * (kernel_size[0] - 1) - 2 * padding[0]
        w = wo + dilation[1] * (kernel_size[1] - 1) - 2 * padding[1]
        parts = []
        for n0, n1 in _batch_chunks(n, ckk * ho * wo):
            c = n1 - n0
            dyt = dy[n0:n1].reshape(c, m, ho * wo).transpose(0, 1).reshape(m, c * ho * wo)
            cols = spmm(values, ptr, idx, slot, dyt, ckk, True).view(ckk, c, ho * wo).transpose(0, 1)
            parts.append(F.fold(cols, (h, w), kernel_size, dilation=dilation, padding=padding))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def conv2d_weight_grad(ptr, idx, slot, dy, x, capacity, kernel_size, padding, dilation):
        n, m = dy.shape[:2]
        ckk = x.shape[1] * kernel_size[0] * kernel_size[1]
        total = None
        for n0, n1 in _batch_chunks(n, ckk * dy.shape[2] * dy.shape[3]):
            cols = F.unfold(x[n0:n1], kernel_size, dilation=dilation, padding=padding)
            xt = cols.transpose(0, 1).reshape(cols.shape[1], -1)
            del cols
            dyt = dy[n0:n1].reshape(n1 - n0, m, -1).transpose(0, 1).reshape(m, -1)
            part = sddmm(ptr, idx, slot, dyt.contiguous(), xt.contiguous(), capacity, 1)
            total = part if total is None else total.add_(part)
        return total

    return {"conv2d": conv2d, "conv2d_input_grad": conv2d_input_grad, "conv2d_weight_grad": conv2d_weight_grad}
