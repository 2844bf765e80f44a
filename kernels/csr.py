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

Row-per-program with gathers: a program takes BLOCK_E entries of its row at a
time, gathers their values (through `slot`) and their operand rows, and reduces
in fp32 (fp64 for fp64 operands: ``ACC``). Plain functions, jitted in ``kernels/launch.py``.
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


def csr_sddmm_kernel(ptr, idx, slot, a, b, dv, N, N_BUCKET, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                     ACC: tl.constexpr):
    """dv[slot[e]] = dot(a[r, :], b[idx[e], :]) for every live entry e of row r = program id."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(ptr + r).to(tl.int64)
    end = tl.load(ptr + r + 1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        c = tl.load(idx + offs_e, mask=e_mask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_E], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            n_mask = (n0 + offs_n) < N
            at = tl.load(a + r * N + n0 + offs_n, mask=n_mask, other=0.0).to(ACC)
            bt = tl.load(b + c[:, None] * N + (n0 + offs_n)[None, :], mask=e_mask[:, None] & n_mask[None, :],
                         other=0.0).to(ACC)
            acc += tl.sum(at[None, :] * bt, axis=1)
        s = tl.load(slot + offs_e, mask=e_mask, other=0).to(tl.int64)
        tl.store(dv + s, acc.to(dv.dtype.element_ty), mask=e_mask)
