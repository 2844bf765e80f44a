"""Training a sparsified model equals training the dense model whose mask is re-applied after every step."""
import copy

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart.nn import SparseLayer


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 10))


def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_sparse_training_matches_masked_dense(make, opt):
    torch.manual_seed(0)
    sparse = sparsestart.sparsify(make(), 0.1, "uniform", seed=1)
    dense = sparsestart.densify(copy.deepcopy(sparse))
    masks = {n: m.mask() for n, m in sparse.named_modules() if isinstance(m, SparseLayer)}
    opt_s, opt_d = _optimizer(opt, sparse.parameters()), _optimizer(opt, dense.parameters())
    g = torch.Generator().manual_seed(2)
    x_all = torch.randn(100, 8, 1, 8, 8, generator=g)
    teacher = torch.randn(64, 10, generator=g)  # learnable labels: a random linear teacher
    y_all = (x_all.reshape(100, 8, 64) @ teacher).argmax(-1)
    losses_s, losses_d = [], []
    for step in range(100):
        for model, optim, losses in ((sparse, opt_s, losses_s), (dense, opt_d, losses_d)):
            loss = nn.functional.cross_entropy(model(x_all[step]), y_all[step])
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(loss.item())
        with torch.no_grad():
            for name, mask in masks.items():
                dense.get_submodule(name).weight.mul_(mask)
    ls, ld = torch.tensor(losses_s), torch.tensor(losses_d)
    assert (ls - ls[0]).abs().max() > 0.05  # the trajectory moved, so matching it means something
    rel = ((ls - ld).abs() / ld.abs()).max().item()
    assert rel <= 1e-4, f"max relative loss difference {rel:.3g}"
