"""Tests of sparsestart.theory (bounds of Gadhikar et al. 2023 and the construction)."""
import math

import pytest
import torch
from torch import nn

from sparsestart import theory as T


# ---------------------------------------------------------------------------
# formulas against hand-computed values
# ---------------------------------------------------------------------------

def test_width_factors_hand_computed():
    # target 2-3-1 (L = 2), m_1 = 6, m_2 = 3, p = (1, 0.5, 0.5), delta = 0.1
    q = T.width_factors([2, 3, 1], [1.0, 0.5, 0.5], 0.1)
    q1 = math.log(2 * 3 / 0.1) / math.log(2)  # log(60)/log 2
    q0 = math.log(2 * 6 * q1 / 0.1) / math.log(2)
    assert q[2] == 1.0
    assert q[1] == pytest.approx(q1, rel=1e-12)
    assert q[0] == pytest.approx(q0, rel=1e-12)
    assert q1 == pytest.approx(5.906890595608519)
    assert q0 == pytest.approx(9.469289486960589)


def test_width_factors_integer_and_required_widths():
    q = T.width_factors([2, 3, 1], [1.0, 0.5, 0.5], 0.1, integer=True)
    # q_1 = ceil(5.9069) = 6; q_0 = ceil(log(2*6*6/0.1)/log 2) = ceil(9.4919) = 10
    assert q == [10.0, 6.0, 1.0]
    assert T.required_widths([2, 3, 1], [1.0, 0.5, 0.5], 0.1) == [20, 18, 1]


def test_depth_three_uses_the_next_layer_density():
    # L = 3: q_l is governed by p_{l+1} and m_{l+1}; change only p_3 -> only q_2 (and
    # through it q_1, q_0) change; change only p_0 -> nothing changes.
    sizes, d = [3, 4, 5, 2], 0.05
    base = T.width_factors(sizes, [0.5, 0.5, 0.5, 0.5], d)
    q2 = math.log(3 * 10 / d) / math.log(2)
    q1 = math.log(3 * 20 * q2 / d) / math.log(2)
    q0 = math.log(3 * 12 * q1 / d) / math.log(2)
    assert base == pytest.approx([q0, q1, q2, 1.0], rel=1e-12)
    other_p3 = T.width_factors(sizes, [0.5, 0.5, 0.5, 0.2], d)
    assert other_p3[2] == pytest.approx(math.log(3 * 10 / d) / math.log(1 / 0.8))
    assert T.width_factors(sizes, [0.01, 0.5, 0.5, 0.5], d) == base


def test_theorem_2_1_is_the_L2_case():
    # Theorem 2.1: q_1 >= log(2 m_2/delta)/log(1/(1-p_2)), q_0 >= log(2 m_1 q_1/delta)/log(1/(1-p_1))
    d_in, n1, n2 = 7, 11, 3
    p0, p1, p2, delta = 0.9, 0.3, 0.2, 0.01
    q = T.width_factors([d_in, n1, n2], [p0, p1, p2], delta)
    q1 = math.log(2 * n1 * n2 / delta) / math.log(1 / (1 - p2))
    q0 = math.log(2 * d_in * n1 * q1 / delta) / math.log(1 / (1 - p1))
    assert q == pytest.approx([q0, q1, 1.0], rel=1e-12)


def test_target_nonzeros_and_clamp():
    q = T.width_factors([4, 4, 2], 0.5, 0.1, target_nonzeros=[5, 3])
    q1 = math.log(2 * 3 / 0.1) / math.log(2)
    assert q[1] == pytest.approx(q1)
    assert q[0] == pytest.approx(math.log(2 * 5 * q1 / 0.1) / math.log(2))
    # dense layers: factor 1 (the formula gives 0), near-dense: clamped at 1
    assert T.width_factors([4, 4, 2], 1.0, 0.1) == [1.0, 1.0, 1.0]
    assert T.width_factors([4, 4, 2], 0.999999, 0.1) == [1.0, 1.0, 1.0]
    assert T.required_widths([4, 4, 2], 1.0, 0.1) == [4, 4, 2]


def test_width_factors_conv():
    # channels 3 -> 8 -> 4, kernels 3x3 and 1; m_1 = 8*3*9, m_2 = 4*8*1
    q = T.width_factors_conv([3, 8, 4], [(3, 3), 1], 0.25, 0.01)
    q1 = math.log(2 * 32 / 0.01) / math.log(1 / 0.75)
    q0 = math.log(2 * 216 * q1 / 0.01) / math.log(1 / 0.75)
    assert q == pytest.approx([q0, q1, 1.0], rel=1e-12)
    # a 1x1 conv is a linear layer
    assert T.width_factors_conv([3, 8, 4], [1, 1], 0.25, 0.01) == T.width_factors([3, 8, 4], 0.25, 0.01)
    w = T.required_widths([3, 8, 4], 0.25, 0.01, kernel_sizes=[(3, 3), 1])
    # whole copies: the integer q_1 enters q_0
    q0i = math.ceil(math.log(2 * 216 * math.ceil(q1) / 0.01) / math.log(1 / 0.75))
    assert w == [3 * q0i, 8 * math.ceil(q1), 4]


def test_include_p0():
    q = T.width_factors([2, 3, 1], [0.5, 0.5, 0.5], 0.1, include_p0=True)
    q1 = math.log(60) / math.log(2)
    assert q[1] == pytest.approx(q1)
    assert q[0] == pytest.approx(math.log(2 * 6 * q1 / 0.1) / math.log(1 / (1 - 0.25)))
    assert T.width_factors([2, 3, 1], [1.0, 0.5, 0.5], 0.1, include_p0=True) == \
        T.width_factors([2, 3, 1], [1.0, 0.5, 0.5], 0.1)


def test_lower_bound_width():
    # d = 1: log(1/delta)/log(1/(1-p))
    assert T.lower_bound_width(1, 0.5, 0.01) == pytest.approx(math.log(100) / math.log(2))
    d, p, delta = 10, 0.2, 0.05
    expect = math.log(1 / (1 - (1 - delta) ** (1 / d))) / math.log(1 / (1 - p))
    assert T.lower_bound_width(d, p, delta) == pytest.approx(expect, rel=1e-12)
    assert T.lower_bound_width(d, 1.0, delta) == 0.0
    # it is a lower bound: at that width each input is connected w.p. exactly 1 - delta overall
    n = T.lower_bound_width(d, p, delta)
    assert (1 - (1 - p) ** n) ** d == pytest.approx(1 - delta)


def test_subset_sum_size():
    assert T.subset_sum_size(0.5, 0.01, 0.1) == pytest.approx(math.log(100) / math.log(2))
    assert T.subset_sum_size(0.5, 0.1, 0.01, C=3.0) == pytest.approx(3 * math.log(100) / math.log(2))
    assert T.subset_sum_size(1.0, 0.1, 0.1) == 0.0


# ---------------------------------------------------------------------------
# monotonicity
# ---------------------------------------------------------------------------

def test_monotone_in_density_and_delta():
    sizes = [6, 10, 10, 4]
    ps = [0.9, 0.7, 0.5, 0.3, 0.1, 0.05, 0.01]
    qs = [T.width_factors(sizes, p, 0.1) for p in ps]
    for a, b in zip(qs, qs[1:]):
        assert all(y > x for x, y in zip(a[:-1], b[:-1]))  # sparser -> wider
    ds = [0.5, 0.1, 0.01, 0.001]
    qs = [T.width_factors(sizes, 0.3, d) for d in ds]
    for a, b in zip(qs, qs[1:]):
        assert all(y > x for x, y in zip(a[:-1], b[:-1]))  # smaller delta -> wider
    lb = [T.lower_bound_width(8, p, 0.1) for p in ps]
    assert all(y > x for x, y in zip(lb, lb[1:]))
    lb = [T.lower_bound_width(8, 0.3, d) for d in ds]
    assert all(y > x for x, y in zip(lb, lb[1:]))
    ss = [T.subset_sum_size(p, 0.1, 0.1) for p in ps]
    assert all(y > x for x, y in zip(ss, ss[1:]))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(bad):
    with pytest.raises(ValueError, match=r"densities\[1\].*" + ("nan" if bad != bad else str(bad))):
        T.width_factors([2, 3, 1], [0.5, bad, 0.5], 0.1)
    with pytest.raises(ValueError, match="density"):
        T.lower_bound_width(3, bad, 0.1)
    with pytest.raises(ValueError, match="density"):
        T.subset_sum_size(bad, 0.1, 0.1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2.0])
def test_bad_delta(bad):
    with pytest.raises(ValueError, match=r"delta.*" + str(bad)):
        T.width_factors([2, 3, 1], 0.5, bad)
    with pytest.raises(ValueError, match="delta"):
        T.width_factors_conv([2, 3, 1], [3, 3], 0.5, bad)
    with pytest.raises(ValueError, match="delta"):
        T.lower_bound_width(3, 0.5, bad)
    with pytest.raises(ValueError, match="delta"):
        T.subset_sum_size(0.5, bad, 0.1)


def test_bad_lengths_and_sizes():
    with pytest.raises(ValueError, match=r"densities.*3.*2 entries"):
        T.width_factors([2, 3, 1], [0.5, 0.5], 0.1)
    with pytest.raises(ValueError, match="target_nonzeros"):
        T.width_factors([2, 3, 1], 0.5, 0.1, target_nonzeros=[6])
    with pytest.raises(ValueError, match=r"target_nonzeros\[0\]"):
        T.width_factors([2, 3, 1], 0.5, 0.1, target_nonzeros=[7, 3])
    with pytest.raises(ValueError, match="kernel_sizes"):
        T.width_factors_conv([2, 3, 1], [3], 0.5, 0.1)
    with pytest.raises(ValueError, match=r"target_sizes\[1\]"):
        T.width_factors([2, 0, 1], 0.5, 0.1)
    with pytest.raises(ValueError, match="target_sizes"):
        T.width_factors([2], 0.5, 0.1)
    with pytest.raises(ValueError, match="d_in"):
        T.lower_bound_width(0, 0.5, 0.1)
    with pytest.raises(ValueError, match="eps"):
        T.subset_sum_size(0.5, 0.1, 0.0)
    with pytest.raises(ValueError, match="C"):
        T.subset_sum_size(0.5, 0.1, 0.1, C=-1)


# ---------------------------------------------------------------------------
# the construction
# ---------------------------------------------------------------------------

def _target(sizes, seed=0, final_relu=False):
    torch.manual_seed(seed)
    mods = []
    for l in range(1, len(sizes)):
        mods.append(nn.Linear(sizes[l - 1], sizes[l]))
        if l < len(sizes) - 1 or final_relu:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def test_construct_generous_width_matches_target():
    tgt = _target([5, 8, 6, 3])
    widths = T.required_widths([5, 8, 6, 3], [1.0, 0.3, 0.3, 0.3], 1e-6)
    res = T.construct(tgt, [1.0, 0.3, 0.3, 0.3], seed=0, widths=widths)
    assert res.success and res.missing == 0
    assert res.widths == widths
    assert res.max_error(n=4096) < 1e-5
    # explicit check on inputs at the corners of the domain [-1, 1]^d
    x = torch.tensor([[-1.0] * 5, [1.0] * 5, [-1.0, 1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        assert (res.source(x) - T.target_forward(tgt, x)).abs().max() < 1e-5
    # the subnetwork lives on the ER mask, and layer shapes are the source widths
    for m, u, lin in zip(res.source.masks(), res.subnetwork_masks, res.source.layers):
        assert not (u & ~m).any()
        assert tuple(lin.weight.shape) == tuple(m.shape)
    assert [lin.out_features for lin in res.source.layers] == widths
    d = res.diagnostics
    assert d[1]["placed"] == d[1]["pairs"] == 8 * 5 * (widths[1] // 8)
    assert d[0]["min_copies"] == d[0]["max_copies"] == widths[0] // 5


def test_construct_default_widths_er_layer0_and_weight_list():
    # p_0 < 1 with the default widths (include_p0) and a (weight, bias) list target
    g = torch.Generator().manual_seed(1)
    W1, b1 = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    W2, b2 = torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    W1[0, 1] = 0.0  # sparse target: fewer nonzeros to place
    res = T.construct([(W1, b1), (W2, b2)], 0.5, delta=1e-4, seed=3)
    assert res.success
    assert res.max_error() < 1e-5
    assert res.diagnostics[1]["target_nonzeros"] == 23
    # output ReLU is mirrored; wider input domain via input_min
    tgt = _target([3, 5, 2], final_relu=True)
    res = T.construct(tgt, [1.0, 0.5, 0.5], delta=1e-4, seed=0, input_min=-4.0)
    assert res.success and res.layer0_bias == 4.0
    assert res.max_error(low=-4.0, high=4.0) < 1e-5


def test_construct_fails_at_tiny_width_high_sparsity():
    tgt = _target([4, 8, 3])
    res = T.construct(tgt, [1.0, 0.05, 0.05], seed=0, widths=[4, 8, 3])
    assert not res.success
    assert res.missing > 0
    assert res.diagnostics[1]["missing"] + res.diagnostics[2]["missing"] == res.missing
    assert res.max_error() > 1e-3


def test_construct_seeded_and_bad_widths():
    tgt = _target([4, 8, 3])
    a = T.construct(tgt, 0.5, 0.1, seed=7)
    b = T.construct(tgt, 0.5, 0.1, seed=7)
    for ma, mb in zip(a.source.masks(), b.source.masks()):
        assert torch.equal(ma, mb)
    with pytest.raises(ValueError, match="widths"):
        T.construct(tgt, 0.5, seed=0, widths=[4, 7, 3])
    with pytest.raises(ValueError, match="widths"):
        T.construct(tgt, 0.5, seed=0, widths=[40, 80, 4])
    with pytest.raises(ValueError, match="densities"):
        T.construct(tgt, [0.5, 0.5], seed=0)
    with pytest.raises(ValueError, match="target"):
        T.construct(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), 0.5)


def test_success_rate_matches_exact_probability():
    # at the required widths the success rate is about the exact probability (>= 1 - delta)
    tgt = _target([3, 4, 2])
    dens = [1.0, 0.5, 0.5]
    w = T.required_widths([3, 4, 2], dens, 0.3)
    p = T.success_probability([3, 4, 2], dens, w)
    assert p >= 1 - 0.3
    n = 150
    ok = sum(T.construct(tgt, dens, seed=s, widths=w).success for s in range(n))
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(ok / n - p) < 4 * sd + 1e-9


# ---------------------------------------------------------------------------
# Figure 2
# ---------------------------------------------------------------------------

def test_fig2_rows(tmp_path):
    s = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]
    rows = T.fig2(s)
    assert len(rows) == len(s)
    assert set(rows[0]) == set(T.FIG2_COLUMNS)
    assert rows[0]["width"] == 128.0  # dense: one copy
    r5 = rows[1]
    assert r5["q1"] == pytest.approx(math.log(2 * 1280 / 0.001) / math.log(2))
    widths = [r["width"] for r in rows]
    assert all(b > a for a, b in zip(widths, widths[1:]))
    assert all(r["width_int"] >= r["width"] for r in rows)
    # moderate up to 0.9, sharp beyond 0.95
    w = {r["sparsity"]: r["width"] for r in rows}
    assert w[0.9] / w[0.5] < 10
    assert w[0.99] / w[0.95] > 4
    path = tmp_path / "fig2.csv"
    T.write_fig2_csv(rows, path)
    lines = path.read_text().strip().splitlines()
    assert lines[0] == ",".join(T.FIG2_COLUMNS) and len(lines) == len(s) + 1
    with pytest.raises(ValueError, match="sparsities"):
        T.fig2([0.5, 1.0])
