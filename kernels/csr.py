"""Triton kernel bodies for unstructured (CSR) SpMM and SDDMM: the Triton fallback
for CSR layers when the CUDA C++ backend is not built.

Buffers (layouts of csrc/ops.cpp):
  values [C]        weights addressed by slot
  ptr    [R + 1]    compressed pointer over the R rows walked (rowptr, or colptr for spmm_t)
  idx    [C]        column of each entry (CSC: row); first ptr[R] live
  slot   [C]        slot in `values` of each entry
  x      [Q, N]     dense operand, feature-major, contiguous (row stride N)
  out    [R, N]     spmm output, every element written
  a      [R, N], b [Q, N]   sddmm operands, contiguous
  dv     [C]        sddmm output, pre-zeroed; only live slots are written

SpMM is row-per-program with gathers: a program takes BLOCK_E entries of its row at
a time, gathers their values (through `slot`) and their operand rows, and reduces
in fp32 (fp64 for fp64 operands: ``ACC``). SDDMM is entry-chunk-per-program (see
its docstring). Plain functions, jitted in ``kernels/launch.py``.
"""
import triton.language as tl


def csr_spmm_kernel(values, ptr, idx, slot, x, out, N, N_BUCKET, R_BUCKET,
                    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """out[r, tile] = sum over entries e of row r: values[slot[e]] * x[idx[e], tile].

    1-D grid over (row, N tile), N tile fastest.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    r = (pid // n_tiles).to(tl.int64)
    nt = pid % n_tiles
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    start = tl.load(ptr + r).to(tl.int64)
    end = tl.load(ptr + r + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        c = tl.load(idx + offs_e, mask=e_mask, other=0).to(tl.int64)
        s = tl.load(slot + offs_e, mask=e_mask, other=0).to(tl.int64)
        v = tl.load(values + s, mask=e_mask, other=0.0).to(ACC)
        xt = tl.load(x + c[:, None] * N + offs_n[None, :], mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.sum(v[:, None] * xt.to(ACC), axis=0)
    tl.store(out + r * N + offs_n, acc.to(out.dtype.element_ty), mask=n_mask)


def csr_sddmm_kernel(ptr, idx, slot, a, b, dv, R, N, N_BUCKET, LOG2_R, BLOCK_E: tl.constexpr,
                     BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """dv[slot[e]] = dot(a[row of e, :], b[idx[e], :]) for every live entry e.

    1-D grid over chunks of BLOCK_E consecutive entry positions of [0, C): the work is
    spread over the entries, not the rows, so a layer with few rows (a classifier: ~10)
    still fills the GPU (review F10). Chunks past nnz = ptr[R] do nothing (no host
    synchronisation for the grid). Each entry's row comes from a vectorised binary search
    in ptr (LOG2_R + 1 steps), the `a` rows are gathered like the `b` rows; consecutive
    entries mostly share a row, so those gathers hit the cache.
    """
    pid = tl.program_id(0).to(tl.int64)
    nnz = tl.load(ptr + R).to(tl.int64)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
    e_mask = offs_e < nnz
    if pid * BLOCK_E < nnz:
        # invariant per lane: ptr[lo] <= e < ptr[hi]
        lo = tl.zeros([BLOCK_E], dtype=tl.int64)
        hi = tl.zeros([BLOCK_E], dtype=tl.int64) + R
        for _ in range(LOG2_R + 1):
            mid = (lo + hi) // 2
            go = tl.load(ptr + mid, mask=e_mask, other=0).to(tl.int64) <= offs_e
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        rows = lo
        c = tl.load(idx + offs_e, mask=e_mask, other=0).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            n_mask = (n0 + offs_n) < N
            m2 = e_mask[:, None] & n_mask[None, :]
            at = tl.load(a + rows[:, None] * N + (n0 + offs_n)[None, :], mask=m2, other=0.0).to(ACC)
            bt = tl.load(b + c[:, None] * N + (n0 + offs_n)[None, :], mask=m2, other=0.0).to(ACC)
            acc += tl.sum(at * bt, axis=1)
        s = tl.load(slot + offs_e, mask=e_mask, other=0).to(tl.int64)
        tl.store(dv + s, acc.to(dv.dtype.element_ty), mask=e_mask)
