"""The eager fast path (library.call_*): the same results and gradients as the ops, taken only when
nothing the dispatcher adds is active, and the op otherwise."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsestart import ops
from sparsestart.nn import SparseConv2d, SparseLinear
from sparsestart.ops import library
from tests.util import random_matrix

S = torch.ops.sparsestart
BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or ops.NATIVE_AVAILABLE]
GEOMETRY = ([3, 3], [1, 1], [1, 1])


def _operands(b, seed=0):
    m = random_matrix(6, 12, 0.5, block_size=b, dtype=torch.float64, capacity_extra=2, empty_rows=(1,), seed=seed)
    g = torch.Generator().manual_seed(seed)
    values = m.values.detach().clone().requires_grad_()
    x = torch.randn(12, 5, dtype=torch.float64, generator=g).requires_grad_()
    dy = torch.randn(6, 5, dtype=torch.float64, generator=g).requires_grad_()
    return m, m.index_tensors(), values, x, dy


def _conv_operands(seed=0):
    m = random_matrix(4, 3 * 9, 0.4, dtype=torch.float64, capacity_extra=1, empty_rows=(0,), seed=seed)
    values = m.values.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    return m, m.index_tensors(), values, x


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 2])
def test_callers_equal_the_ops_in_value_and_gradient(backend, b):
    m, idx, values, x, dy = _operands(b)
    pairs = [
        (lambda: library.call_spmm(values, *idx, x), lambda: S.spmm(values, *idx, x), (values, x)),
        (lambda: library.call_spmm_t(values, *idx, dy), lambda: S.spmm_t(values, *idx, dy), (values, dy)),
        (lambda: library.call_sddmm(*idx, dy, x, m.capacity, b), lambda: S.sddmm(*idx, dy, x, m.capacity, b), (dy, x)),
    ]
    with ops.use_backend(backend):
        for fast, op, inputs in pairs:
            got, want = fast(), op()
            assert torch.equal(got, want)
            for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
                assert torch.equal(g, w)
            with torch.no_grad():
                assert torch.equal(fast(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_caller_equals_the_op(backend):
    m, idx, values, x = _conv_operands()
    with ops.use_backend(backend):
        got, want = library.call_conv2d(values, *idx, x, *GEOMETRY), S.conv2d(values, *idx, x, *GEOMETRY)
        assert torch.equal(got, want)
        for g, w in zip(_grads(got, (values, x)), _grads(want, (values, x))):
            assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck_through_the_callers(backend):
    # Double backward: the backward formulas call the callers too, which must stay differentiable
    # when the backward itself is recorded (create_graph=True).
    m, idx, values, x, dy = _operands(1, seed=3)
    _, cidx, cvalues, cx = _conv_operands(seed=4)
    with ops.use_backend(backend):
        for f, inputs in [(lambda v, x: library.call_spmm(v, *idx, x), (values, x)),
                          (lambda v, d: library.call_spmm_t(v, *idx, d), (values, dy)),
                          (lambda d, x: library.call_sddmm(*idx, d, x, m.capacity, 1), (dy, x))]:
            assert torch.autograd.gradcheck(f, inputs)
            assert torch.autograd.gradgradcheck(f, inputs)
        assert torch.autograd.gradcheck(lambda v, x: library.call_conv2d(v, *cidx, x, *GEOMETRY), (cvalues, cx))


def test_plain_eager_calls_skip_the_dispatcher():
    m, idx, values, x, dy = _operands(1)
    y = library.call_spmm(values, *idx, x)
    assert type(y.grad_fn).__name__ == "_SpmmFunctionBackward"
    layer = SparseLinear(12, 6, density=0.5)
    layer.linear_algorithm = "sparse"
    out = layer(torch.randn(3, 12))
    # the bias add sits on top; the sparse product below it comes from the fast path
    assert "_SpmmFunctionBackward" in {type(f[0]).__name__ for f in _walk(out.grad_fn)}


def _walk(fn, seen=None):
    seen = set() if seen is None else seen
    out = []
    for nxt in fn.next_functions:
        if nxt[0] is not None and id(nxt[0]) not in seen:
            seen.add(id(nxt[0]))
            out.append(nxt)
            out.extend(_walk(nxt[0], seen))
    return out


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_every_op_of_a_layer():
    # A mode (FakeTensorMode, FlopCounterMode, a profiler of ops) must see the sparse ops: the fast
    # path would hide them.
    layer = SparseLinear(12, 6, density=0.5)
    layer.linear_algorithm = "sparse"
    conv = SparseConv2d(3, 4, 3, padding=1, density=0.5)
    conv.conv_algorithm = "direct"
    x = torch.randn(3, 12, requires_grad=True)
    xc = torch.randn(2, 3, 5, 5, requires_grad=True)
    with _Recorder() as rec:
        layer(x).sum().backward()
        conv(xc).sum().backward()
    for name in ("sparsestart.spmm", "sparsestart.sddmm", "sparsestart.spmm_t", "sparsestart.conv2d",
                 "sparsestart.conv2d_weight_grad", "sparsestart.conv2d_input_grad"):
        assert name in rec.names, (name, sorted(set(rec.names)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_on_the_fast_path_equals_the_op(backend):
    # The callers cast as the op's Autocast kernel does (bf16 operands, fp32 values left as the
    # master copy, the gradient arriving in fp32) and run the impl with that kernel's key excluded.
    m, idx, values, x, dy = _operands(1)
    v32 = values.detach().float().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    dy32 = dy.detach().float().requires_grad_()
    with ops.use_backend(backend):
        for fast, op, inputs in [
            (lambda: library.call_spmm(v32, *idx, x32), lambda: S.spmm(v32, *idx, x32), (v32, x32)),
            (lambda: library.call_spmm_t(v32, *idx, dy32), lambda: S.spmm_t(v32, *idx, dy32), (v32, dy32)),
            (lambda: library.call_sddmm(*idx, dy32, x32, m.capacity, 1),
             lambda: S.sddmm(*idx, dy32, x32, m.capacity, 1), (dy32, x32))]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = fast(), op()
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
            assert type(got.grad_fn).__name__.endswith("FunctionBackward")  # the fast path ran
            for g, w in zip(_grads(got, inputs), _grads(want, inputs)):
                assert g.dtype == torch.float32 and torch.equal(g, w)


@pytest.mark.parametrize("context", ["device", "meta", "vmap"])
def test_contexts_that_need_the_dispatcher_take_the_op(context):
    m, idx, values, x, dy = _operands(1)
    if context == "device":
        with torch.device("cpu"):
            assert library._dispatcher_needed([values, x])
            y = library.call_spmm(values, *idx, x)
        assert type(y.grad_fn).__name__ != "_SpmmFunctionBackward"
    elif context == "meta":
        y = library.call_spmm(values.detach().to("meta"), *(t.to("meta") for t in idx), x.detach().to("meta"))
        assert y.is_meta and y.shape == (6, 5)
    else:
        captured = []

        def f(xi):
            captured.append(library._dispatcher_needed([values, xi]))
            return xi * 2
        torch.vmap(f)(x.detach().t())
        assert captured == [True]
    assert not library._dispatcher_needed([values, x])


def test_an_op_without_autograd_needing_gradients_takes_the_op():
    # conv2d_input_grad has no autograd formula: calling its impl directly would silently drop the
    # graph; the op is called instead (and says it is not differentiable, as it always did).
    m, idx, values, x = _conv_operands()
    dy = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError):
        library.call_conv2d_input_grad(values, *idx, dy, *GEOMETRY).sum().backward()
