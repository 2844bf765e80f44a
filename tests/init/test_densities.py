"""Layer-wise density allocation: exact budgets, the rules' properties, oracles and errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsestart
from sparsestart.init import DISTRIBUTIONS, allocate_densities
from sparsestart.nn import SparseLayer, maskable_layers

from . import shapes

DATA_FREE = ["uniform", "uniform_plus", "er", "erk", "erk_plus", "balanced", "pyramidal"]
DENSITIES = [0.5, 0.1, 0.01, 0.001]


@pytest.fixture(scope="module")
def meta_models():
    return {name: shapes.build(name, "meta") for name in shapes.MODELS}


def _check_allocation(model, dens, d, exclude=(), unit=1):
    numel = {n: m.weight.numel() for n, m in maskable_layers(model, exclude)}
    assert list(dens) == list(numel), "keys must be the masked layers in forward order"
    for n, p in dens.items():
        assert 0.0 < p <= 1.0, (n, p)
    # What the sampler takes: round(p * units) per layer; the sum is the budget to the unit.
    total = sum(round(p * numel[n] / unit) for n, p in dens.items())
    assert total == round(d * sum(numel.values()) / unit)
    return numel


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.filterwarnings("ignore:.*cannot hold:UserWarning")
@pytest.mark.parametrize("model_name", list(shapes.MODELS))
@pytest.mark.parametrize("distribution", DATA_FREE)
def test_exact_budget_data_free(meta_models, model_name, distribution):
    model = meta_models[model_name]
    for d in DENSITIES:
        _check_allocation(model, allocate_densities(model, d, distribution), d)


@pytest.mark.parametrize("model_name", list(shapes.MODELS))
def test_exact_budget_data_driven(model_name):
    torch.manual_seed(0)
    model = shapes.build(model_name)
    c, h, w = shapes.MODELS[model_name][1]
    side = h if model_name in ("mlp", "lenet5") else 4  # layer shapes do not depend on the image side
    x, y = torch.randn(4, c, side, side), torch.randint(0, 10, (4,))
    for d in DENSITIES:
        _check_allocation(model, allocate_densities(model, d, "snip", data=(x, y)), d)
        _check_allocation(model, allocate_densities(model, d, "grasp", data=(x, y)), d)
        _check_allocation(model, allocate_densities(model, d, "synflow", input_shape=(c, side, side),
                                                    rounds=2), d)


def test_budget_exact_with_saturation(meta_models):
    """Rules whose raw shares exceed 1 for small layers must hand the surplus on and still meet the budget."""
    model = meta_models["vgg16"]
    for d in (0.9, 0.7, 0.5, 0.3):
        for dist in ("er", "erk", "erk_plus", "balanced", "uniform_plus"):
            dens = allocate_densities(model, d, dist)
            _check_allocation(model, dens, d)
        erk = list(allocate_densities(model, d, "erk").values())
        assert erk[0] == 1.0 and erk[-1] == 1.0  # first conv and classifier saturate
    for p in (0.3, 2.0):
        _check_allocation(model, allocate_densities(model, 0.2, "erk", power=p), 0.2)


def test_density_one_is_dense(meta_models):
    for dist in DATA_FREE:
        dens = allocate_densities(meta_models["lenet5"], 1.0, dist)
        assert all(p == 1.0 for p in dens.values()), dist


def test_exclude_leaves_layers_outside_the_budget(meta_models):
    model = meta_models["vgg16"]
    dens = allocate_densities(model, 0.05, "erk", exclude=["0", "46"])
    assert "0" not in dens and "46" not in dens and len(dens) == 12
    _check_allocation(model, dens, 0.05, exclude=["0", "46"])
    full = allocate_densities(model, 0.05, "erk")
    assert dens["3"] != full["3"]  # the budget is re-spread over the remaining layers


def test_block_budget_is_exact_in_blocks():
    model = shapes.mlp((64, 128, 64, 32))
    for dist in ("erk", "balanced", "pyramidal"):
        dens = allocate_densities(model, 0.1, dist, block_size=8)
        _check_allocation(model, dens, 0.1, unit=64)
        sparsestart.sparsify(m := copy.deepcopy(model), 0.1, dist, format="bsr", block_size=8, seed=0)
        nnz = sum(layer.nnz for layer in m.modules() if isinstance(layer, SparseLayer))
        assert nnz == round(0.1 * (64 * 128 + 128 * 64 + 64 * 32) / 64) * 64


# ------------------------------------------------------------------------------------------ rule properties
def _raw_erk(shape):
    return sum(shape) / math.prod(shape)


def test_erk_gives_smaller_layers_higher_density(meta_models):
    for name in ("vgg16", "resnet18", "lenet5"):
        model = meta_models[name]
        layers = dict(maskable_layers(model))
        for d in (0.1, 0.01):
            dens = allocate_densities(model, d, "erk")
            raw = {n: _raw_erk(tuple(layers[n].weight.shape)) for n in dens}
            numel = {n: layers[n].weight.numel() for n in dens}
            for a in dens:
                for b in dens:
                    if raw[a] > raw[b]:  # one weight of rounding slack
                        assert dens[a] >= dens[b] - 1.0 / numel[b], (name, a, b)
            smallest = min(dens, key=lambda n: numel[n])
            largest = max(dens, key=lambda n: numel[n])
            assert dens[smallest] > dens[largest]


def test_pyramidal_decreases_with_depth(meta_models):
    for name in ("vgg16", "resnet18", "mlp"):
        model = meta_models[name]
        numel = [m.weight.numel() for _, m in maskable_layers(model)]
        for d in (0.1, 0.01):
            p = list(allocate_densities(model, d, "pyramidal").values())
            q = p[0]
            for i in range(1, len(p)):
                assert p[i] <= p[i - 1] + 1.0 / numel[i]
                if p[i] * numel[i] > 20:  # away from the one-weight floor the ratio is q
                    assert p[i] / p[i - 1] == pytest.approx(q, rel=0.1)


def test_balanced_equal_nonzeros_in_unsaturated_layers(meta_models):
    for name in ("vgg16", "resnet18", "lenet5", "mlp"):
        model = meta_models[name]
        numel = {n: m.weight.numel() for n, m in maskable_layers(model)}
        for d in (0.1, 0.01):
            dens = allocate_densities(model, d, "balanced")
            counts = {n: round(p * numel[n]) for n, p in dens.items()}
            free = [n for n in dens if dens[n] < 1.0]
            assert free
            assert max(counts[n] for n in free) - min(counts[n] for n in free) <= 1
            x = min(counts[n] for n in free)
            for n in dens:
                if dens[n] == 1.0:
                    assert numel[n] <= x + 1  # saturated only where the layer is smaller than x


def test_worked_example_mlp_16_256_256_256_2():
    model = shapes.mlp((16, 256, 256, 256, 2))
    erk = list(allocate_densities(model, 0.1, "erk").values())
    assert erk == pytest.approx([0.669, 0.079, 0.079, 1.0], abs=1.5e-3)
    pyr = list(allocate_densities(model, 0.1, "pyramidal").values())
    q = 0.367
    assert pyr == pytest.approx([q, q ** 2, q ** 3, q ** 4], abs=1.5e-3)
    numel = [16 * 256, 256 * 256, 256 * 256, 256 * 2]
    for dens in (erk, pyr):
        assert sum(round(p * n) for p, n in zip(dens, numel)) == round(0.1 * sum(numel))


def test_er_uses_channel_counts_only():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1), nn.Linear(32, 64))
    er = list(allocate_densities(model, 0.2, "er").values())
    # raw_l = (n_in + n_out) / (n_in n_out): the kernel size plays no role.
    raw = [(16 + 32) / (16 * 32), (32 + 32) / (32 * 32), (32 + 64) / (32 * 64)]
    assert er[0] / er[1] == pytest.approx(raw[0] / raw[1], rel=0.02)
    assert er[2] / er[1] == pytest.approx(raw[2] / raw[1], rel=0.02)


def test_uniform_plus_and_erk_plus_protect_first_and_last(meta_models):
    model = meta_models["vgg16"]
    up = allocate_densities(model, 0.01, "uniform_plus")
    assert up["0"] == 1.0 and up["46"] == pytest.approx(0.2, abs=1e-3)
    rest = [p for n, p in up.items() if n not in ("0", "46")]
    assert max(rest) - min(rest) < 1e-3
    # An MLP has no conv: nothing forced dense, the last Linear at least 0.2.
    up_mlp = allocate_densities(meta_models["mlp"], 0.01, "uniform_plus")
    assert up_mlp["5"] == pytest.approx(0.2, abs=1e-3)
    ep = allocate_densities(meta_models["resnet18"], 0.01, "erk_plus")
    assert ep["fc"] == 1.0
    ep = allocate_densities(meta_models["resnet18"], 0.01, "erk_plus", last_density=0.3)
    assert ep["fc"] == pytest.approx(0.3, abs=1e-3)
    _check_allocation(meta_models["resnet18"], ep, 0.01)


def test_infeasible_fixed_layers_warn_and_keep_budget():
    model = shapes.lenet5()
    # 0.1% of 44190 weights = 44 < the 150 weights of the first conv that uniform_plus keeps dense.
    with pytest.warns(UserWarning, match="cannot hold"):
        dens = allocate_densities(model, 0.001, "uniform_plus")
    _check_allocation(model, dens, 0.001)


# ------------------------------------------------------------------------------------------ RigL oracle
def rigl_erk(shapes_by_name: dict, density: float, power: float = 1.0) -> dict:
    """The ERK loop published by Evci et al. 2020 (google-research/rigl, sparse_utils.get_sparsities with
    erk_power_scale), restated: each round solves eps from the budget of the layers not yet dense; if the
    largest raw probability times eps exceeds 1, the layers with that largest raw probability become dense
    and the round repeats."""
    sparsity = 1.0 - density
    dense: set = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes_by_name.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= n * sparsity
            else:
                rhs += n * (1.0 - sparsity)
                raw[name] = (sum(shape) / n) ** power
                divisor += raw[name] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1.0:
            dense.update(n for n, r in raw.items() if r == top)
            continue
        return {n: 1.0 if n in dense else eps * raw[n] for n in shapes_by_name}


# Documented test vectors: (model, density, erk power).
RIGL_VECTORS = [("mlp16", 0.1, 1.0), ("vgg16", 0.01, 1.0), ("vgg16", 0.1, 1.0), ("vgg16", 0.5, 1.0),
                ("resnet18", 0.05, 1.0), ("resnet18", 0.05, 0.5), ("lenet5", 0.2, 1.0), ("mlp", 0.02, 1.5)]


@pytest.mark.parametrize("name,d,power", RIGL_VECTORS)
def test_erk_matches_rigl_published_solver(meta_models, name, d, power):
    model = shapes.mlp((16, 256, 256, 256, 2)) if name == "mlp16" else meta_models[name]
    layer_shapes = {n: tuple(m.weight.shape) for n, m in maskable_layers(model)}
    oracle = rigl_erk(layer_shapes, d, power)
    ours = allocate_densities(model, d, "erk", power=power)
    for n, shape in layer_shapes.items():
        assert abs(ours[n] - oracle[n]) <= 1.0 / math.prod(shape) + 1e-12, (n, ours[n], oracle[n])


# ------------------------------------------------------------------------------------------ data-driven oracles
def _counts_to_densities(model, keep_counts):
    numel = [m.weight.numel() for _, m in maskable_layers(model)]
    return [k / n for k, n in zip(keep_counts, numel)]


def _top_counts(scores, K):
    flat = torch.cat([s.flatten() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, K).indices] = True
    return [int(k.sum()) for k in torch.split(keep, [s.numel() for s in scores])]


def test_snip_ratios_match_hand_computed_scores():
    torch.manual_seed(1)
    model = shapes.lenet5()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    weights = [m.weight for _, m in maskable_layers(ref)]
    K = round(0.05 * sum(w.numel() for w in weights))
    expected = _counts_to_densities(model, _top_counts([(w * w.grad).abs() for w in weights], K))
    got = list(allocate_densities(model, 0.05, "snip", data=(x, y)).values())
    assert got == pytest.approx(expected, abs=1e-12)


def test_grasp_ratios_match_hessian_gradient_product():
    torch.manual_seed(2)
    model = shapes.mlp((20, 32, 16, 4))
    x, y = torch.randn(12, 20), torch.randint(0, 4, (12,))
    T = 200.0
    params = dict(model.named_parameters())
    wnames = [n + ".weight" for n, _ in maskable_layers(model)]

    def loss_of(ws):
        return F.cross_entropy(torch.func.functional_call(model, {**params, **ws}, (x,)) / T, y)

    ws = {n: params[n].detach() for n in wnames}
    g = torch.func.grad(loss_of)(ws)
    _, hg = torch.func.jvp(torch.func.grad(loss_of), (ws,), (g,))
    scores = [-(ws[n] * hg[n]) for n in wnames]
    K = round(0.1 * sum(s.numel() for s in scores))
    expected = _counts_to_densities(model, _top_counts([-s for s in scores], K))  # keep the K smallest
    got = list(allocate_densities(model, 0.1, "grasp", data=(x, y)).values())
    assert got == pytest.approx(expected, abs=1e-12)


def test_synflow_one_round_matches_single_shot_scores_and_iterating_avoids_collapse():
    torch.manual_seed(3)
    model = shapes.lenet5()
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
    ref(torch.ones(1, 1, 28, 28, dtype=torch.float64)).sum().backward()
    weights = [m.weight for _, m in maskable_layers(ref)]
    scores = [(w * w.grad).abs() for w in weights]
    numel = [w.numel() for w in weights]
    K = round(0.3 * sum(numel))
    expected = _counts_to_densities(model, _top_counts(scores, K))
    got = list(allocate_densities(model, 0.3, "synflow", input_shape=(1, 28, 28), rounds=1).values())
    assert got == pytest.approx(expected, abs=1e-12)
    # One shot at 5% collapses middle layers (no weight kept: only the one-weight floor remains) ...
    one_shot = _top_counts(scores, round(0.05 * sum(numel)))
    assert min(one_shot) == 0
    got = list(allocate_densities(model, 0.05, "synflow", input_shape=(1, 28, 28), rounds=1).values())
    assert min(round(p * n) for p, n in zip(got, numel)) == 1
    # ... iterating (Tanaka et al.) keeps every layer alive at 1%, with the exact budget.
    it = list(allocate_densities(model, 0.01, "synflow", input_shape=(1, 28, 28), rounds=20).values())
    assert sum(round(p * n) for p, n in zip(it, numel)) == round(0.01 * sum(numel))
    assert all(round(p * n) > 20 for p, n in zip(it, numel))


def test_scoring_does_not_touch_the_model():
    torch.manual_seed(4)
    model = shapes.vgg(shapes.VGG16[:4] + ["M"])
    model.train()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for dist, opts in (("snip", {"data": (x, y)}), ("grasp", {"data": (x, y)}),
                       ("synflow", {"input_shape": (3, 8, 8), "rounds": 2})):
        allocate_densities(model, 0.1, dist, **opts)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and model.training


# ------------------------------------------------------------------------------------------ custom
def test_custom_densities():
    model = shapes.mlp((10, 20, 5))
    given = {"1": 0.5, "3": 0.2}
    assert allocate_densities(model, None, "custom", densities=given) == given
    numel = {"1": 200, "3": 100}
    d = (0.5 * 200 + 0.2 * 100) / 300
    assert allocate_densities(model, d, "custom", densities=given) == given
    with pytest.raises(ValueError, match="rescale=True"):
        allocate_densities(model, 0.1, "custom", densities=given)
    scaled = allocate_densities(model, 0.2, "custom", densities=given, rescale=True)
    assert scaled["1"] / scaled["3"] == pytest.approx(2.5, rel=0.05)
    assert sum(round(p * numel[n]) for n, p in scaled.items()) == 60
    # Saturation on rescaling: the surplus moves to the other layer.
    sat = allocate_densities(model, 0.9, "custom", densities=given, rescale=True)
    assert sat["1"] == 1.0 and sum(round(p * numel[n]) for n, p in sat.items()) == 270
    with pytest.raises(ValueError, match="miss layer '3'"):
        allocate_densities(model, None, "custom", densities={"1": 0.5})
    with pytest.raises(ValueError, match="'bogus', which is not a masked layer"):
        allocate_densities(model, None, "custom", densities={**given, "bogus": 0.1})
    with pytest.raises(ValueError, match=r"densities\['3'\] must lie in \(0, 1\], got 1.5"):
        allocate_densities(model, None, "custom", densities={"1": 0.5, "3": 1.5})
    with pytest.raises(ValueError, match="densities=\\{layer name: density\\}"):
        allocate_densities(model, 0.1, "custom")


# ------------------------------------------------------------------------------------------ errors
def test_errors_name_argument_value_and_allowed():
    model = shapes.mlp((10, 20, 5))
    with pytest.raises(ValueError, match="unknown distribution 'erk2'.*'uniform'.*'synflow'"):
        allocate_densities(model, 0.1, "erk2")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got"):
            allocate_densities(model, bad, "erk")
    with pytest.raises(TypeError, match="density must be a number"):
        allocate_densities(model, "0.1", "erk")
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\] for distribution 'erk', got None"):
        allocate_densities(model, None, "erk")
    for dist in ("snip", "grasp"):
        with pytest.raises(ValueError, match="needs a data batch"):
            allocate_densities(model, 0.1, dist)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        allocate_densities(nn.Sequential(nn.ReLU()), 0.1)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        allocate_densities(model, 0.1, exclude="*")
    with pytest.raises(TypeError, match="takes no option 'power'; its options are none"):
        allocate_densities(model, 0.1, "pyramidal", power=2)
    with pytest.raises(ValueError, match="last_density must lie in \\(0, 1\\], got 2"):
        allocate_densities(model, 0.1, "erk_plus", last_density=2)
    with pytest.raises(ValueError, match="needs input_shape"):
        allocate_densities(model, 0.1, "synflow")
    with pytest.raises(ValueError, match="block_size=3"):
        allocate_densities(model, 0.1, block_size=3)
    assert set(DISTRIBUTIONS) == {"uniform", "uniform_plus", "er", "erk", "erk_plus", "balanced", "pyramidal",
                                  "snip", "grasp", "synflow", "custom"}


# ------------------------------------------------------------------------------------------ sparsify
def test_sparsify_default_erk_exact_budget_and_seed():
    def make():
        torch.manual_seed(0)
        return shapes.lenet5()

    numel = sum(shapes.weights(make()).values())
    a = sparsestart.sparsify(make(), 0.05, seed=11)
    b = sparsestart.sparsify(make(), 0.05, seed=11)
    c = sparsestart.sparsify(make(), 0.05, seed=12)
    layers = lambda m: [x for x in m.modules() if isinstance(x, SparseLayer)]  # noqa: E731
    assert sum(x.nnz for x in layers(a)) == round(0.05 * numel)
    assert all(torch.equal(p.mask(), q.mask()) for p, q in zip(layers(a), layers(b)))
    assert not all(torch.equal(p.mask(), q.mask()) for p, q in zip(layers(a), layers(c)))
    erk = allocate_densities(make(), 0.05, "erk")
    assert [x.density for x in layers(a)] == pytest.approx(list(erk.values()), abs=1e-12)
    # uniform and dict densities keep working
    u = sparsestart.sparsify(make(), 0.05, "uniform", seed=1)
    assert all(x.density == pytest.approx(0.05, abs=0.01) for x in layers(u))
    dd = {n: 0.5 for n in shapes.weights(make())}
    assert all(x.density == pytest.approx(0.5, abs=0.01) for x in layers(sparsestart.sparsify(make(), dd)))
    with pytest.raises(TypeError, match="takes no option 'bogus'"):
        sparsestart.sparsify(make(), 0.05, "erk", bogus=1)
    with pytest.raises(ValueError, match="flow must be None or one of"):
        sparsestart.sparsify(make(), 0.05, flow="magic")


def test_sparsify_passes_options_and_exclude():
    torch.manual_seed(0)
    model = shapes.mlp((32, 64, 64, 8))
    x, y = torch.randn(8, 32), torch.randint(0, 8, (8,))
    expected = allocate_densities(model, 0.1, "snip", data=(x, y), exclude=["5"])
    sparsestart.sparsify(model, 0.1, "snip", data=(x, y), exclude=["5"], seed=0)
    assert type(model[5]) is nn.Linear
    assert [model[1].density, model[3].density] == pytest.approx([expected["1"], expected["3"]], abs=1e-12)


def test_balanced_paper_rule_loses_the_budget_of_saturated_layers(meta_models):
    """Gadhikar et al.'s own formula (and released code): x = d N / L, p_l = min(1, x / N_l).

    On the CIFAR VGG-16 (13 convs + Linear(512, 10), N = 14,715,584) the first three convs and the
    classifier saturate, and what they cannot hold is lost: 0.0794 overall at d = 0.1, 0.0090 at 0.01.
    The default (exact_budget=True) solves for x and meets the budget."""
    model = meta_models["vgg16"]
    numel = {n: m.weight.numel() for n, m in maskable_layers(model)}
    N, L = sum(numel.values()), len(numel)
    assert (N, L) == (14_715_584, 14)
    for d, overall in ((0.1, 0.07941), (0.01, 0.009037)):
        paper = allocate_densities(model, d, "balanced", exact_budget=False)
        x = d * N / L
        for n, p in paper.items():
            assert round(p * numel[n]) == min(numel[n], round(x)) or abs(p * numel[n] - min(numel[n], x)) <= 1
        got = sum(round(p * numel[n]) for n, p in paper.items()) / N
        assert got == pytest.approx(overall, abs=2e-5)
        assert got < d
        exact = allocate_densities(model, d, "balanced")
        assert exact == allocate_densities(model, d, "balanced", exact_budget=True)
        _check_allocation(model, exact, d)
        # The two differ only in x: the same layers saturate at d = 0.1, the free ones are denser when exact.
        free = [n for n in exact if exact[n] < 1.0]
        assert all(exact[n] > paper[n] for n in free)
    # Where nothing saturates the two rules agree.
    assert allocate_densities(model, 0.001, "balanced", exact_budget=False) == \
        allocate_densities(model, 0.001, "balanced")
    with pytest.raises(ValueError, match="exact_budget"):
        allocate_densities(model, 0.1, "balanced", exact_budget="no")


def test_sparsify_balanced_paper_rule():
    # MLP 16-256-256-256-2 at d = 0.1: x = dN/4 = 3392 weights per layer, the 512-weight classifier saturates.
    model = sparsestart.sparsify(shapes.mlp((16, 256, 256, 256, 2)), 0.1, "balanced", exact_budget=False, seed=0)
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    assert [m.nnz for m in layers] == [3392, 3392, 3392, 512]
    exact = sparsestart.sparsify(shapes.mlp((16, 256, 256, 256, 2)), 0.1, "balanced", seed=0)
    assert sum(m.nnz for m in exact.modules() if isinstance(m, SparseLayer)) == round(0.1 * 135_680)
