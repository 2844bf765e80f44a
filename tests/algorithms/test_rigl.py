"""RigL and SET: drop the smallest |w|, grow by largest |dense gradient| or at random; the dense gradient."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsestart
import sparsestart.algorithms as algorithms
from sparsestart.algorithms.gradient import GradientCapture, dense_gradient, topk_absent_gradient
from sparsestart.algorithms.structure import sample_absent, zero_slot_state
from sparsestart.nn import SparseConv2d, SparseLinear
from tests.algorithms.helpers import batches, build, cnn, mlp, sparse_layers, train

F64 = torch.float64


def _linear(format="csr", block_size=None, capacity_extra=8):
    layer = SparseLinear(16, 12, density=0.4, format=format, block_size=block_size, seed=3, dtype=F64)
    if capacity_extra:
        grown = SparseLinear(16, 12, density=0.4, format=format, block_size=block_size, seed=3, dtype=F64,
                             capacity=layer.sparse_weight.nnz + capacity_extra)
        layer = grown
    return layer


def _conv():
    return SparseConv2d(3, 8, 3, stride=2, padding=1, density=0.3, seed=4, dtype=F64,
                        capacity=int(0.3 * 8 * 27) + 10)


def _dense_grad(layer, x, y):
    """dL/dW of the dense twin (torch weight shape -> [M, K])."""
    twin = layer.to_dense()
    loss = F.cross_entropy(_flat(twin(x)), y)
    (g,) = torch.autograd.grad(loss, twin.weight)
    return g.reshape(layer.matrix_shape)


def _flat(out):
    return out.reshape(out.shape[0], -1)


def _block_sum(t, b):
    M, K = t.shape
    return t.reshape(M // b, b, K // b, b).sum(dim=(1, 3))


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_rigl_update_drops_smallest_and_grows_largest_dense_gradient(kind):
    layer = {"linear": _linear, "conv": _conv, "bsr": lambda: _linear("bsr", 4, capacity_extra=3)}[kind]()
    model = nn.Sequential(layer)
    # lr = 0: values do not move, so the magnitudes that decide the drop are known; momentum fills the state.
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    algo = algorithms.RigL(model, opt, total_steps=10, update_every=1, drop_fraction=0.3, t_end=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 6, 6, generator=g, dtype=F64) if kind == "conv" else torch.randn(20, 16, generator=g,
                                                                                                  dtype=F64)
    n_out = _flat(layer(x)).shape[1]
    y = torch.randint(0, n_out, (20,), generator=g)

    b = layer.block_size
    m = layer.sparse_weight
    old_mask = m.mask()  # element mask [M, K]
    old_dense = m.to_dense().detach().clone()
    grad = _dense_grad(layer, x, y)

    loss = F.cross_entropy(_flat(model(x)), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    old_momentum = opt.state[layer.values]["momentum_buffer"].clone()
    old_slots = {k: s for k, s in _slot_map(m).items()}
    algo.step()
    layer.validate()

    # Expected, computed densely on the (block) grid.
    bm_old = old_mask[::b, ::b]
    nnz = int(bm_old.sum())
    k = math.ceil(algo.drop_fraction_at(1) * nnz - 1e-9)
    mag = _block_sum(old_dense.abs(), b) if b > 1 else old_dense.abs()
    mag = torch.where(bm_old, mag, torch.full_like(mag, float("inf")))
    drop = torch.zeros_like(bm_old).flatten()
    drop[torch.topk(mag.flatten(), k, largest=False).indices] = True
    kept = bm_old & ~drop.view_as(bm_old)
    score = _block_sum(grad.abs(), b) if b > 1 else grad.abs()
    score = torch.where(kept, torch.full_like(score, -float("inf")), score)
    grow = torch.zeros_like(bm_old).flatten()
    grow[torch.topk(score.flatten(), k).indices] = True
    expected = kept | grow.view_as(bm_old)

    new_mask = layer.sparse_weight.mask()[::b, ::b]
    assert torch.equal(new_mask, expected)
    assert int(new_mask.sum()) == nnz  # nnz constant

    # Values: kept entries unchanged, new entries zero; optimizer state: kept unchanged, new/free zero.
    m = layer.sparse_weight
    new_slots = _slot_map(m)
    momentum = opt.state[layer.values]["momentum_buffer"]
    for key, slot in new_slots.items():
        if key in old_slots:
            assert slot == old_slots[key]
            assert torch.equal(layer.values[slot], old_dense_value(old_dense, key, b))
            assert torch.equal(momentum[slot], old_momentum[slot])
        else:
            assert bool((layer.values[slot] == 0).all()) and bool((momentum[slot] == 0).all())
    free = m.slot[m.nnz:].long()
    assert bool((layer.values.detach()[free] == 0).all()) and bool((momentum[free] == 0).all())
    entry = algo.history[-1]
    assert entry["step"] == 1 and entry["event"] == "rewire" and entry["k"] == k
    assert entry["dropped"] == entry["grown"] == k - entry["regrown"]


def _slot_map(m):
    rows, cols, slots = m.coo()
    return {(int(r), int(c)): int(s) for r, c, s in zip(rows, cols, slots)}


def old_dense_value(dense, key, b):
    r, c = key
    v = dense[r * b:(r + 1) * b, c * b:(c + 1) * b]
    return v.reshape(()) if b == 1 else v


def _one_sgd_step(density):
    """A 6 -> 5 layer at ``density`` with RigL updating every step, after one SGD step with momentum."""
    layer = SparseLinear(6, 5, density=density, seed=0, dtype=F64)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = algorithms.RigL(model, opt, total_steps=4, update_every=1, t_end=1.0)
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return layer, opt, algo


def test_dense_layer_is_left_as_it_is():
    # Density 1: every candidate to grow is a just-dropped position, so an update could only regrow them all.
    layer, opt, algo = _one_sgd_step(1.0)
    before = layer.values.detach().clone(), layer.rowptr.clone(), layer.col.clone(), layer.slot.clone()
    algo.step()
    after = layer.values.detach(), layer.rowptr, layer.col, layer.slot
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _scatter(layer, per_slot):
    """A per-slot tensor (e.g. momentum) laid out as the dense [M, K] weight."""
    rows, cols, slots = layer.sparse_weight.coo()
    out = torch.zeros(layer.matrix_shape, dtype=per_slot.dtype)
    out[rows, cols] = per_slot[slots]
    return out


def test_dropped_position_regrown_keeps_value_and_state():
    # One absent position of 30: of the k dropped positions at least k - 1 must come back.
    layer, opt, algo = _one_sgd_step(29 / 30)
    assert layer.sparse_weight.nnz == 29
    weight_before = layer.to_dense().weight.detach().clone()
    momentum_before = _scatter(layer, opt.state[layer.values]["momentum_buffer"])
    mask_before = layer.mask().clone()
    algo.step()
    event = algo.history[-1]
    k = event["k"]
    assert k >= 2 and event["regrown"] >= k - 1 and event["regrown"] + event["grown"] == k
    assert event["dropped"] == event["grown"]
    kept_or_regrown = mask_before & layer.mask()
    assert int(kept_or_regrown.sum()) == 29 - event["dropped"]
    momentum_after = _scatter(layer, opt.state[layer.values]["momentum_buffer"])
    assert torch.equal(layer.to_dense().weight.detach()[kept_or_regrown], weight_before[kept_or_regrown])
    assert torch.equal(momentum_after[kept_or_regrown], momentum_before[kept_or_regrown])


@pytest.mark.parametrize("make", [mlp, cnn, lambda: mlp(format="bsr", block_size=4)], ids=["mlp", "cnn", "bsr"])
def test_chunked_dense_gradient_equals_unchunked_and_dense(make):
    model = make().double()
    layers = sparse_layers(model)
    capture = GradientCapture(layers, due=lambda: True)
    (x, y), (x2, y2) = batches(model, 2)
    dense = sparsestart.densify(_copy_without_hooks(model))
    out_classes = list(layers.values())[-1].weight_shape[0]
    total = None
    for xb, yb in ((x, y), (x2, y2)):  # two passes before an update: gradients add up
        F.cross_entropy(model(xb.double()), yb % out_classes).backward()
        F.cross_entropy(dense(xb.double()), yb % out_classes).backward()
    for name, layer in layers.items():
        pairs = capture.pairs[name]
        assert len(pairs) == 2
        full = dense_gradient(layer, pairs)
        want = dense.get_submodule(name).weight.grad.reshape(layer.matrix_shape)
        assert torch.allclose(full, want, rtol=1e-10, atol=1e-12)
        M = layer.matrix_shape[0]
        chunks = torch.cat([dense_gradient(layer, pairs, slice(r, r + 5)) for r in range(0, M, 5)])
        assert torch.allclose(chunks, full, rtol=1e-12, atol=1e-14)
        m = layer.sparse_weight
        R, Q = m.grid
        rows, cols, _ = m.coo()
        present = rows * Q + cols
        k = min(7, R * Q - m.nnz)
        one_row = topk_absent_gradient(layer, pairs, k, present, max_chunk_elements=1)
        whole = topk_absent_gradient(layer, pairs, k, present)
        assert torch.equal(one_row, whole)
        b = m.block_size
        score = (_block_sum(want.abs(), b) if b > 1 else want.abs()).flatten()
        score[present] = -float("inf")
        assert torch.equal(whole, torch.sort(torch.topk(score, k).indices).values)
    capture.remove()
    assert all(not m._forward_hooks for m in layers.values())


def test_rigl_forms_the_dense_gradient_in_bounded_chunks(monkeypatch):
    import sparsestart.algorithms.gradient as gradient
    shapes = []
    original = gradient._gradient_rows

    def recording(layer, prepared, r0, r1):
        out = original(layer, prepared, r0, r1)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(gradient, "_gradient_rows", recording)
    layer = SparseLinear(64, 40, density=0.1, seed=0)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = algorithms.RigL(model, opt, total_steps=10, update_every=1, max_chunk_elements=64 * 6)
    F.cross_entropy(model(torch.randn(16, 64)), torch.randint(0, 40, (16,))).backward()
    opt.step()
    algo.step()
    assert shapes and all(r * k <= 64 * 6 for r, k in shapes) and sum(r for r, _ in shapes) == 40
    assert algo.history[-1]["grown"] > 0


def _copy_without_hooks(model):
    import copy
    return copy.deepcopy(model)


def test_gradient_is_captured_only_before_update_steps():
    model, opt, algo = build("rigl", mlp, dict(total_steps=40, update_every=4, t_end=1.0))
    for i, (x, y) in enumerate(batches(model, 12)):
        loss = F.cross_entropy(model(x), y % 3)
        opt.zero_grad()
        loss.backward()
        captured = [len(p) for p in algo._capture.pairs.values()]
        due = (algo.step_count + 1) % 4 == 0
        assert captured == ([1] * 3 if due else [0] * 3)
        with torch.no_grad():  # an evaluation pass keeps nothing
            model(x)
        assert [len(p) for p in algo._capture.pairs.values()] == captured
        opt.step()
        algo.step()
        assert all(not p for p in algo._capture.pairs.values())
    assert {e["step"] for e in algo.history} == {4, 8, 12}


@pytest.mark.parametrize("name", ["rigl", "set"])
def test_nnz_constant_and_schedule(name):
    steps = 40
    model, opt, algo = build(name, cnn, dict(total_steps=steps, update_every=5, drop_fraction=0.5, t_end=0.75))
    nnz = {n: l.nnz for n, l in algo.layers.items()}
    train(model, opt, algo, batches(model, steps), after_step=lambda t: _check_nnz(algo, nnz))
    assert algo.end_step == 30
    steps_seen = sorted({e["step"] for e in algo.history})
    assert steps_seen == [5, 10, 15, 20, 25]  # t < T_end only
    for e in algo.history:
        alpha = 0.5 / 2 * (1 + math.cos(math.pi * e["step"] / 30))
        assert e["k"] == math.ceil(alpha * (nnz[e["layer"]]) - 1e-9)
        assert e["dropped"] == e["grown"]
    assert algo.drop_fraction_at(0) == pytest.approx(0.5) and algo.drop_fraction_at(30) == 0.0


def _check_nnz(algo, nnz):
    assert {n: l.nnz for n, l in algo.layers.items()} == nnz


def test_set_is_random_but_seeded():
    def run(seed):
        model, opt, algo = build("set", mlp, dict(total_steps=20, update_every=2, seed=seed))
        train(model, opt, algo, batches(model, 10))
        return [l.mask() for l in algo.layers.values()]
    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_sample_absent_is_uniform_over_absent_positions():
    g = torch.Generator().manual_seed(0)
    present = torch.tensor([2, 5, 6])
    counts = torch.zeros(10)
    for _ in range(2800):
        keys = sample_absent(present, 10, 2, g)
        assert keys.numel() == 2 and keys[0] < keys[1] and not torch.isin(keys, present).any()
        counts[keys] += 1
    assert counts[present].sum() == 0
    absent = counts[[0, 1, 3, 4, 7, 8, 9]]
    assert (absent - 800).abs().max() < 4 * math.sqrt(800)  # 5600 draws over 7 positions
    assert torch.equal(sample_absent(present, 10, 7, g), torch.tensor([0, 1, 3, 4, 7, 8, 9]))
    with pytest.raises(ValueError, match="only 7"):
        sample_absent(present, 10, 8, g)


def test_zero_slot_state_covers_adam_state():
    layer = SparseLinear(8, 4, density=0.5, seed=0)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01, amsgrad=True)
    layer(torch.randn(3, 8)).sum().backward()
    opt.step()
    state = opt.state[layer.values]
    slots = layer.slot[:3].long()
    zero_slot_state(opt, layer.values, slots)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert bool((state[key][slots] == 0).all())
    assert bool((layer.values.grad[slots] == 0).all())
    assert float(state["step"]) == 1.0


def test_top_k_and_isin_sorted():
    from sparsestart.algorithms.structure import isin_sorted, smallest, top_k
    s = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0])
    assert sorted(top_k(s, 2).tolist()) == [0, 2]  # ties: smaller index
    assert sorted(top_k(s, 2, keys=torch.tensor([9, 0, 5, 0, 1, 0])).tolist()) == [2, 4]  # ties: smaller key
    assert smallest(s, 3).tolist() == [1, 3, 5]
    assert top_k(s, 9).tolist() == list(range(6)) and top_k(s, 0).numel() == 0
    a = torch.tensor([0, 4, 7, 9])
    assert isin_sorted(torch.tensor([9, 1, 4, 10, -1]), a).tolist() == [True, False, True, False, False]
    assert not isin_sorted(a, torch.empty(0, dtype=torch.long)).any()


@pytest.mark.parametrize("chunk", [1, 10**6])
def test_topk_absent_gradient_takes_an_infinite_gradient_and_counts_missing_positions(monkeypatch, chunk):
    """+inf is a gradient like any other (a diverging run is not "too few absent positions"); asking
    for more positions than are absent raises and says how many there are."""
    import sparsestart.algorithms.gradient as gradient
    layer = SparseLinear(8, 6, density=0.5, seed=0)
    m = layer.sparse_weight
    R, Q = m.grid
    present = m.keys()
    absent = torch.ones(R * Q, dtype=torch.bool)
    absent[present] = False
    absent_keys = absent.nonzero().flatten()
    grad = torch.rand(R, Q)
    grad.view(-1)[absent_keys[0]] = float("inf")
    monkeypatch.setattr(gradient, "_prepared", lambda layer, pairs: None)
    monkeypatch.setattr(gradient, "_gradient_rows", lambda layer, prepared, r0, r1: grad[r0:r1].clone())
    n_absent = absent_keys.numel()
    keys = topk_absent_gradient(layer, [], n_absent, present, max_chunk_elements=chunk)
    assert torch.equal(keys, absent_keys)
    with pytest.raises(ValueError, match=f"only {n_absent} absent positions for k={n_absent + 1}"):
        topk_absent_gradient(layer, [], n_absent + 1, present, max_chunk_elements=chunk)
