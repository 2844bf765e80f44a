"""Initialisation off the CPU, checked on the CPU: what runs where, and that the structure a seed gives
does not depend on the path (native ops or their PyTorch twins, used on a GPU).

tests/gpu/test_gpu_algorithms.py repeats the device-dependent parts on CUDA.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart import _native
from sparsestart.init import er_indices, repair_flow, sample_without_replacement
from sparsestart.init.flow import _unit_edges
from sparsestart.nn import SparseLayer

from . import shapes


def _dense_unit_edges(m):
    """Reference for _unit_edges: (output unit, input unit) pairs of the dense mask, row-major."""
    kk = math.prod(m.weight_shape[2:]) if len(m.weight_shape) > 2 else 1
    adj = m.mask().reshape(m.weight_shape[0], m.weight_shape[1], kk).any(-1)
    return adj.nonzero(as_tuple=True)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_bsr_unit_edges_equal_the_dense_mask_analysis(b):
    torch.manual_seed(0)
    # Conv kernels of 9 positions: a block column can span two input channels.
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 32))
    sparsestart.sparsify(model, 0.3, "uniform", format="bsr", block_size=b, seed=b)
    for m in model.modules():
        if isinstance(m, SparseLayer):
            got, want = _unit_edges(m), _dense_unit_edges(m)
            assert all(g.device.type == "cpu" and torch.equal(g, w) for g, w in zip(got, want))


def _structures(model):
    return {n: [t.clone() for t in m.sparse_weight.index_tensors()] + [m.values.detach().clone()]
            for n, m in model.named_modules() if isinstance(m, SparseLayer)}


@pytest.mark.skipif(_native.native_op("_native_merge_index") is None, reason="sparsestart._C not built")
@pytest.mark.parametrize("method", ["random_addition", "rejection"])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_flow_repair_is_the_same_on_the_torch_path(monkeypatch, method, fmt):
    torch.manual_seed(0)
    if fmt == "bsr":
        model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 32))
        base = sparsestart.sparsify(model, 0.15, "uniform", format="bsr", block_size=8, seed=4)
    else:
        base = sparsestart.sparsify(shapes.lenet5(), 0.05, "uniform", seed=3)
    native, twin = copy.deepcopy(base), copy.deepcopy(base)
    want = repair_flow(native, method, seed=5)
    monkeypatch.setattr(_native, "native_op", lambda name: None)  # the path a CUDA model takes
    got = repair_flow(twin, method, seed=5)
    assert str(got) == str(want) and want.total > 0
    a, b = _structures(native), _structures(twin)
    for name in a:
        assert all(torch.equal(u, v) for u, v in zip(a[name], b[name])), name


def test_sampling_runs_where_the_generator_lives_and_returns_on_the_given_device():
    g = torch.Generator().manual_seed(0)
    plain = er_indices((300, 500), 0.01, generator=g)
    g.manual_seed(0)
    placed = er_indices((300, 500), 0.01, generator=g, device="cpu")
    assert all(torch.equal(u, v) for u, v in zip(plain, placed))
    for exact in (True, False):
        rows, cols = er_indices((40, 30), 0.2, exact=exact, generator=torch.Generator().manual_seed(1),
                                device=torch.device("cpu"))
        assert rows.device.type == cols.device.type == "cpu" and rows.dtype == torch.long
    for n, k in ((10, 0), (10, 10), (1 << 20, 3000)):
        s = sample_without_replacement(n, k, torch.Generator().manual_seed(2))
        assert s.device.type == "cpu" and s.numel() == k and bool((s[1:] > s[:-1]).all())

