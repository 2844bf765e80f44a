"""The op contract (spmm, spmm_t, sddmm) on every CPU backend against dense float64 torch."""
import threading

import pytest
import torch

from sparsestart import ops
from sparsestart.formats import BSR, CSR
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
    from sparsestart.ops.library import call_spmm

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
        # With a bias (spmm's optional last operand), through the op and the eager fast path; without
        # one, and with one that needs no gradient.
        bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v, x, c: S.spmm(v, *idx, x, c), (values, x, bias))
        assert torch.autograd.gradcheck(lambda v, x, c: call_spmm(v, *idx, x, c), (values, x, bias))
        assert torch.autograd.gradcheck(lambda v, x: call_spmm(v, *idx, x, None), (values, x))
        assert torch.autograd.gradcheck(lambda v, x: call_spmm(v, *idx, x, bias.detach()), (values, x))


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
    # float16/bfloat16 on CPU run on the C++ kernels through float32 (the reference without them).
    assert registry.choose("spmm", [m.values, m.rowptr, x]).name == ("cpu" if ops.NATIVE_AVAILABLE else "reference")
    y = ops.matmul(m, x)
    assert y.dtype == torch.float16
    if ops.NATIVE_AVAILABLE:
        x32 = x.float()
        assert registry.choose("spmm", [m.values.float(), m.rowptr, x32]).name == "cpu"
    # A forced backend that cannot run the inputs is an error listing the reasons.
    with ops.use_backend("cuda"), pytest.raises(ops.NoBackendError, match="forced backend 'cuda' cannot run"):
        ops.matmul(m, x)
    monkeypatch.setenv("SPARSESTART_BACKEND", "reference")
    assert registry.choose("spmm", [m.values.float(), m.rowptr, x.float()]).name == "reference"
    monkeypatch.setenv("SPARSESTART_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="unknown backend 'nonexistent'"):
        registry.choose("spmm", [m.values, m.rowptr, x])
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("nope"):
            pass


def test_backend_choice_is_cached_and_follows_forcing(monkeypatch):
    """The registry caches its choice per (op, devices, dtype, block size, index dtype, forced backend,
    TRITON_INTERPRET): repeated calls do not re-evaluate the backends, and SPARSESTART_BACKEND,
    use_backend (per thread) and changes to a backend still take effect on the next call."""
    monkeypatch.delenv("SPARSESTART_BACKEND", raising=False)
    backends = registry.backends()
    ran, asked = [], []
    for name in ("reference", "cpu"):
        kernel = backends[name].spmm
        monkeypatch.setattr(backends[name], "spmm", lambda *a, _k=kernel, _n=name: (ran.append(_n), _k(*a))[1])
    reasons = backends["cpu"].not_supported_reasons
    monkeypatch.setattr(backends["cpu"], "not_supported_reasons", lambda op, ts: (asked.append(op), reasons(op, ts))[1])
    m = random_matrix(6, 4, 0.5, dtype=torch.float32)
    x = torch.randn(4, 3)
    auto = "cpu" if ops.NATIVE_AVAILABLE else "reference"

    def last():
        ops.matmul(m, x)
        return ran[-1]

    assert last() == auto
    n_asked = len(asked)
    for _ in range(5):
        assert last() == auto
    assert len(asked) == n_asked  # cached: the backends were not asked again
    monkeypatch.setenv("SPARSESTART_BACKEND", "reference")
    assert last() == "reference"
    monkeypatch.delenv("SPARSESTART_BACKEND")
    assert last() == auto
    with ops.use_backend("reference"):
        assert last() == "reference"
        seen = []
        thread = threading.Thread(target=lambda: seen.append(last()))  # use_backend is per thread
        thread.start()
        thread.join()
        assert seen == [auto]
    assert last() == auto
    if ops.NATIVE_AVAILABLE:
        monkeypatch.setattr(backends["cpu"], "is_available", lambda: False)  # a changed backend clears the cache
        assert last() == "reference"
        with ops.use_backend("cpu"), pytest.raises(ops.NoBackendError, match="not built"):
            ops.matmul(m, x)


def _check_half(out, ref64, bound64, dtype):
    """Within one rounding of ``dtype`` at the output plus float32 accumulation (inputs exact in float64)."""
    tol = (2 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps) * bound64 + 1e-30
    err = (out.double() - ref64).abs()
    assert out.dtype == dtype
    assert not bool((err > tol).any()), f"max error {err.max().item():.3g}, tolerance {tol.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 4])
def test_half_precision_accumulates_in_float32(backend, dtype, b):
    """float16/bfloat16 operands: products and sums in float32, one rounding at the output, on the
    reference and on the C++ CPU kernels (which widen to float32)."""
    m = random_matrix(96, 64, 0.5, block_size=b, dtype=dtype, capacity_extra=3, empty_rows=(1,), seed=11)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 9, generator=g).to(dtype)
    dy = torch.randn(96, 9, generator=g).to(dtype)
    w = m.to_dense().detach().double()
    x64, dy64 = x.double(), dy.double()
    with ops.use_backend(backend):
        y, dx, dv = ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x)
    _check_half(y, w @ x64, w.abs() @ x64.abs(), dtype)
    _check_half(dx, w.T @ dy64, w.abs().T @ dy64.abs(), dtype)
    mask = m.mask()
    dense_dv = type(m)(dv, *m.index_tensors(), m.shape).to_dense()
    _check_half(dense_dv, (dy64 @ x64.T) * mask, (dy64.abs() @ x64.abs().T) * mask, dtype)
    assert dv.dtype == dtype and bool((dv[m.slot[m.nnz:].long()] == 0).all())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def _matrix(dense, b, device):
    fmt = CSR if b == 1 else BSR
    mask = dense != 0 if b == 1 else (dense != 0).reshape(dense.shape[0] // b, b, dense.shape[1] // b, b).any(3).any(1)
    return fmt.from_dense(dense.to(device), mask.to(device), block_size=b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 2])
def test_reference_multiplies_bfloat16_in_float32(device, b):
    """u*u - v with u = 1 + 2**-7 and v = 1 + 2**-6 (both exact in bfloat16): u*u = 1 + 2**-6 + 2**-14
    needs 15 bits, so a product rounded to bfloat16 (8 bits) is v and the result 0 instead of 2**-14
    (exact in bfloat16). The kernels multiply in float32; the reference must too (F17)."""
    u, v, exact = 1 + 2 ** -7, 1 + 2 ** -6, 2 ** -14
    bf = torch.bfloat16
    w = torch.zeros(b, 2 * b, dtype=bf)
    w[0, 0], w[0, b] = u, -v
    x = torch.zeros(2 * b, 3, dtype=bf, device=device)
    x[0], x[b] = u, 1
    wide, tall = _matrix(w, b, device), _matrix(w.T.contiguous(), b, device)
    square = _matrix(torch.ones(b, b, dtype=bf), b, device)
    dy, xs = torch.zeros(b, 2, dtype=bf, device=device), torch.zeros(b, 2, dtype=bf, device=device)
    dy[0], xs[0] = torch.tensor([u, -v]), torch.tensor([u, 1.0])
    with ops.use_backend("reference"):
        y = ops.matmul(wide, x)           # row 0: u*u - v
        dx = ops.matmul_t(tall, x)        # W^T of the tall matrix is the wide one: column 0 gets u*u - v
        dv = ops.sampled_matmul(square, dy, xs)
    assert y.dtype == dx.dtype == dv.dtype == bf
    assert bool((y[0] == exact).all()), y[0]
    assert bool((dx[0] == exact).all()), dx[0]
    assert dv.reshape(-1)[0].item() == exact, dv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b", [1, 2])
def test_reference_sums_many_bfloat16_terms_in_float32(device, b):
    """4096 contributions of 1 to one output: summed in bfloat16 the total stalls at 256 (256 + 1
    rounds back to 256). torch's CPU index_add_ happens to sum in float32; CUDA's adds in the
    storage dtype (atomics), which is where the reference used to lose it."""
    K = 4096
    bf = torch.bfloat16
    wide, tall = _matrix(torch.ones(b, K, dtype=bf), b, device), _matrix(torch.ones(K, b, dtype=bf), b, device)
    square = _matrix(torch.ones(b, b, dtype=bf), b, device)
    ones = torch.ones(K, 3, dtype=bf, device=device)
    with ops.use_backend("reference"):
        y = ops.matmul(wide, ones)         # K terms per output (K / b entries of b for BSR)
        dx = ops.matmul_t(tall, ones)      # K terms per output, over the CSC view
        dv = ops.sampled_matmul(square, torch.ones(b, K, dtype=bf, device=device),
                                torch.ones(b, K, dtype=bf, device=device))
    assert bool((y == K).all()), y
    assert bool((dx == K).all()), dx
    assert bool((dv == K).all()), dv      # K products summed over N = K


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


# ----------------------------------------------------------------------- spmm with a bias
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_spmm_with_bias_matches_dense(backend, dtype, case):
    # The CPU kernels start each row's sums from its bias (empty rows: the bias alone); the reference
    # adds it after the product.
    M, K, N, density, b, er, ec, extra = case
    m = random_matrix(M, K, density, block_size=b, dtype=dtype, capacity_extra=extra, empty_rows=er,
                      empty_cols=ec, seed=M * 7 + K)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(K, N, generator=g, dtype=torch.float64)
    bias = torch.randn(M, generator=g, dtype=torch.float64)
    w, wabs = _dense_pair(m, dtype)
    with ops.use_backend(backend):
        y = torch.ops.sparsestart.spmm(m.values.detach(), *m.index_tensors(), x.to(dtype), bias.to(dtype))
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_to_reference(y, w @ x + bias[:, None], wabs @ x.abs() + bias.abs()[:, None], dtype)


# (M, K, N, density, block size, L2 bytes or None): the CPU kernel's paths -- K panels, chunks of
# positions (tile-outer), row-outer (fewer entries than x has rows), N split across threads, BSR.
BIAS_PATHS = [(64, 2000, 40, 0.9, 1, 4096), (300, 1000, 40, 0.3, 1, None), (50, 5000, 40, 0.001, 1, None),
              (40, 64, 1100, 0.3, 1, None), (48, 64, 1100, 0.3, 4, None), (48, 64, 40, 0.5, 4, None)]


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="C++ extension not built")
@pytest.mark.parametrize("case", BIAS_PATHS, ids=[f"{c[0]}x{c[1]}xN{c[2]}-d{c[3]}-b{c[4]}-L2{c[5]}"
                                                  for c in BIAS_PATHS])
def test_fused_bias_on_every_cpu_kernel_path(monkeypatch, case):
    M, K, N, density, b, l2 = case
    if l2 is not None:
        monkeypatch.setenv("SPARSESTART_L2_BYTES", str(l2))
    m = random_matrix(M, K, density, block_size=b, dtype=torch.float32, empty_rows=(1,), seed=M + N)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, N, generator=g, dtype=torch.float64)
    bias = torch.randn(M, generator=g, dtype=torch.float64)
    w, wabs = _dense_pair(m, torch.float32)
    with ops.use_backend("cpu"), threads(2):
        y = torch.ops.sparsestart.spmm(m.values.detach(), *m.index_tensors(), x.float(), bias.float())
    assert_close_to_reference(y, w @ x + bias[:, None], wabs @ x.abs() + bias.abs()[:, None], torch.float32)


@pytest.mark.parametrize("b", [1, 2])
def test_spmm_bias_opcheck(b):
    m, idx, values, x, dy = _opcheck_args(b)
    bias = torch.randn(6, requires_grad=True)
    S = torch.ops.sparsestart
    torch.library.opcheck(S.spmm.default, (values, *idx, x, bias))
    if ops.NATIVE_AVAILABLE:
        rowptr, col, slot = idx[:3]
        torch.library.opcheck(S._native_spmm_bias.default, (values.detach(), rowptr, col, slot, x.detach(), 6,
                                                            bias.detach()),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spmm_rejects_a_bad_bias(backend):
    m, idx, values, x, dy = _opcheck_args(1)
    S = torch.ops.sparsestart
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"bias must be 1-D with one entry per output row \(6\), got shape \(5,\)"):
            S.spmm(values, *idx, x, torch.zeros(5))
        with pytest.raises(ValueError, match=r"bias must be 1-D .* got shape \(6, 1\)"):
            S.spmm(values, *idx, x, torch.zeros(6, 1))
        with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has torch.float32"):
            S.spmm(values, *idx, x, torch.zeros(6, dtype=torch.float64))
