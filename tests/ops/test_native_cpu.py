"""The native CPU kernels (csrc/cpu) against the pure-PyTorch reference, on awkward shapes.

The kernels take different code paths for: N below, at and just past a vector
width (16 floats / 8 doubles with AVX-512) and a register tile (256 floats),
masked tails, empty rows, nnz = 0, density 1, rows longer than a value chunk
(4096 positions), BSR blocks that are not a multiple of the 8-row register tile,
one thread or several (row partition by nonzeros, or an N partition when N is
wide), int32 or int64 indices. Every case is compared with reference.py run in
float64, and run twice to check that results are bitwise reproducible; the
kernels also promise the same bits for any thread count, which is checked too.
"""
from __future__ import annotations

import pytest
import torch

from sparsestart import ops
from sparsestart.ops import reference
from tests.util import random_matrix, threads

pytestmark = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")

NATIVE = torch.ops.sparsestart
NS = [1, 7, 15, 16, 17, 63, 64, 65, 300]
# (M, K, density, block_size, empty_rows, empty_cols, capacity_extra); small enough for a single-part call.
SMALL = {
    "csr": (37, 29, 0.3, 1, (0, 5), (3,), 4),
    "bsr2": (14, 10, 0.5, 2, (1,), (0,), 2),
    "bsr4": (24, 20, 0.5, 4, (0,), (), 1),
    "bsr16": (48, 64, 0.5, 16, (1,), (2,), 1),
}
# Large enough (2 * nnz * b^2 * N >= 2e5 flops) that the call is cut into one part per thread:
# LARGE[fmt][N] for N = 1 (needs many entries), 65 and 1100 (N partition of spmm).
LARGE = {
    "csr": {1: (400, 390, 0.7, 1, (0, 7, 399), (5,), 3),
            65: (300, 257, 0.1, 1, (0, 7, 299), (5,), 3),
            1100: (60, 50, 0.3, 1, (0, 59), (), 2)},
    "bsr2": {1: (512, 512, 0.5, 2, (3,), (), 2),
             65: (128, 96, 0.3, 2, (3,), (), 2),
             1100: (24, 20, 0.5, 2, (1,), (), 1)},
    "bsr4": {1: (512, 512, 0.6, 4, (0,), (1,), 2),
             65: (96, 128, 0.3, 4, (0,), (1,), 2),
             1100: (24, 32, 0.5, 4, (0,), (), 1)},
    "bsr16": {1: (512, 512, 0.6, 16, (2,), (), 1),
              65: (128, 96, 0.5, 16, (2,), (), 1),
              1100: (48, 32, 0.6, 16, (), (), 1)},
}


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-12


def _assert_close(out, ref64, bound64, dtype, what):
    """|out - ref| <= rtol * sum |a||b| elementwise (the scale of any summation order's rounding)."""
    assert out.dtype == dtype and out.shape == ref64.shape, what
    err = (out.double() - ref64).abs()
    tol = _tol(dtype) * bound64 + 1e-300
    assert not bool((err > tol).any()), f"{what}: max error {err.max().item():.3g}, bound {tol.max().item():.3g}"


def _operands(m, N, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    M, K = m.shape
    x = torch.randn(K, N, generator=g, dtype=torch.float64)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    return x, dy


def _run_native(m, x, dy):
    r, c, s, cp, rr, st = m.index_tensors()
    M, K = m.shape
    y = NATIVE._native_spmm(m.values, r, c, s, x, M, False)
    dx = NATIVE._native_spmm(m.values, cp, rr, st, dy, K, True)
    dv = NATIVE._native_sddmm(r, c, s, dy, x, m.capacity, m.block_size)
    return y, dx, dv


def _run_reference(m, x, dy):
    """float64 reference results and the matching sums of absolute values (error scale)."""
    r, c, s, cp, rr, st = m.index_tensors()
    M, K = m.shape
    v = m.values.detach().double()
    out = []
    with threads(1):  # tiny ops: one thread avoids waking (and, on a busy machine, waiting for) the pool
        for vals, a, b in ((v, x, dy), (v.abs(), x.abs(), dy.abs())):
            out.append((reference.native_spmm(vals, r, c, s, a, M, False),
                        reference.native_spmm(vals, cp, rr, st, b, K, True),
                        reference.native_sddmm(r, c, s, b, a, m.capacity, m.block_size)))
    return out


def _check(m, N, dtype, thread_counts=(1, 2)):
    x64, dy64 = _operands(m, N, dtype)
    x, dy = x64.to(dtype), dy64.to(dtype)
    # The reference sees the operands rounded to dtype, so only kernel rounding is measured.
    ref, bound = _run_reference(m, x.double(), dy.double())
    first = None
    for t in thread_counts:
        with threads(t):
            got = _run_native(m, x, dy)
            again = _run_native(m, x, dy)
        for name, o, o2, r_, b_ in zip(("spmm", "spmm_t", "sddmm"), got, again, ref, bound):
            _assert_close(o, r_, b_, dtype, f"{name} threads={t}")
            assert torch.equal(o, o2), f"{name}: two runs with {t} threads differ"
        if first is None:
            first = got
        else:
            for name, o, o1 in zip(("spmm", "spmm_t", "sddmm"), got, first):
                assert torch.equal(o, o1), f"{name}: {t} threads differ from {thread_counts[0]}"


def _matrix(spec, dtype, index_dtype, seed=0, density=None):
    M, K, d, b, er, ec, extra = spec
    m = random_matrix(M, K, d if density is None else density, block_size=b, dtype=dtype, capacity_extra=extra,
                      empty_rows=er, empty_cols=ec, seed=seed, index_dtype=index_dtype)
    m.validate()
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("fmt", sorted(SMALL))
def test_small_shapes(fmt, N, dtype):
    for index_dtype in (torch.int32, torch.int64):
        _check(_matrix(SMALL[fmt], dtype, index_dtype, seed=N), N, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 65, 1100])
@pytest.mark.parametrize("fmt", sorted(LARGE))
def test_threaded_shapes(fmt, N, dtype):
    # N = 1100 >= 2 tiles per thread switches spmm to the N partition.
    index_dtype = torch.int64 if N % 2 else torch.int32
    _check(_matrix(LARGE[fmt][N], dtype, index_dtype, seed=N), N, dtype)


@pytest.mark.parametrize("fmt", sorted(SMALL))
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_and_full(fmt, density):
    for dtype in (torch.float32, torch.float64):
        for N in (1, 17, 64):
            _check(_matrix(SMALL[fmt], dtype, torch.int32, density=density), N, dtype)


def test_rows_longer_than_a_value_chunk():
    # 9000 entries in a row: the CSR kernel gathers values in chunks of 4096
    # positions and carries the row's partial sums across chunks.
    m = random_matrix(4, 9000, 0.999, dtype=torch.float32, capacity_extra=3, seed=3)
    _check(m, 33, torch.float32)
    # and a transposed view with long columns
    m = random_matrix(9000, 3, 0.999, dtype=torch.float64, seed=4, index_dtype=torch.int64)
    _check(m, 5, torch.float64)


@pytest.mark.parametrize("b", [1, 4])
def test_wide_operands_chunked_sddmm(b):
    # K * N * 4 bytes > 16 MiB and N >= 2 chunks: sddmm switches to fixed N chunks
    # with per-chunk partial sums, spmm to the N partition; both stay
    # independent of the thread count.
    m = random_matrix(16, 2104, 0.05, block_size=b, dtype=torch.float32, capacity_extra=2, seed=9)
    _check(m, 2100, torch.float32)


@pytest.mark.parametrize("b", [3, 5, 8, 12, 32, 64])
def test_other_block_sizes(b):
    m = random_matrix(2 * b, 3 * b, 0.6, block_size=b, dtype=torch.float32, capacity_extra=1, seed=b)
    for N in (1, 19, 50):
        _check(m, N, torch.float32)


def test_zero_sized():
    m = random_matrix(6, 4, 0.5, dtype=torch.float32, seed=0)
    x, dy = torch.randn(4, 0), torch.randn(6, 0)
    y, dx, dv = _run_native(m, x, dy)
    assert y.shape == (6, 0) and dx.shape == (4, 0) and dv.shape == m.values.shape
    assert not bool(dv.any())
    # no (block) rows at all
    e = random_matrix(0, 5, 0.5, dtype=torch.float32)
    y = NATIVE._native_spmm(e.values, e.rowptr, e.col, e.slot, torch.randn(5, 3), 0, False)
    assert y.shape == (0, 3)


def test_free_slots_are_zero():
    m = random_matrix(20, 30, 0.3, dtype=torch.float32, capacity_extra=7, seed=5)
    x, dy = torch.randn(30, 9), torch.randn(20, 9)
    dv = _run_native(m, x, dy)[2]
    free = m.slot[m.nnz:].long()
    assert free.numel() == 7 and not bool(dv[free].any())


def test_noncontiguous_operands():
    m = random_matrix(40, 24, 0.4, dtype=torch.float32, seed=6)
    x = torch.randn(9, 24).t()  # [24, 9], not contiguous
    dy = torch.randn(9, 40).t()
    ref, _ = _run_reference(m, x.double(), dy.double())
    for o, r_ in zip(_run_native(m, x, dy), ref):
        torch.testing.assert_close(o.double(), r_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["csr", "bsr4"])
def test_public_ops_through_cpu_backend(fmt):
    m = _matrix(LARGE[fmt][65], torch.float32, torch.int32, seed=11)
    x64, dy64 = _operands(m, 70, torch.float32)
    x, dy = x64.float(), dy64.float()
    ref, bound = _run_reference(m, x.double(), dy.double())
    with ops.use_backend("cpu"):
        got = (ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x))
    for name, o, r_, b_ in zip(("spmm", "spmm_t", "sddmm"), got, ref, bound):
        _assert_close(o, r_, b_, torch.float32, name)


def test_autograd_through_cpu_backend():
    m = random_matrix(12, 8, 0.5, block_size=2, dtype=torch.float64, capacity_extra=1, seed=2)
    values = m.values.detach().clone().requires_grad_(True)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    idx = m.index_tensors()
    with ops.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda v, a: torch.ops.sparsestart.spmm(v, *idx, a), (values, x))
        dy = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v, a: torch.ops.sparsestart.spmm_t(v, *idx, a), (values, dy))


def test_argument_errors():
    m = random_matrix(6, 4, 0.5, dtype=torch.float32, seed=0)
    r, c, s, *_ = m.index_tensors()
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="index dtype|share one integer dtype"):
        NATIVE._native_spmm(m.values, r.long(), c, s, x, 6, False)
    with pytest.raises(ValueError, match="rows="):
        NATIVE._native_spmm(m.values, r, c, s, x, 7, False)
    with pytest.raises(TypeError, match="dtype"):
        NATIVE._native_spmm(m.values, r, c, s, x.double(), 6, False)
    with pytest.raises(ValueError, match="capacity"):
        NATIVE._native_sddmm(r, c, s, torch.randn(6, 3), x, m.capacity + 1, 1)
    with pytest.raises(ValueError, match="equal N"):
        NATIVE._native_sddmm(r, c, s, torch.randn(6, 2), x, m.capacity, 1)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(M=st.integers(1, 40), K=st.integers(1, 40), N=st.integers(1, 90), density=st.floats(0.0, 1.0),
           b=st.sampled_from([1, 1, 2, 3, 4]), f64=st.booleans(), i64=st.booleans(), seed=st.integers(0, 99))
    def test_property_random_shapes(M, K, N, density, b, f64, i64, seed):
        dtype = torch.float64 if f64 else torch.float32
        m = random_matrix(M * b, K * b, density, block_size=b, dtype=dtype, capacity_extra=seed % 3, seed=seed,
                          index_dtype=torch.int64 if i64 else torch.int32)
        _check(m, N, dtype, thread_counts=(1,))


# K-panel blocking (csrc/cpu/panels.h): with SPARSESTART_L2_BYTES small, x's tile panel no longer
# fits and the CSR spmm / spmm_t / sddmm run K panel by panel. (M, K, density, N, L2 bytes): one tile
# with a masked tail, two tiles, and N wider than a tile with enough entries per x row for the packed
# panel; the L2 size is chosen so that each part (one per thread) has >= 8 entries per row and panel
# (kMinPanelEntries) in float32 and float64 alike: 3-6 panels of 51-102 rows for the first, 4-8
# panels of 87-175 rows for the others.
PANEL_CASES = [(60, 300, 0.3, 40, 32 * 1024), (33, 700, 0.2, 300, 360 * 1024), (40, 520, 0.9, 600, 360 * 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", PANEL_CASES, ids=["one-tile", "two-tiles", "packed"])
def test_k_panels_give_the_unblocked_bits(case, dtype, monkeypatch):
    """Blocked results equal the unblocked ones bit for bit (each row's or entry's summation order is kept),
    match the reference, and do not depend on the thread count; empty rows and columns included, and rows
    whose first entries lie in a later panel (density 0.2 over 700 columns in panels of ~50)."""
    M, K, d, N, l2 = case
    for index_dtype in (torch.int32, torch.int64):
        m = random_matrix(M, K, d, dtype=dtype, capacity_extra=3, empty_rows=(0, M - 1), empty_cols=(2, K - 1),
                          seed=K, index_dtype=index_dtype)
        x64, dy64 = _operands(m, N, dtype)
        x, dy = x64.to(dtype), dy64.to(dtype)
        monkeypatch.setenv("SPARSESTART_L2_BYTES", str(1 << 40))  # one panel: the plain kernels
        with threads(2):
            plain = _run_native(m, x, dy)
        monkeypatch.setenv("SPARSESTART_L2_BYTES", str(l2))  # panels of half that
        _check(m, N, dtype)
        with threads(2):
            blocked = _run_native(m, x, dy)
        for name, a, b in zip(("spmm", "spmm_t", "sddmm"), blocked, plain):
            assert torch.equal(a, b), f"{name}: K panels changed the result"


@pytest.mark.parametrize("value", ["0", "-5", "2MB", ""])
def test_a_bad_l2_size_is_named(value, monkeypatch):
    m = random_matrix(60, 300, 0.3, dtype=torch.float32, seed=1)
    x, dy = (t.float() for t in _operands(m, 40, torch.float32))
    monkeypatch.setenv("SPARSESTART_L2_BYTES", value)
    with pytest.raises(ValueError, match=f"SPARSESTART_L2_BYTES must be a positive whole number of bytes.*got '{value}'"):
        _run_native(m, x, dy)
