"""The op contract (spmm, spmm_t, sddmm) on every CPU backend against dense float64 torch."""
import pytest
import torch

from sparsestart import ops
from sparsestart.ops import registry
from tests.util import assert_close_to_reference, random_matrix, threads

BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or ops.NATIVE_AVAILABLE]

# (M, K, N, density, block_size, empty_rows, empty_cols, capacity_extra)
CASES = [
    (1, 1, 1, 1.0, 1, (), (), 0),
    (7, 5, 3, 0.5, 1, (0,), (4,), 2),
    (97, 31, 17, 0.1, 1, (3, 50), (0,), 5),
    (13, 11, 65, 0.0, 1, (), (), 3),       # nnz = 0
    (8, 12, 7, 1.0, 1, (), (), 0),         # density 1
    (5, 9, 0, 0.4, 1, (), (), 0),          # N = 0
    (4, 8, 5, 0.6, 2, (1,), (), 1),
    (12, 8, 7, 0.5, 4, (0,), (1,), 2),
    (16, 16, 3, 0.0, 4, (), (), 0),        # BSR nnz = 0
    (9, 6, 33, 1.0, 3, (), (), 0),         # BSR density 1, odd block
]
IDS = [f"{c[0]}x{c[1]}xN{c[2]}-d{c[3]}-b{c[4]}" for c in CASES]


def _dense_pair(m, dtype):
    w = m.to_dense().detach().double()
    return w, w.abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_ops_match_dense(backend, dtype, case, index_dtype):
    M, K, N, density, b, er, ec, extra = case
    m = random_matrix(M, K, density, block_size=b, dtype=dtype, capacity_extra=extra, empty_rows=er,
                      empty_cols=ec, seed=M * 31 + K, index_dtype=index_dtype)
    m.validate()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, N, generator=g, dtype=torch.float64)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    w, wabs = _dense_pair(m, dtype)
    with ops.use_backend(backend):
        y = ops.matmul(m, x.to(dtype))
        dx = ops.matmul_t(m, dy.to(dtype))
        dv = ops.sampled_matmul(m, dy.to(dtype), x.to(dtype))
    assert y.shape == (M, N) and dx.shape == (K, N) and dv.shape == m.values.shape
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert_close_to_reference(y, w @ x, wabs @ x.abs(), dtype)
    assert_close_to_reference(dx, w.T @ dy, wabs.T @ dy.abs(), dtype)
    # sddmm: the dense product at stored positions, zero in free slots.
    mask = m.mask()
    grad_matrix = type(m)(dv, *m.index_tensors(), m.shape)
    assert_close_to_reference(grad_matrix.to_dense(), (dy @ x.T) * mask, (dy.abs() @ x.abs().T) * mask, dtype)
    free = m.slot[m.nnz:].long()
    assert bool((dv[free] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_operands_are_accepted(backend):
    m = random_matrix(10, 6, 0.5, dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64).t()  # [6, 7], not contiguous
    assert not x.is_contiguous()
    with ops.use_backend(backend):
        torch.testing.assert_close(ops.matmul(m, x), m.to_dense().detach() @ x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 2])
def test_gradcheck(backend, b):
    m = random_matrix(6, 8, 0.5, block_size=b, dtype=torch.float64, capacity_extra=1, empty_rows=(1,), seed=3)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    S = torch.ops.sparsestart
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v, x: S.spmm(v, *idx, x), (values, x))
        assert torch.autograd.gradcheck(lambda v, d: S.spmm_t(v, *idx, d), (values, dy))
        assert torch.autograd.gradcheck(lambda d, x: S.sddmm(*idx, d, x, m.capacity, b), (dy, x))
        assert torch.autograd.gradgradcheck(lambda v, x: S.spmm(v, *idx, x), (values, x))


def _opcheck_args(b):
    m = random_matrix(6, 4, 0.5, block_size=b, dtype=torch.float32, capacity_extra=1, seed=5)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = torch.randn(4, 3, requires_grad=True)
    dy = torch.randn(6, 3, requires_grad=True)
    return m, idx, values, x, dy


@pytest.mark.parametrize("b", [1, 2])
def test_opcheck_public_ops(b):
    m, idx, values, x, dy = _opcheck_args(b)
    S = torch.ops.sparsestart
    torch.library.opcheck(S.spmm.default, (values, *idx, x))
    torch.library.opcheck(S.spmm_t.default, (values, *idx, dy))
    torch.library.opcheck(S.sddmm.default, (*idx, dy, x, m.capacity, b))


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="C++ extension not built")
@pytest.mark.parametrize("b", [1, 2])
def test_opcheck_native_ops(b):
    m, idx, values, x, dy = _opcheck_args(b)
    S = torch.ops.sparsestart
    rowptr, col, slot, colptr, row, slot_t = idx
    args = (values.detach(), rowptr, col, slot, x.detach(), 6, False)
    torch.library.opcheck(S._native_spmm.default, args, test_utils=("test_schema", "test_faketensor",
                                                                       "test_aot_dispatch_static"))
    args = (rowptr, col, slot, dy.detach(), x.detach(), m.capacity, b)
    torch.library.opcheck(S._native_sddmm.default, args, test_utils=("test_schema", "test_faketensor",
                                                                        "test_aot_dispatch_static"))


def test_bad_operands_raise_named_errors():
    m = random_matrix(6, 4, 0.5, dtype=torch.float32)
    with pytest.raises(ValueError, match="x has 5 rows but the sparse weight needs 4"):
        ops.matmul(m, torch.randn(5, 3))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the sparse weight has torch.float32"):
        ops.matmul(m, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.matmul(m, torch.randn(4))
    with pytest.raises(ValueError, match="dy has N=3 columns but x has 2"):
        ops.sampled_matmul(m, torch.randn(6, 3), torch.randn(4, 2))
    with pytest.raises(TypeError, match="col must be int32 or int64"):
        torch.ops.sparsestart.spmm(m.values, m.rowptr, m.col.long(), m.slot, m.colptr, m.row, m.slot_t,
                                   torch.randn(4, 2))


def test_registry_choice_forcing_and_reasons(monkeypatch):
    m = random_matrix(6, 4, 0.5, dtype=torch.float16)
    x = torch.randn(4, 3, dtype=torch.float16)
    # Automatic choice falls back to the reference for dtypes the cpu kernels lack.
    assert registry.choose("spmm", [m.values, m.rowptr, x]).name == "reference"
    y = ops.matmul(m, x)
    assert y.dtype == torch.float16
    if ops.NATIVE_AVAILABLE:
        x32 = x.float()
        assert registry.choose("spmm", [m.values.float(), m.rowptr, x32]).name == "cpu"
        # A forced backend that cannot run the inputs is an error listing the reasons.
        with ops.use_backend("cpu"), pytest.raises(ops.NoBackendError, match="supports float32 and float64"):
            ops.matmul(m, x)
    monkeypatch.setenv("SPARSESTART_BACKEND", "reference")
    assert registry.choose("spmm", [m.values.float(), m.rowptr, x.float()]).name == "reference"
    monkeypatch.setenv("SPARSESTART_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="unknown backend 'nonexistent'"):
        registry.choose("spmm", [m.values, m.rowptr, x])
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("nope"):
            pass


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="C++ extension not built")
@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_backend_threads_deterministic(n_threads):
    with threads(n_threads):
        m = random_matrix(301, 257, 0.1, dtype=torch.float32, seed=7)
        x = torch.randn(257, 129)
        dy = torch.randn(301, 129)
        with ops.use_backend("cpu"):
            a = (ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x))
            b = (ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x))
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        w = m.to_dense().detach().double()
        assert_close_to_reference(a[0], w @ x.double(), w.abs() @ x.double().abs(), torch.float32)
