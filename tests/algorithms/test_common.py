"""Every algorithm: registry, argument checks, valid structure, bit-identical resume, it trains."""
import math

import pytest
import torch
from torch import nn

import sparsestart.algorithms as algorithms
from tests.algorithms.helpers import batches, build, cnn, mlp, roundtrip, sparse_layers, train, validate_all

NAMES = ["static", "imp", "str", "rigl", "set", "gradual", "edgepopup"]


def config(name: str, steps: int) -> dict:
    return {
        "static": {},
        "imp": dict(final_density=0.1, rewind_step=2),
        "str": dict(s_init=-4.0, window=3, compact_every=2),
        "rigl": dict(total_steps=steps, update_every=3, t_end=0.9),
        "set": dict(total_steps=steps, update_every=3, t_end=0.9, seed=1),
        "gradual": dict(final_density=0.15, total_steps=steps, update_every=3, prune_end=0.6, t_end=0.9, seed=1),
        "edgepopup": dict(final_density=0.15, total_steps=steps, levels=3, seed=2, record_every=2),
    }[name]


def imp_levels(algo, at):
    """An after_step callback ending an IMP level at the given steps (other algorithms: nothing)."""
    def after(t):
        if isinstance(algo, algorithms.IMP) and t in at:
            algo.prune_and_rewind()
    return after


# ------------------------------------------------------------------------ registry
def test_get_builds_every_algorithm_by_name():
    for name in NAMES:
        model, opt, algo = build(name, mlp, config(name, 10))
        assert type(algo) is algorithms.ALGORITHMS[name]
        assert algo.name == name
    model = mlp()
    assert isinstance(algorithms.get("RigL", model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=5),
                      algorithms.RigL)


def test_get_unknown_name_lists_valid_names():
    model = mlp()
    with pytest.raises(ValueError, match="magnitude") as err:
        algorithms.get("magnitude", model, torch.optim.SGD(model.parameters(), lr=0.1))
    for name in NAMES:
        assert name in str(err.value)


def test_model_without_sparse_layers_is_rejected():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="sparsify"):
        algorithms.Static(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("name, kwargs, arg", [
    ("rigl", dict(total_steps=10, drop_fraction=0.0), "drop_fraction"),
    ("rigl", dict(total_steps=10, drop_fraction=1.0), "drop_fraction"),
    ("set", dict(total_steps=10, drop_fraction=-0.2), "drop_fraction"),
    ("set", dict(total_steps=10, drop_fraction=1.5), "drop_fraction"),
    ("rigl", dict(total_steps=0), "total_steps"),
    ("rigl", dict(total_steps=10, update_every=0), "update_every"),
    ("rigl", dict(total_steps=10, t_end=0.0), "t_end"),
    ("rigl", dict(total_steps=10, t_end=1.5), "t_end"),
    ("gradual", dict(final_density=0.9, total_steps=10), "final_density"),
    ("gradual", dict(final_density=0.1, total_steps=10, prune_start=0.5, prune_end=0.4), "prune_end"),
    ("gradual", dict(final_density=0.1, total_steps=10, drop_fraction=1.0), "drop_fraction"),
    ("gradual", dict(final_density=0.1, total_steps=10, growth="momentum"), "growth"),
    ("imp", dict(final_density=0.9), "final_density"),
    ("imp", dict(final_density=0.0), "final_density"),
    ("imp", dict(final_density=0.1, prune_fraction=1.0), "prune_fraction"),
    ("imp", dict(final_density=0.1, rewind_step=-1), "rewind_step"),
    ("str", dict(window=0), "window"),
    ("str", dict(s_init=float("nan")), "s_init"),
    ("str", dict(target_density=1.5), "target_density"),
    ("edgepopup", dict(final_density=0.9, total_steps=10), "final_density"),
    ("edgepopup", dict(final_density=0.1, total_steps=10, levels=0), "levels"),
    ("edgepopup", dict(final_density=0.1, total_steps=10, weight_init="xavier"), "weight_init"),
])
def test_bad_arguments_name_the_argument_and_value(name, kwargs, arg):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=arg) as err:
        algorithms.get(name, model, opt, **kwargs)
    assert repr(kwargs[arg]) in str(err.value) or str(kwargs[arg]) in str(err.value)
    # A rejected algorithm leaves no hooks behind.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sparse_layers(model).values())


# ------------------------------------------------------------------------ structure
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", NAMES)
def test_structure_stays_valid(name, make):
    steps = 12
    model, opt, algo = build(name, make, config(name, steps))
    data = batches(model, steps)
    train(model, opt, algo, data, validate=True, after_step=imp_levels(algo, {5, 10}))
    validate_all(model)
    for entry in algo.history:
        assert set(entry) >= {"step", "layer", "dropped", "grown", "density"}
        assert entry["layer"] in algo.layers
    if name != "static":
        assert algo.history, f"{name} made no structure change in {steps} steps"


# ------------------------------------------------------------------------ resume
def _state(model, opt, algo):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "algorithm": algo.state_dict()}


def _assert_same(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name, make):
    n = 6
    cfg = config(name, 2 * n)
    levels = {4, 9}
    model, opt, algo = build(name, make, cfg)
    data = batches(model, 2 * n)
    full_losses = train(model, opt, algo, data, after_step=imp_levels(algo, levels))
    reference = _state(model, opt, algo)

    model, opt, algo = build(name, make, cfg)
    first = train(model, opt, algo, data[:n], after_step=imp_levels(algo, levels))
    saved = roundtrip(_state(model, opt, algo))
    del model, opt, algo

    model, opt, algo = build(name, make, cfg)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    algo.load_state_dict(saved["algorithm"])
    second = train(model, opt, algo, data[n:], after_step=lambda t: imp_levels(algo, levels)(t + n))
    assert first + second == full_losses
    _assert_same(_state(model, opt, algo), reference)


def test_load_state_dict_rejects_another_algorithm():
    model, opt, algo = build("rigl", mlp, config("rigl", 10))
    other = algorithms.SET(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), total_steps=10)
    with pytest.raises(ValueError, match="rigl"):
        other.load_state_dict(algo.state_dict())


# ------------------------------------------------------------------------ it trains
@pytest.mark.parametrize("name", NAMES)
def test_training_reduces_loss(name):
    steps = 150
    cfg = dict(config(name, steps))
    cfg.update({"rigl": dict(update_every=10), "set": dict(update_every=10), "str": dict(window=10, compact_every=10),
                "gradual": dict(update_every=10)}.get(name, {}))
    opt_kwargs = dict(lr=0.1) if name != "edgepopup" else dict(lr=0.2, weight_decay=0.0)
    model, opt, algo = build(name, lambda: mlp(density=0.5), cfg, opt_kwargs)
    data = batches(model, steps, batch=64)
    losses = train(model, opt, algo, data, after_step=imp_levels(algo, {50, 100}))
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.75 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    validate_all(model)
