"""Flow repair: every unit alive afterwards, budgets, values, cross-layer disconnection, BSR, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart.init import FlowReport, repair_flow
from sparsestart.nn import SparseConv2d, SparseLayer, SparseLinear

from . import shapes


def _sparse_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLayer)]


def _unit_degrees(layer):
    """(in-degree of each output unit, out-degree of each input unit) from the dense mask."""
    mask = layer.mask().reshape(layer.weight_shape[0], layer.weight_shape[1], -1)
    return mask.sum(dim=(1, 2)), mask.sum(dim=(0, 2))


def _dead(layer):
    indeg, outdeg = _unit_degrees(layer)
    return int((indeg == 0).sum()), int((outdeg == 0).sum())


def _sparse_mlp(density=0.02, seed=0, sizes=(784, 300, 100, 10)):
    torch.manual_seed(seed)
    return sparsestart.sparsify(shapes.mlp(sizes), density, "uniform", seed=seed)


def _sparse_lenet(density=0.03, seed=0):
    torch.manual_seed(seed)
    return sparsestart.sparsify(shapes.lenet5(), density, "uniform", seed=seed)


@pytest.mark.parametrize("method", ["random_addition", "rejection"])
@pytest.mark.parametrize("keep_budget", [True, False])
@pytest.mark.parametrize("make", [_sparse_mlp, _sparse_lenet], ids=["mlp", "lenet"])
def test_every_unit_alive_after_repair(method, keep_budget, make):
    model = make()
    before = {n: (m.nnz, _dead(m), m.dense_weight().detach().clone(), m.mask().clone()) for n, m in
              _sparse_layers(model)}
    assert sum(sum(b[1]) for b in before.values()) > 0, "the test needs dead units to repair"
    report = repair_flow(model, method, keep_budget=keep_budget, seed=1)
    assert isinstance(report, FlowReport)
    assert report.total == sum(report.edges_added.values()) > 0
    for lf, (name, layer) in zip(report.layers, _sparse_layers(model)):
        layer.validate()
        assert lf.name == name
        assert _dead(layer) == (0, 0), name
        nnz0, (dout, din), w0, m0 = before[name]
        assert (lf.dead_outputs, lf.dead_inputs) == (dout, din)
        assert max(dout, din) <= lf.edges_added
        if method == "random_addition":
            assert lf.edges_added <= dout + din  # one edge per dead unit, some revive two
        if keep_budget:
            assert layer.nnz == nnz0 + lf.over_budget and lf.edges_removed == lf.edges_added - lf.over_budget
        else:
            assert layer.nnz == nnz0 + lf.edges_added and lf.edges_removed == 0
        # Entries present before and after keep their values.
        both = m0 & layer.mask()
        torch.testing.assert_close(layer.dense_weight().detach()[both], w0[both])
        assert int((layer.mask() & ~m0).sum()) == lf.edges_added


def test_keep_budget_holds_when_layers_have_room():
    """At moderate sparsity every layer has more weights than units: the count stays exact."""
    torch.manual_seed(0)
    # 512 x 512 layers at density 3/512: about 3 weights per unit (5% dead units), 1536 weights per layer.
    model = sparsestart.sparsify(shapes.mlp((512, 512, 512, 512)), 3 / 512, "uniform", seed=3)
    nnz0 = {n: m.nnz for n, m in _sparse_layers(model)}
    report = repair_flow(model, seed=0)
    assert report.total > 0 and all(lf.over_budget == 0 for lf in report.layers)
    assert {n: m.nnz for n, m in _sparse_layers(model)} == nnz0
    assert all(_dead(m) == (0, 0) for _, m in _sparse_layers(model))


def test_new_values_match_or_zero_and_model_still_works():
    for init in ("match", "zeros"):
        model = _sparse_mlp()
        pools = {n: set(m.values.detach()[m.sparse_weight.coo()[2]].abs().tolist()) for n, m in _sparse_layers(model)}
        masks = {n: m.mask().clone() for n, m in _sparse_layers(model)}
        repair_flow(model, keep_budget=False, seed=2, init=init)
        for n, m in _sparse_layers(model):
            new = m.dense_weight().detach()[m.mask() & ~masks[n]]
            if init == "zeros":
                assert bool((new == 0).all())
            else:
                assert bool((new != 0).all()) and set(new.abs().tolist()) <= pools[n]
        x = torch.randn(5, 1, 28, 28)
        torch.testing.assert_close(model(x), sparsestart.densify(copy.deepcopy(model))(x))


def test_capacity_grows_when_needed():
    layer = SparseLinear(50, 40, density=0.01, seed=0)
    assert layer.sparse_weight.capacity == layer.nnz
    model = nn.Sequential(layer)
    report = repair_flow(model, keep_budget=False, seed=0, input_shape=(50,))
    grown = model[0]
    grown.validate()
    assert grown.nnz == 20 + report.total and grown.sparse_weight.capacity >= grown.nnz
    assert _dead(grown) == (0, 0)
    assert grown.values.requires_grad and grown.values is next(grown.parameters())


def test_seed_reproducible():
    a, b = _sparse_lenet(), _sparse_lenet()
    ra, rb = repair_flow(a, "rejection", seed=5), repair_flow(b, "rejection", seed=5)
    assert ra.edges_added == rb.edges_added
    assert all(torch.equal(x.mask(), y.mask()) for (_, x), (_, y) in zip(_sparse_layers(a), _sparse_layers(b)))


def _masked_linear(cin, cout, mask):
    return SparseLinear.from_dense(nn.Linear(cin, cout), mask=torch.tensor(mask, dtype=torch.bool))


def test_cross_layer_disconnection_counted_and_repaired():
    # fc1: every unit has inputs. Unit 0 of fc1 feeds only fc2 row 0; fc2 row 0 has no outgoing edge in
    # fc3 (a dead input unit there). So fc1 unit 0 is alive in fc1 but disconnected across layers.
    fc1 = _masked_linear(3, 4, [[1, 1, 1]] * 4)
    fc2 = _masked_linear(4, 4, [[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]])
    fc3 = _masked_linear(4, 2, [[0, 1, 1, 0], [0, 0, 1, 1]])
    model = nn.Sequential(fc1, nn.ReLU(), fc2, nn.ReLU(), fc3)
    report = repair_flow(model, seed=0, input_shape=(3,))
    assert report.cross_layer.startswith("traced (2 ")
    assert report.disconnected == {"0": 1, "2": 0, "4": None}
    assert report.layers[2].dead_inputs == 1 and report.total_disconnected_after == 0
    assert "discon." in str(report)
    # Without an input shape (and nothing to infer it from) the analysis is skipped, repair still runs.
    fc3b = _masked_linear(4, 2, [[0, 1, 1, 0], [0, 0, 1, 1]])
    r2 = repair_flow(nn.Sequential(copy.deepcopy(fc1), nn.ReLU(), copy.deepcopy(fc2), nn.ReLU(), fc3b), seed=0)
    assert r2.cross_layer.startswith("skipped") and r2.disconnected == {"0": None, "2": None, "4": None}
    assert _dead(fc3b) == (0, 0)


def test_cross_layer_chain_with_flatten_and_deeper_dead_ends():
    # conv (2 channels) -> flatten (2 x 2 x 2 = 8 features) -> fc1 -> fc2. Channel 1's features (4..7)
    # lead only to fc1 row 0, which has no edge in fc2: channel 1 is disconnected, channel 0 is not.
    conv = SparseConv2d.from_dense(nn.Conv2d(1, 2, 1), mask=torch.ones(2, 1, 1, 1, dtype=torch.bool))
    fc1 = _masked_linear(8, 3, [[0, 0, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    fc2 = _masked_linear(3, 2, [[0, 1, 0], [0, 1, 1]])
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc1, nn.ReLU(), fc2)
    report = repair_flow(model, seed=0, input_shape=(1, 2, 2))
    assert report.disconnected == {"0": 1, "3": 0, "5": None}
    assert report.total_disconnected_after == 0


def test_residual_models_analyse_only_plain_chains():
    torch.manual_seed(0)
    model = sparsestart.sparsify(shapes.resnet18(), 0.002, "uniform", seed=0)
    report = repair_flow(model, seed=0, input_shape=(3, 8, 8))
    for lf in report.layers:
        inside_block = lf.name.endswith(".conv1")
        assert (lf.disconnected is not None) == inside_block, lf.name  # conv1 -> conv2 within a block only
    assert all(_dead(m) == (0, 0) for _, m in _sparse_layers(model))


def test_bsr_repaired_on_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 32))
    sparsestart.sparsify(model, 0.15, "uniform", format="bsr", block_size=8, seed=4)
    dead0 = [_dead(m) for _, m in _sparse_layers(model)]
    assert any(sum(d) for d in dead0)
    report = repair_flow(model, seed=0, input_shape=(8, 4, 4))
    for lf, (_, m) in zip(report.layers, _sparse_layers(model)):
        m.validate()
        assert _dead(m) == (0, 0)
        assert lf.edges_added % 64 == 0
        R, Q = m.sparse_weight.grid
        rows, _, _ = m.sparse_weight.coo()
        assert torch.bincount(rows, minlength=R).min() >= 1


def test_sparsify_flow_option():
    torch.manual_seed(0)
    model = shapes.lenet5()
    N = sum(shapes.weights(model).values())
    sparsestart.sparsify(model, 0.02, "erk", seed=0, flow="random_addition")
    report = model.flow_report
    assert report.method == "random_addition" and report.keep_budget
    assert all(_dead(m) == (0, 0) for _, m in _sparse_layers(model))
    over = sum(lf.over_budget for lf in report.layers)
    assert sum(m.nnz for _, m in _sparse_layers(model)) == round(0.02 * N) + over
    plain = sparsestart.sparsify(shapes.lenet5(), 0.02, "erk", seed=0)
    assert not hasattr(plain, "flow_report")


def test_errors():
    model = _sparse_mlp()
    with pytest.raises(ValueError, match="method must be one of \\['random_addition', 'rejection'\\], got 'x'"):
        repair_flow(model, "x")
    with pytest.raises(TypeError, match="keep_budget must be a bool, got 'yes'"):
        repair_flow(model, keep_budget="yes")
    with pytest.raises(ValueError, match="init must be 'match' or 'zeros'"):
        repair_flow(model, init="ones")
    with pytest.raises(ValueError, match="no SparseLinear/SparseConv2d"):
        repair_flow(shapes.mlp())


def test_dead_units_grow_with_sparsity():
    """Sanity of the counts: at 0.999 an ER VGG-like net has many dead units, at 0.5 none."""
    counts = []
    for d in (0.5, 0.001):
        torch.manual_seed(0)
        model = shapes.vgg(shapes.VGG16[:7])
        last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        # (the 256 -> 10 classifier is left dense: at 0.5 one of its inputs dies with probability 2^-10)
        sparsestart.sparsify(model, d, "uniform", seed=0, exclude=[last])
        counts.append(repair_flow(model, seed=0, input_shape=(3, 8, 8)).total)
    assert counts[0] == 0 and counts[1] > 50
    assert math.isfinite(counts[1])


def test_flag_count_is_the_papers_per_layer_direction_count():
    """Gadhikar et al.'s Tables 6-7 print sum over layers of (indeg == 0).any() + (outdeg == 0).any()
    (their code), not edges: at most 2 x the masked layers."""
    model = _sparse_mlp(density=0.005)
    dead = {n: _dead(m) for n, m in _sparse_layers(model)}
    report = repair_flow(model, "random_addition", keep_budget=False, seed=0)
    expected = sum(int(o > 0) + int(i > 0) for o, i in dead.values())
    assert report.flag_count == expected
    assert report.max_flags == 2 * len(dead) == 6
    assert 0 < report.flag_count <= report.max_flags
    for lf in report.layers:
        o, i = dead[lf.name]
        assert lf.flags == int(o > 0) + int(i > 0)
        assert (lf.dead_outputs, lf.dead_inputs) == (o, i)
    # The edges added are a different, much larger count.
    assert report.total > 10 * report.flag_count
    assert "flags" in str(report)
    # A network without dead units has no flag.
    healthy = repair_flow(_sparse_mlp(density=0.5), seed=0)
    assert healthy.flag_count == 0 == healthy.total


def test_flag_count_reaches_its_maximum_when_every_layer_is_starved():
    # One weight per layer: every layer has dead outputs and dead inputs.
    model = _sparse_mlp(density=1e-5)
    report = repair_flow(model, seed=0)
    assert report.flag_count == report.max_flags == 6
