"""torch.autocast through the sparse ops and layers (issue 13, "Precision").

Under ``torch.autocast(device_type, dtype)`` the public ops cast their floating operands to the
autocast dtype (bfloat16; float16 too on CUDA), the kernels accumulate in float32, the output is in
the autocast dtype (as nn.Linear's), and the float32 ``values``/``bias`` parameters get float32
gradients (fp32 master weights). Checked against float64 on the bfloat16-rounded operands (tight)
and against the float32 layer (loose), forward and backward, eagerly and under torch.compile.
On CPU the C++ kernels run bfloat16 through float32 (ops/library.py), the reference in float32.
"""
import pytest
import torch
from torch import nn

from sparsestart import ops
from sparsestart.nn import SparseConv2d, SparseLinear
from tests.util import random_matrix, rel_err

CUDA = torch.cuda.is_available()
no_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CPU_BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or ops.NATIVE_AVAILABLE]
# (device, autocast dtype, backend or None for the automatic choice)
SETTINGS = ([("cpu", torch.bfloat16, b) for b in CPU_BACKENDS]
            + [pytest.param("cuda", dt, None, marks=no_gpu) for dt in (torch.bfloat16, torch.float16)])
SETTING_IDS = ([f"cpu-bf16-{b}" for b in CPU_BACKENDS] + ["cuda-bf16", "cuda-fp16"])
LOOSE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # max error relative to the largest entry vs float32


def _eps(dtype):
    return torch.finfo(dtype).eps


def _grads(layer, x, g, autocast_dtype=None):
    """Output and (input, values, bias) gradients of ``layer`` at ``x`` for output gradient ``g``."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    if autocast_dtype is None:
        y = layer(x)
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            y = layer(x)
    y.backward(g.to(y.dtype))
    return y, x.grad, layer.values.grad, None if layer.bias is None else layer.bias.grad


def _check_layer(layer, x, device, dtype, backend):
    layer = layer.to(device)
    x = x.to(device)
    ref_layer = layer.to_dense()  # float32 dense twin
    g = torch.randn(ref_layer(x).shape, device=device)
    with ops.use_backend(backend):
        y, dx, dv, db = _grads(layer, x, g, dtype)
        y32, dx32, dv32, db32 = _grads(layer, x, g)
    # dtypes as with torch's own layers under autocast
    with torch.autocast(device, dtype=dtype):
        y_dense = ref_layer(x)
    assert y.dtype == y_dense.dtype == dtype
    assert dx.dtype == torch.float32 and dv.dtype == torch.float32 and layer.values.dtype == torch.float32
    assert db is None or db.dtype == torch.float32
    # close to the float32 computation
    tol = LOOSE[dtype]
    assert rel_err(y.float(), y32) <= tol
    assert rel_err(dx, dx32) <= tol
    assert rel_err(dv, dv32) <= tol
    if db is not None:
        assert rel_err(db, db32) <= tol
    # free slots get exactly zero gradient
    m = layer.sparse_weight
    assert bool((dv[m.slot[m.nnz:].long()] == 0).all())
    return y


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("fmt,b", [("csr", None), ("bsr", 4), ("bsr", 16)])
def test_sparse_linear_under_autocast(device, dtype, backend, fmt, b):
    layer = SparseLinear(96, 48, density=0.4, format=fmt, block_size=b, capacity=None, seed=1)
    layer.set_capacity(layer.sparse_weight.nnz + 2)  # free slots
    x = torch.randn(3, 5, 96)
    y = _check_layer(layer, x, device, dtype, backend)
    # Tight: float64 on the rounded operands, one rounding of the product and one of the bias add.
    xr = x.to(device).to(dtype).double()
    w = layer.dense_weight().detach().to(dtype).double()
    br = layer.bias.detach().to(dtype).double()
    ref = xr @ w.T + br
    bound = xr.abs() @ w.abs().T + br.abs()
    assert bool(((y.double() - ref).abs() <= (2 * _eps(dtype) + 64 * _eps(torch.float32)) * bound + 1e-30).all())


CONV_CASES = [("direct", dict(kernel_size=3, padding=1), "csr", None),
              ("unfold", dict(kernel_size=3, stride=2, padding=1), "csr", None),
              ("unfold", dict(kernel_size=2, padding=1), "bsr", 4),
              ("dense", dict(kernel_size=3, padding=1), "csr", None)]


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("algorithm,cfg,fmt,b", CONV_CASES, ids=[f"{c[0]}-{c[2]}" for c in CONV_CASES])
def test_sparse_conv2d_under_autocast(device, dtype, backend, algorithm, cfg, fmt, b):
    layer = SparseConv2d(8, 16, density=0.5, format=fmt, block_size=b, seed=2, **cfg)
    layer.conv_algorithm = algorithm
    _check_layer(layer, torch.randn(2, 8, 7, 6), device, dtype, backend)


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=SETTING_IDS)
def test_raw_ops_under_autocast(device, dtype, backend):
    """The ops themselves follow autocast: fp32 operands in, the autocast dtype out; float64 is left
    alone (as torch's autocast does)."""
    m = random_matrix(24, 16, 0.5, dtype=torch.float32)
    idx = [t.to(device) for t in m.index_tensors()]
    v = m.values.detach().to(device)
    x, dy = torch.randn(16, 5, device=device), torch.randn(24, 5, device=device)
    S = torch.ops.sparsestart
    with ops.use_backend(backend), torch.autocast(device, dtype=dtype):
        y, dx, dv = S.spmm(v, *idx, x), S.spmm_t(v, *idx, dy), S.sddmm(*idx, dy, x, m.capacity, 1)
        y64 = S.spmm(v.double(), *idx, x.double())
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert y64.dtype == torch.float64
    w = m.to_dense().detach().to(device)
    assert rel_err(y.float(), w @ x) <= LOOSE[dtype]
    assert rel_err(dx.float(), w.T @ dy) <= LOOSE[dtype]
    mask = m.mask().to(device)
    dense_dv = type(m)(dv.float().cpu(), *m.index_tensors(), m.shape).to_dense().to(device)
    assert rel_err(dense_dv, (dy @ x.T) * mask) <= LOOSE[dtype]


@pytest.mark.parametrize("device,dtype,backend", SETTINGS, ids=SETTING_IDS)
def test_optimizer_state_stays_float32(device, dtype, backend):
    """fp32 master weights: an optimizer step under autocast training keeps values, grads and momentum
    in float32 (the same as a float32 step up to bfloat16 rounding of the gradient)."""
    layer = SparseLinear(32, 16, density=0.5, seed=3).to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 32, device=device)
    with ops.use_backend(backend):
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = layer(x).float().square().mean()
            loss.backward()
            opt.step()
    assert layer.values.dtype == layer.values.grad.dtype == torch.float32
    assert opt.state[layer.values]["momentum_buffer"].dtype == torch.float32


def test_autocast_matches_nn_linear_semantics():
    """Same dtypes as nn.Linear under CPU autocast: bf16 output, fp32 parameter and input gradients."""
    sparse = SparseLinear(16, 8, density=1.0, seed=4)
    dense = sparse.to_dense()
    x1, x2 = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = sparse(x1), dense(x2)
    assert y1.dtype == y2.dtype
    y1.float().sum().backward()
    y2.float().sum().backward()
    assert sparse.values.grad.dtype == dense.weight.grad.dtype
    assert sparse.bias.grad.dtype == dense.bias.grad.dtype
    assert x1.grad.dtype == x2.grad.dtype


def test_autocast_on_another_device_type_changes_nothing():
    layer = SparseLinear(16, 8, density=0.5, seed=5)
    x = torch.randn(2, 16)
    with torch.autocast("cuda", dtype=torch.float16, enabled=CUDA):  # CPU tensors: not affected
        y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=no_gpu)])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_autocast_under_torch_compile(device, compile_backend):
    """torch.compile traces through the autocast rule of the custom ops (the op stays opaque)."""
    torch._dynamo.reset()
    model = nn.Sequential(SparseLinear(32, 24, density=0.5, seed=6), nn.ReLU(),
                          SparseLinear(24, 8, density=0.5, format="bsr", block_size=4, seed=7)).to(device)
    x = torch.randn(6, 32, device=device)

    def step(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(x)

    y_eager = step(x)
    y_eager.float().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    y = torch.compile(step, backend=compile_backend, fullgraph=True)(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), y_eager.float()) <= 1e-2
    y.float().sum().backward()
    for p, g in zip(model.parameters(), grads):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, g) <= 2e-2


def test_opcheck_under_autocast():
    m = random_matrix(6, 4, 0.5, dtype=torch.float32, capacity_extra=1, seed=5)
    idx = m.index_tensors()
    values = m.values.detach().clone().requires_grad_()
    x, dy = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    S = torch.ops.sparsestart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.library.opcheck(S.spmm.default, (values, *idx, x))
        torch.library.opcheck(S.spmm_t.default, (values, *idx, dy))
        torch.library.opcheck(S.sddmm.default, (*idx, dy, x, m.capacity, 1))
