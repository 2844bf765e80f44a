"""torch.func over sparse layers: grad, vmap, per-sample gradients (vmap of grad), forward mode (jvp,
jacfwd) and second derivatives (hessian = jacfwd of jacrev; jacrev of jacrev for SparseLinear).

torch.library's autograd wrapper for custom ops does not run under torch.func (torch.func.grad of a
sparse model raised "must override the setup_context staticmethod"); the layers now take an
autograd.Function of their own there, and the ops have batching rules (sparsestart/ops/batching.py).
Every result is compared with plain autograd: per-sample gradients with a loop over the samples.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

from sparsestart.nn import SparseConv2d, SparseLinear


def _mlp(fmt: str) -> nn.Module:
    block = {"format": "bsr", "block_size": 2} if fmt == "bsr" else {}
    torch.manual_seed(0)
    return nn.Sequential(SparseLinear(8, 12, density=0.5, seed=0, **block), nn.Tanh(),
                         SparseLinear(12, 4, density=0.6, seed=1, **block)).double()


def _convnet(algorithm: str) -> nn.Module:
    torch.manual_seed(0)
    stride = 2 if algorithm == "unfold" else 1
    conv = SparseConv2d(3, 4, 3, stride=stride, padding=1, density=0.5, seed=0)
    conv.conv_algorithm = algorithm
    side = 6 // stride
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), SparseLinear(4 * side * side, 3, density=0.5, seed=1)).double()


MODELS = {"mlp-csr": (lambda: _mlp("csr"), (8,)), "mlp-bsr": (lambda: _mlp("bsr"), (8,)),
          "conv-direct": (lambda: _convnet("direct"), (3, 6, 6)), "conv-unfold": (lambda: _convnet("unfold"), (3, 6, 6)),
          "conv-dense": (lambda: _convnet("dense"), (3, 6, 6))}


def _loss_fn(model):
    buffers = dict(model.named_buffers())

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
    return loss


def _data(shape, n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _eager_grads(model, x, y) -> dict:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _problem(name: str):
    """(model, x, y, detached parameters) of MODELS[name]."""
    build, shape = MODELS[name]
    model = build()
    x, y = _data(shape)
    return model, x, y, {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
def test_func_grad_equals_autograd(name):
    model, x, y, params = _problem(name)
    got = grad(_loss_fn(model))(params, x, y)
    expected = _eager_grads(model, x, y)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients_equal_a_loop_over_the_samples(name):
    model, x, y, params = _problem(name)
    loss = _loss_fn(model)
    per_sample = vmap(grad(lambda p, xi, yi: loss(p, xi[None], yi[None])), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        expected = _eager_grads(model, x[i:i + 1], y[i:i + 1])
        for k in expected:
            torch.testing.assert_close(per_sample[k][i], expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_vmap_of_the_forward_equals_a_loop(name):
    """A batch of batches through the batching rules (folded into one call where only the input is batched)."""
    build, shape = MODELS[name]
    model = build()
    xs = torch.randn(3, 2, *shape, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([model(x) for x in xs])
        got = vmap(model)(xs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_vmap_over_batched_weights_runs_one_call_per_entry():
    """Ensembles: a batch of value tensors (same structure) through functional_call and vmap."""
    model = _mlp("csr")
    x, _ = _data((8,))
    names = [k for k, _ in model.named_parameters()]
    stacked = {k: torch.stack([p.detach() * (1 + i) for i in range(3)]) for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    got = vmap(lambda p: functional_call(model, (p, buffers), (x,)))(stacked)
    for i in range(3):
        with torch.no_grad():
            expected = functional_call(model, ({k: stacked[k][i] for k in names}, buffers), (x,))
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


def _dense_twin(model: nn.Module) -> nn.Module:
    """The model with every sparse layer replaced by its dense torch twin (the kept weights, zeros elsewhere)."""
    return nn.Sequential(*[m.to_dense() if isinstance(m, (SparseLinear, SparseConv2d)) else m for m in model])


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_mode_and_hessians_equal_the_dense_twin(name):
    model, x, _, _ = _problem(name)
    dense = _dense_twin(model)
    x0 = x[:1]
    tangent = torch.randn_like(x0)
    for f in (model, dense):
        f.zero_grad(set_to_none=True)
    (out_s, dir_s), (out_d, dir_d) = (jvp(m, (x0,), (tangent,)) for m in (model, dense))
    torch.testing.assert_close(out_s, out_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dir_s, dir_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jacfwd(model)(x0), jacfwd(dense)(x0), rtol=1e-10, atol=1e-12)

    def scalar(m):
        return lambda v: torch.tanh(m(v)).square().sum()
    torch.testing.assert_close(hessian(scalar(model))(x0), hessian(scalar(dense))(x0), rtol=1e-9, atol=1e-11)
    if name.startswith("mlp"):  # reverse over reverse: SparseLinear's formulas are differentiable again
        torch.testing.assert_close(jacrev(jacrev(scalar(model)))(x0), hessian(scalar(dense))(x0), rtol=1e-9,
                                   atol=1e-11)


def test_forward_mode_with_respect_to_the_values():
    """jvp in the direction of a change of the stored values (and bias) equals the dense twin's in the same
    direction of its weight."""
    model, x, _, params = _problem("conv-direct")
    conv = model[0]
    tangents = {k: torch.randn_like(p) for k, p in params.items()}
    buffers = dict(model.named_buffers())
    _, got = jvp(lambda p: functional_call(model, (p, buffers), (x,)), (params,), (tangents,))
    eps = 1e-5
    with torch.no_grad():  # central difference: exact to O(eps^2)
        ahead, behind = ({k: p + sign * eps * tangents[k] for k, p in params.items()} for sign in (1, -1))
        fd = (functional_call(model, (ahead, buffers), (x,)) - functional_call(model, (behind, buffers), (x,))) / (2 * eps)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)
    assert conv.conv_algorithm == "direct"
