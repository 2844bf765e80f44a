"""sparsify / densify keep what the model says about its layers: sharing, ties, frozen weights, hooks, mode."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart.nn import SparseConv2d, SparseLayer, SparseLinear, maskable_layers


def _twice() -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    return nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 3)), lin


# ---------------------------------------------------------------------------- shared modules
def test_a_module_used_twice_is_replaced_everywhere_by_one_sparse_module():
    model, _ = _twice()
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    assert isinstance(model[0], SparseLinear)
    assert model[2] is model[0]  # still one module: one set of values, trained once
    assert model[0].nnz == 32  # counted once in the budget
    x = torch.randn(4, 8)
    layer = model[0]
    torch.testing.assert_close(model(x), model[3](layer(torch.relu(layer(x)))))


def test_excluding_a_shared_module_by_any_of_its_names_keeps_it_dense_everywhere():
    for name in ("0", "2"):
        model, lin = _twice()
        sparsestart.sparsify(model, 0.5, "uniform", seed=0, exclude=[name])
        assert model[0] is lin and model[2] is lin
        assert isinstance(model[3], SparseLinear)


def test_maskable_layers_lists_a_shared_module_once_and_check_exclude_knows_every_name():
    model, lin = _twice()
    assert [n for n, _ in maskable_layers(model)] == ["0", "3"]
    sparsestart.nn.check_exclude(model, ["2"])  # "2" names the shared module: no error


def test_densify_keeps_a_shared_sparse_module_shared():
    model, _ = _twice()
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    x = torch.randn(4, 8)
    y = model(x)
    sparsestart.densify(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]
    torch.testing.assert_close(model(x), y)


# ---------------------------------------------------------------------------- tied weights
def test_two_linear_sharing_one_weight_are_refused_with_both_paths():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(nn.Sequential(a), nn.ReLU(), nn.Sequential(b))
    with pytest.raises(ValueError, match=r"'0\.0'.*'2\.0'|'2\.0'.*'0\.0'") as info:
        sparsestart.sparsify(model, 0.5, seed=0)
    assert "exclude" in str(info.value)
    assert model[0][0] is a and model[2][0] is b  # nothing replaced


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 10, bias=False)
        self.decoder.weight = self.emb.weight

    def forward(self, tokens):
        return self.decoder(torch.relu(self.hidden(self.emb(tokens))))


def test_embedding_decoder_tying_is_refused_and_exclude_is_the_way_out():
    model = _TiedLM()
    with pytest.raises(ValueError, match=r"'decoder'.*'emb'"):
        sparsestart.sparsify(model, 0.5, seed=0)
    sparsestart.sparsify(model, 0.5, seed=0, exclude=["decoder"])
    assert isinstance(model.hidden, SparseLinear)
    assert model.decoder.weight is model.emb.weight  # still tied


def test_a_tied_bias_is_refused_too():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.bias = a.bias
    with pytest.raises(ValueError, match="bias"):
        sparsestart.sparsify(nn.Sequential(a, b), 0.5, seed=0)


# ---------------------------------------------------------------------------- frozen layers
def test_a_frozen_layer_stays_frozen_and_densify_carries_it_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    assert isinstance(model[0], SparseConv2d)
    assert not model[0].values.requires_grad and not model[0].bias.requires_grad
    assert model[2].values.requires_grad and not model[2].bias.requires_grad
    model(torch.randn(2, 2, 4, 4)).sum().backward()
    assert model[0].values.grad is None and model[2].values.grad is not None
    sparsestart.densify(model)
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert model[2].weight.requires_grad and not model[2].bias.requires_grad


# ---------------------------------------------------------------------------- hooks
def test_forward_hooks_and_pre_hooks_follow_the_layer_and_their_handles_still_remove_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    seen = []
    pre = model[0].register_forward_pre_hook(lambda mod, args: seen.append(("pre", type(mod).__name__)))
    kw = model[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.append(("pre_kw", type(mod).__name__)),
                                            with_kwargs=True)
    post = model[2].register_forward_hook(lambda mod, args, out: out * 0.0)  # a hook that changes the output
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    out = model(torch.randn(3, 6))
    assert seen == [("pre", "SparseLinear"), ("pre_kw", "SparseLinear")]
    assert torch.equal(out, torch.zeros(3, 2))
    for handle in (pre, kw, post):
        handle.remove()
    seen.clear()
    assert model(torch.randn(3, 6)).abs().sum() > 0 and seen == []


def test_module_backward_hooks_follow_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    grads = []
    model[2].register_full_backward_hook(lambda mod, gin, gout: grads.append(type(mod).__name__))
    model[2].register_full_backward_pre_hook(lambda mod, gout: grads.append("pre"))
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    model(torch.randn(3, 6, requires_grad=True)).sum().backward()
    assert grads == ["pre", "SparseLinear"]


def test_hooks_follow_densify():
    model = nn.Sequential(nn.Linear(6, 2))
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    seen = []
    model[0].register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    sparsestart.densify(model)
    model(torch.randn(1, 6))
    assert seen == ["Linear"]


def test_a_gradient_hook_on_the_weight_is_refused():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    model[1].weight.register_hook(lambda g: g * 2)
    with pytest.raises(ValueError, match=r"'1'.*weight"):
        sparsestart.sparsify(model, 0.5, seed=0)
    assert type(model[0]) is nn.Linear  # refused before anything was replaced


# ---------------------------------------------------------------------------- train / eval mode
def test_eval_mode_is_kept_per_layer_both_ways():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    model.eval()
    model[1].train()
    sparsestart.sparsify(model, 0.5, "uniform", seed=0)
    assert [m.training for m in model] == [False, True, False]
    sparsestart.densify(model)
    assert [m.training for m in model] == [False, True, False]


# ---------------------------------------------------------------------------- exclude, root module
def test_exclude_still_leaves_matched_layers_dense_with_the_new_carrying():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    model.eval()
    sparsestart.sparsify(model, 0.5, "uniform", seed=0, exclude="0.*")
    assert [type(m).__name__ for m in (model[0][0], model[0][1], model[1])] == ["Linear", "Linear", "SparseLinear"]
    assert not model[1].values.requires_grad and not model[1].training
    with pytest.raises(ValueError, match="matches no Linear/Conv2d"):
        sparsestart.nn.check_exclude(model, ["typo"])


def test_a_bare_layer_is_returned_sparse_and_back():
    lin = nn.Linear(8, 4).eval()
    lin.weight.requires_grad_(False)
    sparse = sparsestart.sparsify(lin, 0.5, "uniform", seed=0)
    assert isinstance(sparse, SparseLinear) and sparse.nnz == 16
    assert not sparse.training and not sparse.values.requires_grad
    assert dict(lin.named_children()) == {}  # the dense layer was not given the sparse one as a child
    dense = sparsestart.densify(sparse)
    assert type(dense) is nn.Linear and not dense.weight.requires_grad and not dense.training
    assert not any(isinstance(m, SparseLayer) for m in dense.modules())


# ---------------------------------------------------------------------------- imports
@pytest.mark.parametrize("first", ["sparsestart.init.densities", "sparsestart.init.flow", "sparsestart.nn.walk",
                                   "sparsestart.nn.convert", "sparsestart.init.cli"])
def test_every_module_imports_first_in_a_fresh_interpreter(first):
    r = subprocess.run([sys.executable, "-c", f"import {first}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
