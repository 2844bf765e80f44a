"""STR (soft threshold) and edge-popup: forward/backward against dense computations, thresholds, selection."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsestart.algorithms as algorithms
from sparsestart.algorithms.soft_threshold import soft_threshold
from sparsestart.nn import SparseConv2d, SparseLinear
from tests.algorithms.helpers import batches, build, cnn, mlp, train, validate_all

F64 = torch.float64


def _model(kind):
    if kind == "linear":
        return nn.Sequential(SparseLinear(10, 8, density=0.5, seed=1, dtype=F64), nn.ReLU(inplace=True),
                             SparseLinear(8, 4, density=0.5, seed=2, dtype=F64))
    return nn.Sequential(SparseConv2d(2, 4, 3, padding=1, density=0.5, seed=1, dtype=F64), nn.ReLU(inplace=True),
                         SparseConv2d(4, 3, 3, stride=2, density=0.5, seed=2, dtype=F64), nn.Flatten())


def _input(kind, g):
    return torch.randn(6, 10, generator=g, dtype=F64) if kind == "linear" else torch.randn(6, 2, 6, 6, generator=g,
                                                                                               dtype=F64)


def _dense_forward(model, weights, x):
    """The model's forward with the given dense weights (torch weight shapes) in place of the sparse layers."""
    for m in model:
        if isinstance(m, SparseLinear):
            x = F.linear(x, weights[id(m)], m.bias)
        elif isinstance(m, SparseConv2d):
            x = F.conv2d(x, weights[id(m)], m.bias, m.stride, m.padding, m.dilation)
        elif isinstance(m, nn.ReLU):
            x = F.relu(x)
        else:
            x = m(x)
    return x


def _dense(layer, per_slot):
    """Dense torch-shaped weight from a slot-indexed tensor, on the layer's stored entries (differentiable)."""
    rows, cols, slots = layer.sparse_weight.coo()
    M, K = layer.matrix_shape
    return per_slot.new_zeros(M, K).index_put((rows, cols), per_slot[slots]).reshape(layer.weight_shape)


# ------------------------------------------------------------------------ STR
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_str_forward_and_gradients_equal_dense_soft_threshold(kind):
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = algorithms.STR(model, opt, s_init=-2.0)
    g = torch.Generator().manual_seed(0)
    x = _input(kind, g)
    out = model(x)
    loss = (out ** 2).sum()
    loss.backward()
    # Dense twin with leaf copies of values and thresholds.
    vals = {n: l.values.detach().clone().requires_grad_() for n, l in algo.layers.items()}
    ss = {n: s.detach().clone().requires_grad_() for n, s in algo.thresholds.items()}
    weights = {id(l): _dense(l, soft_threshold(vals[n], ss[n])) for n, l in algo.layers.items()}
    ref = _dense_forward(model, weights, x)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    (ref ** 2).sum().backward()
    for n, layer in algo.layers.items():
        assert torch.allclose(layer.values.grad, vals[n].grad, rtol=1e-10, atol=1e-12)
        assert torch.allclose(algo.thresholds[n].grad, ss[n].grad, rtol=1e-10, atol=1e-12)
        assert algo.thresholds[n].grad != 0
        assert isinstance(layer.values, nn.Parameter)  # not shadowed outside the forward
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, dtype=F64))
    assert all(isinstance(l.values, nn.Parameter) for l in algo.layers.values())


def test_str_thresholds_train_in_their_own_group():
    # s_init = -200: sigmoid' underflows, so the loss cannot move s; weight decay on s pulls it towards 0.
    model, opt, algo = build("str", mlp, dict(s_init=-200.0, s_weight_decay=0.1), dict(weight_decay=0.0))
    group = opt.param_groups[-1]
    assert group["weight_decay"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in algo.thresholds.values()}
    train(model, opt, algo, batches(model, 5))
    assert all(float(s.detach()) > -200.0 for s in algo.thresholds.values())
    # Near 0 the loss gradient moves s by itself.
    model, opt, algo = build("str", mlp, dict(s_init=-3.0, s_weight_decay=0.0), dict(weight_decay=0.0))
    train(model, opt, algo, batches(model, 5))
    assert all(float(s.detach()) != -3.0 for s in algo.thresholds.values())


def test_str_compaction_drops_entries_zero_for_a_window():
    model, opt, algo = build("str", mlp, dict(s_init=math.log(0.1 / 0.9), window=4, compact_every=2),
                             dict(lr=0.0, momentum=0.9, weight_decay=0.0))  # lr 0: values and s stay put
    below = {}
    for n, layer in algo.layers.items():
        m = layer.sparse_weight
        rows, cols, slots = m.coo()
        small = layer.values.detach()[slots].abs() <= 0.1
        below[n] = {(int(r), int(c)) for r, c, sm in zip(rows, cols, small) if sm}
        assert below[n]
    nnz = {n: l.nnz for n, l in algo.layers.items()}
    train(model, opt, algo, batches(model, 3), validate=True)
    assert {n: l.nnz for n, l in algo.layers.items()} == nnz  # window not reached yet
    train(model, opt, algo, batches(model, 1), validate=True)  # step 4: compaction
    for n, layer in algo.layers.items():
        m = layer.sparse_weight
        rows, cols, _ = m.coo()
        present = {(int(r), int(c)) for r, c in zip(rows, cols)}
        assert not (present & below[n]) and layer.nnz == nnz[n] - len(below[n])
        free = m.slot[m.nnz:].long()
        assert bool((opt.state[layer.values]["momentum_buffer"][free] == 0).all())
    assert {e["event"] for e in algo.history} == {"compact"} and {e["step"] for e in algo.history} == {4}


def test_str_finalize_bakes_and_meets_exact_target():
    model, opt, algo = build("str", cnn, dict(s_init=-3.0, total_steps=6))
    data = batches(model, 6)
    train(model, opt, algo, data[:5])
    x = data[0][0]
    with torch.no_grad():
        before = model(x)
    eff = {n: algo.effective_values(n) for n in algo.layers}
    algo.finalize()
    assert algo.finalized
    validate_all(model)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)
    for n, layer in algo.layers.items():
        assert not layer._forward_pre_hooks
        m = layer.sparse_weight
        live = m.slot[:m.nnz].long()
        assert torch.equal(layer.values.detach()[live], eff[n][live])
        assert bool((layer.values.detach()[live] != 0).all())
    model, opt, algo = build("str", cnn, dict(s_init=-3.0, total_steps=6, target_density=0.1))
    train(model, opt, algo, data)
    assert algo.finalized and algo.nnz == round(0.1 * algo.numel)
    assert algo.history[-1]["event"] == "target"


# ------------------------------------------------------------------------ edge-popup
def _topk_mask(algo, name):
    """Dense [M, K] mask of the top-k |score| ER entries, computed densely."""
    er = algo.er[name]
    rows, cols, slots = er.coo()
    dense_scores = torch.full(er.shape, -1.0, dtype=F64).index_put((rows, cols), algo.scores[name].detach()[slots]
                                                                   .abs().double())
    k = algo.keep_count(name, algo.level)
    mask = torch.zeros(er.shape, dtype=torch.bool).flatten()
    mask[torch.topk(dense_scores.flatten(), k).indices] = True
    return mask.view(er.shape)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_edgepopup_forward_and_score_gradient_equal_dense_masked(kind):
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = algorithms.EdgePopup(model, opt, final_density=0.2, total_steps=10, levels=2, seed=0)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = _input(kind, g)
        out = model(x)
        # Dense reference: frozen ER weights times the top-k mask, straight-through to |scores|.
        ss, weights = {}, {}
        for n, layer in algo.layers.items():
            er = algo.er[n]
            assert torch.equal(layer.sparse_weight.mask(), _topk_mask(algo, n))
            s = algo.scores[n].detach().clone().requires_grad_()
            mask = _topk_mask(algo, n).to(F64)
            rows, cols, slots = er.coo()
            abs_s = torch.zeros(er.shape, dtype=F64).index_put((rows, cols), s[slots].abs())
            ste = mask + abs_s - abs_s.detach()
            weights[id(layer)] = (er.to_dense() * ste).reshape(layer.weight_shape)
            assert torch.equal(layer.to_dense().weight.reshape(er.shape), er.to_dense() * mask)
            ss[n] = s
        ref = _dense_forward(model, weights, x)
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
        opt.zero_grad()
        (out ** 2).sum().backward()
        (ref ** 2).sum().backward()
        for n, layer in algo.layers.items():
            assert layer.values.grad is None
            assert torch.allclose(algo.scores[n].grad, ss[n].grad, rtol=1e-10, atol=1e-12)
        frozen = {n: layer.values.detach().clone() for n, layer in algo.layers.items()}
        opt.step()
        for n, layer in algo.layers.items():
            assert torch.equal(layer.values.detach(), frozen[n])  # weights do not train
        algo.step()
        validate_all(model)


def test_edgepopup_anneals_geometrically_within_the_er_support():
    steps = 30
    model, opt, algo = build("edgepopup", cnn, dict(final_density=0.05, total_steps=steps, levels=3, seed=0))
    d_er = algo.initial_density
    er_masks = {n: algo.er_mask(n) for n in algo.layers}
    densities = []

    def check(t):
        for n, layer in algo.layers.items():
            assert layer.nnz == algo.keep_count(n, algo.level_at(t))
            assert bool((layer.mask() <= er_masks[n]).all())
            assert torch.equal(algo.er_mask(n), er_masks[n])
        if t % 10 == 9:
            densities.append(algo.density)

    train(model, opt, algo, batches(model, steps), validate=True, after_step=check)
    ratio = (0.05 / d_er) ** (1 / 3)
    for level, d in enumerate(densities):
        assert d == pytest.approx(d_er * ratio ** (level + 1), rel=0.1)
    assert algo.density == pytest.approx(0.05, rel=0.1)
    assert {e["level"] for e in algo.history} == {0, 1, 2}


@pytest.mark.parametrize("weight_init", ["signed_constant", "kaiming_normal"])
def test_edgepopup_weight_init(weight_init):
    model = nn.Sequential(SparseLinear(200, 50, density=0.5, seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = algorithms.EdgePopup(model, opt, final_density=0.1, total_steps=10, weight_init=weight_init, seed=0)
    er = algo.er["0"]
    w = er.values.detach()[er.slot[:er.nnz].long()]
    std = math.sqrt(2 / 200)
    if weight_init == "signed_constant":
        assert torch.allclose(w.abs(), torch.full_like(w, std))
        assert abs(float((w > 0).float().mean()) - 0.5) < 0.05
    else:
        assert float(w.std()) == pytest.approx(std, rel=0.05)
    s = algo.scores["0"].detach()[er.slot[:er.nnz].long()]
    assert float(s.abs().max()) <= 1 / math.sqrt(200)
    assert not model[0].values.requires_grad


def test_str_default_s_init_is_derived_so_that_a_short_run_prunes():
    """The paper's s_init = -200 is a delay line for 160-epoch runs: in a short run weight decay moves s
    to about -190 and nothing is pruned. The default derives s_init from the run length and weight decay
    (weight decay alone brings s to s_start = -6 after prune_start = 10% of total_steps)."""
    steps = 60
    opt_kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    model, opt, algo = build("str", mlp, dict(total_steps=steps), opt_kw)
    assert algo.s_init_derived
    # 6 steps at lr 0.1, wd 5e-4, momentum 0.9 barely move s: s_init is just below -6.
    assert -6.1 < algo.s_init < -6.0
    d0 = algo.density
    train(model, opt, algo, batches(model, steps))
    assert algo.finalized and algo.density < d0
    # The old default prunes nothing in the same run.
    model, opt, algo = build("str", mlp, dict(s_init=-200.0, total_steps=steps), opt_kw)
    assert not algo.s_init_derived
    train(model, opt, algo, batches(model, steps))
    assert algo.finalized and algo.density == d0
    # With the derived default target_density still ends exactly on target.
    model, opt, algo = build("str", mlp, dict(total_steps=steps, target_density=0.2), opt_kw)
    train(model, opt, algo, batches(model, steps))
    assert algo.nnz == round(0.2 * algo.numel)


def test_str_derived_s_init_reaches_s_start_at_the_chosen_fraction():
    from sparsestart.algorithms.soft_threshold import derive_s_init

    # Zero loss gradient (no data): replaying SGD on the thresholds alone brings s to s_start at f * T.
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-2)
    s0 = derive_s_init(opt, 1000, s_start=-6.0, prune_start=0.3)
    s = nn.Parameter(torch.tensor(s0, dtype=F64))
    opt = torch.optim.SGD([s], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(300):
        s.grad = torch.zeros_like(s)
        opt.step()
    assert float(s.detach()) == pytest.approx(-6.0, rel=1e-9)
    # The paper's setting (160 epochs x 391 steps, wd 5e-4, constant lr) lands near its -200.
    assert -150 < derive_s_init(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4), 160 * 391) < -120
    # A decaying schedule moves s less, so s_init is closer to s_start.
    cos = derive_s_init(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4), 1000, prune_start=0.5,
                        lr_factor=lambda t: 0.5 * (1 + math.cos(math.pi * t / 1000)))
    const = derive_s_init(torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4), 1000, prune_start=0.5)
    assert const < cos < -6.0
    # AdamW: decoupled decay, s *= 1 - lr wd per step.
    adamw = derive_s_init(torch.optim.AdamW([w], lr=0.01, weight_decay=0.1), 1000, prune_start=0.5)
    assert adamw == pytest.approx(-6.0 / (1 - 0.001) ** 500)
    # No run length, no weight decay, or prune_start = 0: s_start itself.
    assert derive_s_init(opt, None) == -6.0
    assert derive_s_init(torch.optim.SGD([w], lr=0.1), 1000) == -6.0
    assert derive_s_init(opt, 1000, prune_start=0.0) == -6.0
    # The thresholds' own weight decay is what counts.
    model, opt, algo = build("str", mlp, dict(total_steps=1000, s_weight_decay=0.0), dict(weight_decay=5e-4))
    assert algo.s_init == -6.0
    for bad in (dict(prune_start=1.5), dict(s_start=float("nan")), dict(lr_factor=3)):
        with pytest.raises((ValueError, TypeError)):
            build("str", mlp, dict(total_steps=10, **bad))


def test_edgepopup_paper_init_kaiming_normal_zero_frozen_bias():
    """The paper's released runs use --initBias kn-zero-bias: Kaiming normal weights, biases zero and frozen."""
    model = nn.Sequential(SparseLinear(200, 50, density=0.5, seed=0), nn.ReLU(), SparseLinear(50, 3, density=0.5,
                                                                                             seed=1))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.bias.fill_(0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    algo = algorithms.EdgePopup(model, opt, final_density=0.1, total_steps=4,
                                weight_init="kaiming_normal_zero_bias", seed=0)
    er = algo.er["0"]
    w = er.values.detach()[er.slot[:er.nnz].long()]
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 200), rel=0.05)
    for m in (model[0], model[2]):
        assert not m.bias.requires_grad and bool((m.bias == 0).all())
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 200, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        algo.step()
    for m in (model[0], model[2]):
        assert bool((m.bias == 0).all())
    assert any(float(s.grad.abs().sum()) > 0 for s in algo.scores.values())
    # The other inits leave the biases alone.
    model2 = nn.Sequential(SparseLinear(20, 5, density=0.5, seed=0))
    algorithms.EdgePopup(model2, torch.optim.SGD(model2.parameters(), lr=0.1), final_density=0.1, total_steps=4,
                         weight_init="kaiming_normal", seed=0)
    assert model2[0].bias.requires_grad


def test_str_finalize_at_cuts_early_and_the_rest_trains_the_final_structure():
    """finalize_at=0.5 of 8 steps: the target cut happens after step 4, and steps 5-8 train (and change) the
    surviving values of the final structure; with the default the cut is the last thing that happens."""
    model, opt, algo = build("str", cnn, dict(s_init=-3.0, total_steps=8, target_density=0.1, finalize_at=0.5))
    assert algo.finalize_step == 4
    data = batches(model, 8)
    train(model, opt, algo, data[:4])
    assert algo.finalized and algo.nnz == round(0.1 * algo.numel)
    structure = {n: layer.sparse_weight.mask().clone() for n, layer in algo.layers.items()}
    values = {n: layer.values.detach().clone() for n, layer in algo.layers.items()}
    train(model, opt, algo, data[4:])
    validate_all(model)
    assert algo.nnz == round(0.1 * algo.numel)
    for n, layer in algo.layers.items():
        assert torch.equal(layer.sparse_weight.mask(), structure[n])  # static after the cut
    assert any(not torch.equal(layer.values.detach(), values[n]) for n, layer in algo.layers.items())
    _, _, late = build("str", cnn, dict(s_init=-3.0, total_steps=8, target_density=0.1))
    assert late.finalize_step == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=10, finalize_at=0.0), r"finalize_at must be a fraction of total_steps in \(0, 1\], got 0.0"),
    (dict(total_steps=10, finalize_at=1.5), "finalize_at must be a fraction"),
    (dict(finalize_at=0.5), "finalize_at=0.5 needs total_steps"),
    (dict(total_steps=10, finalize_at=0.05), "must come after prune_start=0.1"),
])
def test_str_bad_finalize_at_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("str", mlp, kwargs)
