"""Triton kernel bodies for block-sparse (BSR) SpMM and SDDMM.

Buffers (layouts of csrc/ops.cpp; B = block size, a constexpr in {16, 32, 64}):
  values [C, B, B]  blocks addressed by slot, row-major inside a block
  ptr    [R + 1]    compressed pointer over the R block rows walked (CSR rowptr, or colptr for spmm_t)
  idx    [C]        block column of each entry (CSC: block row); first ptr[R] live
  slot   [C]        slot in `values` of each entry
  x      [Q*B, N]   dense operand, feature-major, contiguous (row stride N)
  out    [R*B, N]   spmm output, every element written (empty block rows get zeros)
  a      [R*B, N], b [Q*B, N]   sddmm operands, contiguous
  dv     [C, B, B]  sddmm output, pre-zeroed; only live slots are written
                    (split over N: [S, C, B, B] fp32 partial sums, summed by the launcher)

These are plain functions: ``kernels/launch.py`` wraps them with ``triton.jit``
(compiled, or interpreted when TRITON_INTERPRET=1) and with an autotuner, so one
source serves the GPU and the CPU interpreter in the same process.

Accumulation is fp32 (``tl.dot`` with an fp32 accumulator; ``ACC``), fp64 for fp64. ``PREC`` is
tl.dot's input_precision for fp32 operands ("ieee" or "tf32", following torch's
float32 matmul precision); UPCAST converts bf16 operands to fp32 before the dot
(exact: a bf16 product fits in fp32), used only under the interpreter, whose
bf16 ``tl.dot`` returns garbage in Triton 3.x.
"""
import triton.language as tl


def bsr_spmm_kernel(values, ptr, idx, slot, x, out, N, N_BUCKET, R_BUCKET,
                    B: tl.constexpr, TRANS: tl.constexpr, BLOCK_N: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """out[r*B:(r+1)*B, tile] = sum over entries e of block row r: V_e (or V_e^T) @ x[idx[e]*B:+B, tile].

    One program per (block row, N tile), flattened to a 1-D grid (axis 0 allows
    2^31 - 1 programs; axis 1 only 65535) with the N tile fastest, so programs
    that run together share the same block row of weights. The transposed
    product (spmm_t over the CSC index) reads each block with swapped strides:
    the same value slots, no copy.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    r = (pid // n_tiles).to(tl.int64)
    nt = pid % n_tiles
    offs_b = tl.arange(0, B)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if TRANS:
        blk_offs = offs_b[None, :] * B + offs_b[:, None]   # blk[i, j] = V[j, i]
    else:
        blk_offs = offs_b[:, None] * B + offs_b[None, :]
    start = tl.load(ptr + r).to(tl.int64)
    end = tl.load(ptr + r + 1).to(tl.int64)
    acc = tl.zeros([B, BLOCK_N], dtype=ACC)
    for e in range(start, end):
        s = tl.load(slot + e).to(tl.int64)
        c = tl.load(idx + e).to(tl.int64)
        blk = tl.load(values + s * (B * B) + blk_offs)
        xt = tl.load(x + (c * B + offs_b)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0.0)
        if UPCAST:
            blk = blk.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(blk, xt, acc, input_precision=PREC)
    out_ptrs = out + (r * B + offs_b)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=n_mask[None, :])


def bsr_sddmm_kernel(ptr, idx, slot, a, b, dv, R, N, N_BUCKET, LOG2_R, N_PER_SPLIT,
                     B: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     ACC: tl.constexpr):
    """dv[slot[e]] = a[r*B:(r+1)*B, :] @ b[idx[e]*B:(idx[e]+1)*B, :]^T for each live entry e.

    Grid (C, S): one program per entry position e in [0, C) and split of N. Programs
    past nnz = ptr[R] do nothing, so the grid needs no host synchronisation, and the
    work is spread over nnz programs even when there are few block rows. The block row
    of e is found by binary search in ptr (LOG2_R + 1 steps of a scalar load; cheap next
    to the B x B x N product). With S > 1 (few entries, long N: convolution weight
    gradients, review F15) split k reduces columns [k*N_PER_SPLIT, (k+1)*N_PER_SPLIT)
    into dv[k] (fp32 partials the launcher sums in a fixed order: deterministic).
    """
    e = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    C = tl.num_programs(0).to(tl.int64)
    nnz = tl.load(ptr + R).to(tl.int64)
    if e < nnz:
        # invariant: ptr[lo] <= e < ptr[hi]
        lo = tl.zeros([], dtype=tl.int64)
        hi = tl.zeros([], dtype=tl.int64) + R
        for _ in range(LOG2_R + 1):
            mid = (lo + hi) // 2
            go = tl.load(ptr + mid).to(tl.int64) <= e
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        r = lo
        s = tl.load(slot + e).to(tl.int64)
        c = tl.load(idx + e).to(tl.int64)
        offs_b = tl.arange(0, B)
        offs_n = tl.arange(0, BLOCK_N)
        a_rows = a + (r * B + offs_b)[:, None] * N
        b_rows = b + (c * B + offs_b)[:, None] * N
        acc = tl.zeros([B, B], dtype=ACC)
        n_lo = split * N_PER_SPLIT
        n_hi = tl.minimum(n_lo + N_PER_SPLIT, N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            n_mask = (n0 + offs_n) < n_hi
            at = tl.load(a_rows + (n0 + offs_n)[None, :], mask=n_mask[None, :], other=0.0)
            bt = tl.load(b_rows + (n0 + offs_n)[None, :], mask=n_mask[None, :], other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(at, tl.trans(bt), acc, input_precision=PREC)
        offs_blk = offs_b[:, None] * B + offs_b[None, :]
        tl.store(dv + (split * C + s) * (B * B) + offs_blk, acc.to(dv.dtype.element_ty))
