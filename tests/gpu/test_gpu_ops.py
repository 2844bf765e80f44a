"""The op contract on a CUDA device, for every GPU backend, against the float64 reference on the CPU.

Skipped without a CUDA device. Run on a GPU machine with
``pytest -q tests/gpu`` (docs/gpu.md).
"""
from __future__ import annotations

import pytest
import torch

import sparsestart.ops.gpu as gpu
from sparsestart import ops
from sparsestart.ops import registry
from tests.gpu.backends import BACKENDS, MUST_FAIL, require
from tests.util import random_matrix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def test_every_gpu_backend_is_built():
    """On a CUDA machine a missing GPU backend fails here once, with its reason (review F2)."""
    assert not MUST_FAIL, "; ".join(f"{b}: {r}" for b, r in MUST_FAIL.items())


def _supports(backend, b, dtype):
    if backend == "cuda":
        return b == 1
    if backend == "triton":
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
            return False
        return b in (1, 16, 32, 64)
    return True


def launch_uses_tf32() -> bool:
    if not gpu.triton_available():
        return False
    from sparsestart.kernels.launch import fp32_uses_tf32
    return fp32_uses_tf32()


def _check(out, ref64, bound64, dtype, backend="cuda"):
    """Rounding of ``dtype`` at the output plus accumulation in fp32 (fp64), against a float64 reference.

    The reference backend accumulates in ``dtype`` itself (index_add_), so it gets the looser
    bound of the CPU suite (32 eps).
    """
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    factor = 32 if backend == "reference" else 2
    tol = (factor * torch.finfo(dtype).eps + 64 * acc_eps) * bound64 + 1e-30
    if dtype == torch.float32 and launch_uses_tf32():
        tol = 4 * 2.0**-10 * bound64  # TF32 operands
    err = (out.double().cpu() - ref64).abs()
    assert out.dtype == dtype and out.device.type == "cuda"
    assert not bool((err > tol).any()), f"max error {err.max().item():.3g}, tolerance {tol.max().item():.3g} ({dtype})"


def _to(m, device):
    return type(m)(m.values.to(device), *(t.to(device) for t in m.index_tensors()), m.shape)


# (M, K, N, density, block_size, empty_rows, empty_cols, capacity_extra)
CASES = [
    (1, 1, 1, 1.0, 1, (), (), 0),
    (97, 31, 17, 0.1, 1, (3, 50), (0,), 5),
    (13, 11, 65, 0.0, 1, (), (), 3),
    (300, 257, 129, 0.05, 1, (1,), (2,), 7),     # several blocks, odd N, rows of mixed length
    (64, 512, 1024, 0.3, 1, (), (), 0),          # vector path, full subwarps
    (48, 32, 7, 0.5, 16, (1,), (0,), 2),
    (64, 96, 33, 0.5, 32, (0,), (), 0),
    (128, 128, 5, 0.75, 64, (), (1,), 1),
    (256, 512, 300, 0.2, 16, (), (), 4),
    (16, 32, 1, 0.0, 16, (), (), 1),
    (64, 64, 4099, 0.5, 16, (1,), (), 1),        # few blocks, long odd N: the triton SDDMM splits N
]
IDS = [f"{c[0]}x{c[1]}xN{c[2]}-d{c[3]}-b{c[4]}" for c in CASES]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_ops_match_reference(backend, dtype, case, index_dtype):
    require(backend)
    M, K, N, density, b, er, ec, extra = case
    if not _supports(backend, b, dtype):
        pytest.skip(f"{backend} does not run block size {b} / {dtype}")
    m = random_matrix(M, K, density, block_size=b, dtype=dtype, capacity_extra=extra, empty_rows=er,
                      empty_cols=ec, seed=M * 31 + K, index_dtype=index_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, N, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    w = m.to_dense().detach().double()
    x64, dy64 = x.double(), dy.double()
    mc = _to(m, DEV)
    with ops.use_backend(backend):
        assert registry.choose("spmm", [mc.values, mc.rowptr, x.to(DEV)]).name == backend
        y = ops.matmul(mc, x.to(DEV))
        dx = ops.matmul_t(mc, dy.to(DEV))
        dv = ops.sampled_matmul(mc, dy.to(DEV), x.to(DEV))
    _check(y, w @ x64, w.abs() @ x64.abs(), dtype, backend)
    _check(dx, w.T @ dy64, w.abs().T @ dy64.abs(), dtype, backend)
    mask = m.mask()
    dense_dv = type(m)(dv.cpu(), *m.index_tensors(), m.shape).to_dense()
    _check(dense_dv.to(DEV), (dy64 @ x64.T) * mask, (dy64.abs() @ x64.abs().T) * mask, dtype, backend)
    assert bool((dv.cpu()[m.slot[m.nnz:].long()] == 0).all())


def test_default_choice_on_cuda():
    csr = _to(random_matrix(64, 64, 0.1, dtype=torch.float32), DEV)
    bsr = _to(random_matrix(64, 64, 0.5, block_size=16, dtype=torch.float32), DEV)
    x = torch.randn(64, 8, device=DEV)
    want_csr = "cuda" if gpu.cuda_extension_available() else "triton" if gpu.triton_available() else "reference"
    assert registry.choose("spmm", [csr.values, csr.rowptr, x]).name == want_csr
    assert registry.choose("spmm", [bsr.values, bsr.rowptr, x]).name == ("triton" if gpu.triton_available()
                                                                           else "reference")
    odd = _to(random_matrix(64, 64, 0.5, block_size=4, dtype=torch.float32), DEV)
    assert registry.choose("spmm", [odd.values, odd.rowptr, x]).name == "reference"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("b", [1, 16])
def test_gradcheck(backend, b):
    require(backend)
    if not _supports(backend, b, torch.float64):
        pytest.skip(f"{backend} does not run block size {b}")
    m = _to(random_matrix(32 if b > 1 else 6, 32 if b > 1 else 8, 0.5, block_size=b, dtype=torch.float64,
                          capacity_extra=1, seed=3), DEV)
    idx = m.index_tensors()
    M, K = m.shape
    values = m.values.detach().clone().requires_grad_()
    x = torch.randn(K, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    dy = torch.randn(M, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    S = torch.ops.sparsestart
    fast = b > 1  # a 16x16 block has 256 values per slot
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v, x: S.spmm(v, *idx, x), (values, x), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda v, d: S.spmm_t(v, *idx, d), (values, dy), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda d, x: S.sddmm(*idx, d, x, m.capacity, b), (dy, x), fast_mode=fast)


@pytest.mark.skipif(not gpu.cuda_extension_available(), reason="sparsestart._C built without CUDA")
def test_opcheck_native_cuda_ops():
    m = _to(random_matrix(6, 4, 0.5, dtype=torch.float32, capacity_extra=1, seed=5), DEV)
    rowptr, col, slot, colptr, row, slot_t = m.index_tensors()
    x, dy = torch.randn(4, 3, device=DEV), torch.randn(6, 3, device=DEV)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.sparsestart._native_spmm.default, (m.values, rowptr, col, slot, x, 6, False),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.sparsestart._native_sddmm.default, (rowptr, col, slot, dy, x, m.capacity, 1),
                          test_utils=utils)


@pytest.mark.skipif(not gpu.cuda_extension_available(), reason="sparsestart._C built without CUDA")
def test_cuda_spmm_with_a_given_row_order():
    """The SpMM that takes the row order (cached per structure change, review F13) equals the one
    that sorts per call, for the swizzle and for any other permutation of the rows."""
    require("cuda")
    S = torch.ops.sparsestart
    assert hasattr(S, "_native_spmm_ordered"), "the extension lacks _native_spmm_ordered: rebuild it"
    m = _to(random_matrix(301, 257, 0.1, dtype=torch.float32, seed=11, empty_rows=(3, 7)), DEV)
    x = torch.randn(257, 65, device=DEV)
    plain = S._native_spmm(m.values, m.rowptr, m.col, m.slot, x, 301, False)
    order = gpu.row_order(m.rowptr)
    assert torch.equal(order.cpu(), gpu.row_order(m.rowptr.cpu()))
    assert torch.equal(S._native_spmm_ordered(m.values, m.rowptr, m.col, m.slot, order, x, 301, False), plain)
    shuffled = torch.randperm(301, device=DEV).to(torch.int32)
    assert torch.equal(S._native_spmm_ordered(m.values, m.rowptr, m.col, m.slot, shuffled, x, 301, False), plain)
    with pytest.raises(ValueError, match="order must be int32"):
        S._native_spmm_ordered(m.values, m.rowptr, m.col, m.slot, order[:-1], x, 301, False)
    torch.library.opcheck(S._native_spmm_ordered.default, (m.values, m.rowptr, m.col, m.slot, order, x, 301, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_runs_on_the_current_stream_and_is_deterministic(backend):
    require(backend)
    m = _to(random_matrix(301, 257, 0.1, dtype=torch.float32, seed=7), DEV)
    x, dy = torch.randn(257, 129, device=DEV), torch.randn(301, 129, device=DEV)
    stream = torch.cuda.Stream()
    with ops.use_backend(backend):
        ref = (ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = (ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x))
        torch.cuda.current_stream().wait_stream(stream)
    for u, v in zip(ref, out):
        assert torch.equal(u, v)


@pytest.mark.skipif(not gpu.cuda_extension_available(), reason="sparsestart._C built without CUDA")
def test_cuda_backend_rejects_bsr_with_a_reason():
    m = _to(random_matrix(32, 32, 0.5, block_size=16, dtype=torch.float32), DEV)
    with ops.use_backend("cuda"), pytest.raises(ops.NoBackendError, match="runs CSR only"):
        ops.matmul(m, torch.randn(32, 4, device=DEV))


@pytest.mark.skipif(not gpu.triton_available(), reason="triton is not installed")
def test_triton_fp32_follows_torch_matmul_precision():
    m = _to(random_matrix(64, 64, 0.5, block_size=32, dtype=torch.float32, seed=1), DEV)
    x = torch.randn(64, 64, device=DEV)
    w = m.to_dense().detach().double().cpu()
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with ops.use_backend("triton"):
            y_tf32 = ops.matmul(m, x)
        torch.set_float32_matmul_precision("highest")
        with ops.use_backend("triton"):
            y_ieee = ops.matmul(m, x)
    finally:
        torch.set_float32_matmul_precision(old)
    ref = w @ x.double().cpu()
    assert (y_ieee.double().cpu() - ref).abs().max() < 1e-4
    assert (y_tf32.double().cpu() - ref).abs().max() < 5e-2
