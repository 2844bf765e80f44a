"""Direct sparse convolution ops (stride 1, CSR) against dense F.conv2d in float64."""
import pytest
import torch
import torch.nn.functional as F

from sparsestart import ops
from sparsestart.ops import library
from tests.util import assert_close_to_reference, random_matrix, threads

BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or ops.NATIVE_AVAILABLE]
S = torch.ops.sparsestart

# (N, Cin, Cout, H, W, kernel, padding, dilation, density)
CASES = [
    (2, 3, 5, 9, 8, (3, 3), (1, 1), (1, 1), 0.4),
    (1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1.0),
    (3, 4, 6, 7, 33, (3, 3), (0, 0), (1, 1), 0.3),
    (2, 2, 3, 8, 8, (3, 2), (2, 1), (2, 1), 0.5),
    (2, 5, 4, 17, 9, (5, 5), (3, 1), (1, 2), 0.2),   # padding larger than needed
    (2, 3, 4, 6, 6, (3, 3), (1, 1), (1, 1), 0.0),    # nnz = 0
    (1, 16, 8, 8, 8, (3, 3), (1, 1), (1, 1), 1.0),   # dense, 8x8 maps
    (2, 4, 3, 5, 19, (1, 1), (0, 0), (1, 1), 0.5),   # 1x1
    (19, 2, 3, 5, 6, (3, 3), (3, 2), (1, 1), 0.5),   # padding beyond the kernel; batch not a multiple of the chunks
    (37, 8, 6, 2, 2, (3, 3), (1, 1), (1, 1), 0.5),   # 2x2 maps: groups of 16 samples per flat row, last one short
    (21, 5, 7, 4, 3, (3, 2), (2, 1), (2, 1), 0.4),   # small maps, dilation, uneven padding: groups of 7
    # Enough channels for the kernels' channel blocks (csrc/cpu/conv.cpp, ChannelBlocks): 48 input
    # channels at 20x20 are 2-3 blocks in the forward, 40 output channels 2 in the input gradient,
    # more in float64 and in the weight gradient's wider tile; at density 0.02 most rows have entries
    # in some blocks only (a row's first block with entries may be a later one).
    (2, 48, 40, 20, 20, (3, 3), (1, 1), (1, 1), 0.3),
    (3, 48, 40, 20, 20, (3, 3), (1, 1), (1, 1), 0.02),
]


def _setup(case, dtype, seed=0):
    n, cin, cout, h, w, k, p, d, density = case
    m = random_matrix(cout, cin * k[0] * k[1], density, dtype=dtype, capacity_extra=2, empty_rows=(0,),
                      seed=seed + cin * 7 + h)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    wd = m.to_dense().detach().double().reshape(cout, cin, *k)
    y = F.conv2d(x, wd, padding=p, dilation=d)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    return m, x, wd, y, dy, k, p, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conv_ops_match_dense(backend, dtype, case):
    m, x, wd, y_ref, dy, k, p, d = _setup(case, dtype)
    idx = m.index_tensors()
    geo = (list(k), list(p), list(d))
    with ops.use_backend(backend):
        y = S.conv2d(m.values, *idx, x.to(dtype), *geo)
        dx = S.conv2d_input_grad(m.values, *idx, dy.to(dtype), *geo)
        dv = S.conv2d_weight_grad(*idx, dy.to(dtype), x.to(dtype), m.capacity, *geo)
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert_close_to_reference(y, y_ref, F.conv2d(x.abs(), wd.abs(), padding=p, dilation=d), dtype)
    dx_ref = torch.nn.grad.conv2d_input(x.shape, wd, dy, padding=p, dilation=d)
    dx_bound = torch.nn.grad.conv2d_input(x.shape, wd.abs(), dy.abs(), padding=p, dilation=d)
    assert_close_to_reference(dx, dx_ref, dx_bound, dtype)
    dw_ref = torch.nn.grad.conv2d_weight(x, wd.shape, dy, padding=p, dilation=d).reshape(m.shape) * m.mask()
    dw_bound = torch.nn.grad.conv2d_weight(x.abs(), wd.shape, dy.abs(), padding=p, dilation=d).reshape(m.shape)
    got = type(m)(dv, *idx, m.shape).to_dense()
    assert_close_to_reference(got, dw_ref, dw_bound * m.mask(), dtype)
    assert bool((dv[m.slot[m.nnz:].long()] == 0).all())


@pytest.mark.parametrize("chunk_elements", [1, 300, 10**9])
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8], CASES[9]],
                         ids=["2x3x9x8", "nnz0", "batch19", "2x2maps"])
def test_unfolded_conv_kernels_bound_the_unfolded_input_by_batch_chunks(monkeypatch, chunk_elements, case):
    # The GPU backends' convolutions (and the reference's) unfold the input: KH*KW times its size.
    # They run the batch in chunks whose unfolded input stays within UNFOLD_CHUNK_ELEMENTS (one
    # sample at least): results equal the dense convolution for any chunking, and no unfold exceeds
    # the bound by more than one sample. Also an empty batch.
    from sparsestart.ops import reference
    monkeypatch.setattr(reference, "UNFOLD_CHUNK_ELEMENTS", chunk_elements)
    sizes = []
    unfold = F.unfold

    def recording(x, *args, **kwargs):
        out = unfold(x, *args, **kwargs)
        sizes.append((out.numel(), out[:1].numel()))
        return out
    monkeypatch.setattr(F, "unfold", recording)
    m, x, wd, y_ref, dy, k, p, d = _setup(case, torch.float64)
    idx = m.index_tensors()
    geo = (list(k), list(p), list(d))
    with ops.use_backend("reference"):
        y = S.conv2d(m.values, *idx, x, *geo)
        dx = S.conv2d_input_grad(m.values, *idx, dy, *geo)
        dv = S.conv2d_weight_grad(*idx, dy, x, m.capacity, *geo)
        assert S.conv2d(m.values, *idx, x[:0], *geo).shape == (0, *y_ref.shape[1:])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, torch.nn.grad.conv2d_input(x.shape, wd, dy, padding=p, dilation=d))
    dw = torch.nn.grad.conv2d_weight(x, wd.shape, dy, padding=p, dilation=d).reshape(m.shape) * m.mask()
    torch.testing.assert_close(type(m)(dv, *idx, m.shape).to_dense(), dw)
    assert sizes and all(total <= max(chunk_elements, one) for total, one in sizes)
    if chunk_elements == 1:  # one sample per chunk
        assert len(sizes) >= 2 * x.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_gradcheck(backend):
    m, x, wd, y, dy, k, p, d = _setup(CASES[3], torch.float64, seed=1)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = x[:, :, :5, :6].clone().requires_grad_()
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v, x: S.conv2d(v, *idx, x, list(k), list(p), list(d)), (values, x))


def test_conv_opcheck():
    m, x, wd, y, dy, k, p, d = _setup(CASES[0], torch.float32, seed=2)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = x.float().requires_grad_()
    geo = (list(k), list(p), list(d))
    torch.library.opcheck(S.conv2d.default, (values, *idx, x, *geo))
    torch.library.opcheck(S.conv2d_input_grad.default, (values.detach(), *idx, dy.float(), *geo),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(S.conv2d_weight_grad.default, (*idx, dy.float(), x.detach(), m.capacity, *geo),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    if ops.NATIVE_AVAILABLE:
        torch.library.opcheck(S._native_conv2d.default, (values.detach(), idx[0], idx[1], idx[2], x.detach(), *geo),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_conv_bad_input():
    m, x, wd, y, dy, k, p, d = _setup(CASES[0], torch.float32)
    idx = m.index_tensors()
    with pytest.raises(ValueError, match="x has 4 channels but the sparse weight needs 3"):
        S.conv2d(m.values, *idx, torch.randn(2, 4, 9, 8), list(k), list(p), list(d))
    with pytest.raises(TypeError, match="dtype"):
        S.conv2d(m.values, *idx, x, list(k), list(p), list(d))  # float64 x, float32 weight
    with pytest.raises(ValueError, match="4-D"):
        S.conv2d(m.values, *idx, x[0].float(), list(k), list(p), list(d))


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="C++ extension not built")
@pytest.mark.parametrize("case", [CASES[2], CASES[8], CASES[9]], ids=["3x33", "batch19", "2x2-groups"])
def test_conv_cpu_same_bits_for_any_thread_count(case):
    """The kernels promise one summation order whatever the thread count (and run to run)."""
    m, x, wd, y, dy, k, p, d = _setup(case, torch.float32, seed=3)
    idx, geo = m.index_tensors(), (list(k), list(p), list(d))
    runs = []
    for n_threads in (1, 2, 2):
        with threads(n_threads), ops.use_backend("cpu"):
            runs.append((S.conv2d(m.values, *idx, x.float(), *geo),
                         S.conv2d_input_grad(m.values, *idx, dy.float(), *geo),
                         S.conv2d_weight_grad(*idx, dy.float(), x.float(), m.capacity, *geo)))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# ------------------------------------------------------------------ fused bias
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[9], CASES[10]],
                         ids=["3x3", "1x1", "nnz0", "2x2-groups", "dilation"])
def test_conv_bias_is_added_per_output_channel(backend, dtype, case):
    """conv2d(..., bias) == F.conv2d(x, W, bias), also where a channel has no weights (empty row 0: only the
    bias) and where samples are grouped into one flat row (the bias must not leak across samples)."""
    m, x, wd, y_ref, dy, k, p, d = _setup(case, dtype)
    bias = torch.randn(wd.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    idx, geo = m.index_tensors(), (list(k), list(p), list(d))
    with ops.use_backend(backend):
        y = S.conv2d(m.values, *idx, x.to(dtype), *geo, bias.to(dtype))
    ref = F.conv2d(x, wd, bias, padding=p, dilation=d)
    assert_close_to_reference(y, ref, F.conv2d(x.abs(), wd.abs(), bias.abs(), padding=p, dilation=d), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bias_gradcheck(backend):
    m, x, wd, y, dy, k, p, d = _setup(CASES[3], torch.float64, seed=1)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = x[:, :, :5, :6].clone().requires_grad_()
    bias = torch.randn(wd.shape[0], dtype=torch.float64, requires_grad=True)
    geo = (list(k), list(p), list(d))
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda v, x, b: S.conv2d(v, *idx, x, *geo, b), (values, x, bias))
        # Through the eager fast path (the layers' caller), with and without the bias argument.
        assert torch.autograd.gradcheck(lambda v, x, b: library.call_conv2d(v, *idx, x, *geo, b), (values, x, bias))
        assert torch.autograd.gradcheck(lambda v, x: library.call_conv2d(v, *idx, x, *geo), (values, x))


def test_conv_bias_opcheck():
    m, x, wd, y, dy, k, p, d = _setup(CASES[0], torch.float32, seed=2)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x = x.float().requires_grad_()
    bias = torch.randn(wd.shape[0], requires_grad=True)
    geo = (list(k), list(p), list(d))
    torch.library.opcheck(S.conv2d.default, (values, *idx, x, *geo, bias))
    if ops.NATIVE_AVAILABLE:
        torch.library.opcheck(S._native_conv2d.default,
                              (values.detach(), idx[0], idx[1], idx[2], x.detach(), *geo, bias.detach()),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bad_bias(backend):
    m, x, wd, y, dy, k, p, d = _setup(CASES[0], torch.float32)
    idx, geo, x = m.index_tensors(), (list(k), list(p), list(d)), x.float()
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=r"bias must be 1-D with one entry per output channel \(5\), got shape \(4,\)"):
            S.conv2d(m.values, *idx, x, *geo, torch.zeros(4))
        with pytest.raises(ValueError, match=r"got shape \(1, 5\)"):
            S.conv2d(m.values, *idx, x, *geo, torch.zeros(1, 5))
        with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has torch.float32"):
            S.conv2d(m.values, *idx, x, *geo, torch.zeros(5, dtype=torch.float64))
        with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
            S.conv2d(m.values, *idx, x, *geo, torch.zeros(5, device="meta"))
