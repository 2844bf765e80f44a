"""Benchmark regression tracking with pytest-benchmark: kernels, layers and a training step, sparse and dense.

Each group holds a sparse case and its dense torch counterpart on the same data (``torch.ops.sparsestart.spmm``
beside ``torch.mm``, ``SparseLinear`` beside ``nn.Linear``, ...), at sizes where one call takes well under
50 ms on one core. ``make bench-regress`` times them (``--benchmark-enable``), saves a baseline into
``.benchmarks/`` and compares later runs against it (docs/benchmarks.md). ``make test`` runs this file with
benchmarks disabled (the default set in tests/conftest.py): every case then runs once, untimed, and each test
checks that the result it timed equals a float64 reference, so the smoke test checks the cases as well.

The full suites and the documentation tables are ``python -m bench``; this file only guards against slowdowns.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is in requirements-dev.txt")

import sparsestart  # noqa: E402  (registers torch.ops.sparsestart.*)
from sparsestart import nn as snn  # noqa: E402
from sparsestart import runtime  # noqa: E402
from tests.util import assert_close_to_reference, random_matrix, rel_err, threads  # noqa: E402

# One thread: the regression signal of a change, least disturbed by whatever else runs on a small shared machine
# (thread scaling is measured by python -m bench).
THREADS = 1
M = K = 1024  # kernels: W [M, K] at DENSITY, operands with N columns (~3 ms sparse, ~10 ms dense on one core)
N = 128
DENSITY = 0.1
TOL = 1e-4  # float32 against float64, relative to the largest reference entry


@pytest.fixture(autouse=True)
def bench_threads(benchmark):
    if not benchmark.disabled:
        # As python -m bench and sparsestart train: freed memory stays in the process (sparse and dense alike),
        # so that a timing does not depend on page faults of fresh buffers. Not in the smoke test: it is global.
        runtime.retain_freed_memory()
    with threads(THREADS):
        yield


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.fixture(scope="module")
def problem():
    m = random_matrix(M, K, DENSITY, dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(K, N, generator=g), torch.randn(M, N, generator=g)
    return m, m.to_dense().contiguous(), x, dy


def _sampled(full: torch.Tensor, m) -> torch.Tensor:
    """``full`` [M, K] read at the stored entries of ``m``, in its value slots."""
    rows, cols, slots = m.coo()
    out = torch.zeros(m.capacity, dtype=full.dtype)
    out[slots] = full[rows, cols]
    return out


@pytest.mark.benchmark(group="spmm W x")
@pytest.mark.parametrize("impl", ["sparsestart", "torch.mm"])
def test_spmm(benchmark, problem, impl):
    m, wd, x, _ = problem
    if impl == "sparsestart":
        out = benchmark(torch.ops.sparsestart.spmm, m.values, *m.index_tensors(), x)
    else:
        out = benchmark(torch.mm, wd, x)
    w64, x64 = wd.double(), x.double()
    assert_close_to_reference(out, w64 @ x64, w64.abs() @ x64.abs(), torch.float32)


@pytest.mark.benchmark(group="spmm_t W^T dy")
@pytest.mark.parametrize("impl", ["sparsestart", "torch.mm"])
def test_spmm_t(benchmark, problem, impl):
    m, wd, _, dy = problem
    if impl == "sparsestart":
        out = benchmark(torch.ops.sparsestart.spmm_t, m.values, *m.index_tensors(), dy)
    else:
        out = benchmark(torch.mm, wd.t(), dy)
    w64, dy64 = wd.double(), dy.double()
    assert_close_to_reference(out, w64.t() @ dy64, w64.abs().t() @ dy64.abs(), torch.float32)


@pytest.mark.benchmark(group="sddmm (dy x^T) at W")
@pytest.mark.parametrize("impl", ["sparsestart", "torch.mm"])
def test_sddmm(benchmark, problem, impl):
    m, _, x, dy = problem
    full64, bound64 = dy.double() @ x.double().t(), dy.double().abs() @ x.double().abs().t()
    if impl == "sparsestart":
        out = benchmark(torch.ops.sparsestart.sddmm, *m.index_tensors(), dy, x, m.capacity, m.block_size)
        full64, bound64 = _sampled(full64, m), _sampled(bound64, m)  # free slots: 0
    else:
        out = benchmark(torch.mm, dy, x.t())  # dense: every M x K entry
    assert_close_to_reference(out, full64, bound64, torch.float32)


# ---------------------------------------------------------------------------------------------------- layers
def _forward_backward(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """What one training pass of a layer computes: output, input gradient, weight (values) and bias gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(g)
    weight = layer.values if isinstance(layer, snn.SparseLayer) else layer.weight
    return y.detach(), x.grad, weight.grad, layer.bias.grad


def _check_layer(layer: nn.Module, sparse: snn.SparseLayer, result, x, g) -> None:
    """``result`` of :func:`_forward_backward` on ``layer`` (``sparse`` or its dense twin) equals the float64 pass
    of the dense twin; a sparse layer's value gradient is the dense weight gradient at its stored entries."""
    ref = copy.deepcopy(sparse).double().to_dense()
    y64, gx64, gw64, gb64 = _forward_backward(ref, x.double(), g.double())
    y, gx, gw, gb = result
    if layer is sparse:
        m = sparse.sparse_weight
        gw = type(m)(gw, *m.index_tensors(), m.shape).to_dense().reshape(sparse.weight_shape)
        gw64 = gw64 * sparse.mask()
    for name, got, want in (("output", y, y64), ("input grad", gx, gx64), ("weight grad", gw, gw64),
                            ("bias grad", gb, gb64)):
        assert got.shape == want.shape, name
        assert rel_err(got.double(), want) <= TOL, name


@pytest.mark.benchmark(group="SparseLinear 1024->1024 batch 128 fwd+bwd")
@pytest.mark.parametrize("impl", ["SparseLinear", "nn.Linear"])
def test_linear_forward_backward(benchmark, impl):
    sparse = snn.SparseLinear(1024, 1024, density=DENSITY, seed=0)
    layer = sparse if impl == "SparseLinear" else sparse.to_dense()  # the same (masked) weights
    g = torch.Generator().manual_seed(2)
    x, grad_y = torch.randn(128, 1024, generator=g), torch.randn(128, 1024, generator=g)
    result = benchmark(_forward_backward, layer, x, grad_y)
    _check_layer(layer, sparse, result, x, grad_y)


@pytest.mark.benchmark(group="SparseConv2d 3x3 64->64 at 16x16 batch 16 fwd+bwd")
@pytest.mark.parametrize("impl", ["SparseConv2d", "nn.Conv2d"])
def test_conv2d_forward_backward(benchmark, impl):
    sparse = snn.SparseConv2d(64, 64, 3, padding=1, density=DENSITY, seed=0)
    layer = sparse if impl == "SparseConv2d" else sparse.to_dense()
    g = torch.Generator().manual_seed(3)
    x, grad_y = torch.randn(16, 64, 16, 16, generator=g), torch.randn(16, 64, 16, 16, generator=g)
    result = benchmark(_forward_backward, layer, x, grad_y)
    _check_layer(layer, sparse, result, x, grad_y)


# ---------------------------------------------------------------------------------------------- training step
SIZES = [784, 512, 512, 10]
BATCH = 128
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _reference_step(model: nn.Module, x, y):
    """One float64 step of the dense twin of ``model`` whose pruned weights stay zero: (loss, [weight, bias of
    each layer] after it)."""
    twin = sparsestart.densify(copy.deepcopy(model)).double()
    linears = [m for m in twin.modules() if isinstance(m, nn.Linear)]
    masks = [lin.weight != 0 for lin in linears]  # the initial weights are never exactly 0 where stored
    loss = nn.functional.cross_entropy(twin(x.double()), y)
    loss.backward()
    with torch.no_grad():
        for lin, mask in zip(linears, masks):
            lin.weight.grad *= mask  # a sparse layer has no gradient (nor decay, momentum) off its structure
        for p in twin.parameters():  # SGD's first step: the momentum buffer is the gradient
            p -= LR * (p.grad + WD * p)
    return loss.item(), [t for lin in linears for t in (lin.weight, lin.bias)]


@pytest.mark.benchmark(group="training step MLP 784-512-512-10 batch 128 (SGD)")
@pytest.mark.parametrize("impl", ["sparse ERK 0.1", "dense"])
def test_training_step(benchmark, impl):
    torch.manual_seed(0)
    model = sparsestart.models.mlp(SIZES)
    if impl != "dense":
        sparsestart.sparsify(model, DENSITY, "erk", seed=0)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    want_loss, want = _reference_step(model, x, y)
    # The first step is checked; the timed ones continue training the same model (as a training loop does).
    optimizer = _sgd(model)
    loss = _train_step(model, optimizer, x, y)
    assert math.isclose(loss.item(), want_loss, rel_tol=1e-5)
    got = [t for m in model.modules() if isinstance(m, (nn.Linear, snn.SparseLinear))
           for t in (m.dense_weight() if isinstance(m, snn.SparseLayer) else m.weight, m.bias)]
    assert len(got) == len(want) == 2 * (len(SIZES) - 1)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a.detach().double(), b) <= TOL, f"layer {i // 2 + 1} {('weight', 'bias')[i % 2]}"
    later = benchmark(_train_step, model, optimizer, x, y)
    assert math.isfinite(later.item()) and later.item() < want_loss  # training on one batch lowers its loss
