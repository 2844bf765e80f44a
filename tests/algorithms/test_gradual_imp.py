"""Gradual pruning with regrowth (GraNet) and IMP with rewinding."""
import pytest
import torch
import torch.nn.functional as F

import sparsestart.algorithms as algorithms
from tests.algorithms.helpers import batches, build, cnn, mlp, train


def _magnitudes(algo):
    """{(layer, row, col): |w|} of every stored entry."""
    out = {}
    for name, layer in algo.layers.items():
        rows, cols, slots = layer.sparse_weight.coo()
        for r, c, s in zip(rows.tolist(), cols.tolist(), slots.tolist()):
            out[(name, r, c)] = abs(float(layer.values.detach()[s]))
    return out


def _assert_global_magnitude_prune(before, after):
    removed = [v for k, v in before.items() if k not in after]
    kept = [v for k, v in before.items() if k in after]
    assert removed and kept
    assert max(removed) <= min(kept)
    return len(removed)


# ------------------------------------------------------------------------ gradual
def test_gradual_cubic_schedule():
    model, opt, algo = build("gradual", mlp, dict(final_density=0.1, total_steps=100, update_every=10,
                                                   prune_start=0.2, prune_end=0.6))
    d_i = algo.initial_density
    assert algo.density_at(0) == algo.density_at(20) == pytest.approx(d_i)
    assert algo.density_at(40) == pytest.approx(0.1 + (d_i - 0.1) * 0.5 ** 3)
    assert algo.density_at(60) == algo.density_at(90) == pytest.approx(0.1)


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_gradual_meets_the_schedule_at_every_update(growth):
    steps = 40
    model, opt, algo = build("gradual", cnn, dict(final_density=0.1, total_steps=steps, update_every=4,
                                                   prune_end=0.5, t_end=0.8, growth=growth, seed=0))

    def check(t):
        if t % 4 == 0:
            assert algo.nnz == algo.target_nnz(t)

    train(model, opt, algo, batches(model, steps), validate=True, after_step=check)
    assert algo.nnz == round(0.1 * algo.numel)
    events = {(e["event"], e["step"]) for e in algo.history}
    assert {s for ev, s in events if ev == "prune"} == {4, 8, 12, 16, 20}
    assert {s for ev, s in events if ev == "rewire"} == {4, 8, 12, 16, 20, 24, 28}


def test_gradual_prunes_globally_by_magnitude():
    model, opt, algo = build("gradual", mlp, dict(final_density=0.1, total_steps=20, update_every=5,
                                                   drop_fraction=0.0))
    for t, (x, y) in enumerate(batches(model, 5), 1):
        F.cross_entropy(model(x), y % 3).backward()
        opt.step()
        opt.zero_grad()
        before = _magnitudes(algo)
        algo.step()
    assert _assert_global_magnitude_prune(before, _magnitudes(algo)) == before.__len__() - algo.nnz


# ------------------------------------------------------------------------ IMP
def test_imp_levels_follow_0_8_power():
    model, opt, algo = build("imp", mlp, dict(final_density=0.1))
    nnz0, d0 = algo.nnz, algo.density
    final = round(0.1 * algo.numel)
    assert algo.levels == min(k for k in range(50) if round(nnz0 * 0.8 ** k) <= final)
    data = batches(model, 3 * (algo.levels + 1))
    densities = []
    for level in range(algo.levels):
        train(model, opt, algo, data[3 * level:3 * level + 3])
        densities.append(algo.prune_and_rewind())
        assert algo.level == level + 1
        assert algo.nnz == max(round(nnz0 * 0.8 ** (level + 1)), final)
    assert algo.done and densities[-1] == pytest.approx(final / algo.numel)
    assert densities[0] == pytest.approx(d0 * 0.8, rel=1e-2)
    with pytest.warns(RuntimeWarning, match="already reached"):
        assert algo.prune_and_rewind() == densities[-1]
    assert algo.level == algo.levels


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_imp_rewinds_survivors_and_resets_optimizer(rewind_step):
    model, opt, algo = build("imp", cnn, dict(final_density=0.05, rewind_step=rewind_step))
    data = batches(model, 8)
    snapshot = {}

    def remember(t):
        if t == rewind_step:
            snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
    remember(0)
    train(model, opt, algo, data, after_step=remember)
    before = _magnitudes(algo)
    assert opt.state
    algo.prune_and_rewind()
    _assert_global_magnitude_prune(before, _magnitudes(algo))
    assert not opt.state  # optimizer state reset
    for name, layer in algo.layers.items():
        m = layer.sparse_weight
        live = m.slot[:m.nnz].long()
        saved = snapshot[f"{name}.values"]
        assert torch.equal(layer.values.detach()[live], saved[live])
        free = m.slot[m.nnz:].long()
        assert bool((layer.values.detach()[free] == 0).all())
        assert torch.equal(layer.bias.detach(), snapshot[f"{name}.bias"])  # rewind_dense=True
    assert algo.snapshot_step == rewind_step


def test_imp_callbacks_and_rewind_point_errors():
    seen = []
    model, opt, algo = build("imp", mlp, dict(final_density=0.2, rewind_step=5,
                                               on_level_end=[lambda a: seen.append((a.level, a.density))]))
    with pytest.raises(RuntimeError, match="rewind_step=5"):
        algo.prune_and_rewind()
    train(model, opt, algo, batches(model, 5))
    d = algo.prune_and_rewind()
    assert seen == [(1, d)]
    with pytest.raises(TypeError, match="callables"):
        algorithms.IMP(model, opt, final_density=0.1, on_level_end=[3])
