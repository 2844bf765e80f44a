"""Large layers are built sparse directly, never densely; everything smaller is built exactly as before."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import sparsestart
import sparsestart.nn.convert as convert
from sparsestart.nn import LARGE_LAYER_NUMEL, SparseConv2d, SparseLinear, defer_large_weights
from sparsestart.train import run
from sparsestart.train.config import TrainConfig
from sparsestart.train.data import Dataset, Split


def _data(side: int, n: int = 6, classes: int = 10, channels: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g),
                  torch.arange(n) % classes)
    return Dataset("synthetic", split, split, split, classes, [0.5] * channels, [0.25] * channels, False, "test")


def _cfg(**kw) -> TrainConfig:
    base = dict(model="mlp", density=0.1, distribution="erk", method="static", seed=3, device="cpu")
    return TrainConfig(**{**base, **kw})


def _old_build(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """How a run built its net before large layers were deferred: dense build, then sparsify."""
    run._seed_everything(int(cfg.seed))
    net = run.build_net(cfg, data)
    run._sparsify(net, cfg, data)
    return net


def _new_build(cfg: TrainConfig, data: Dataset) -> nn.Module:
    run._seed_everything(int(cfg.seed))
    return run.build_model(cfg, data)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- the small-model path is unchanged
@pytest.mark.parametrize("model,side,channels,extra", [
    ("mlp", 28, 1, {}),
    ("mlp", 28, 1, {"flow": "random_addition", "distribution": "uniform"}),
    ("convnet_small", 28, 1, {"exclude": ["classifier.fc2"]}),
    ("resnet20", 32, 3, {"density": 0.05}),
])
def test_models_without_a_large_layer_are_built_bit_for_bit_as_before(model, side, channels, extra):
    cfg, data = _cfg(model=model, **extra), _data(side, channels=channels)
    old = _old_build(cfg, data)
    rng_old = torch.get_rng_state()
    new = _new_build(cfg, data)
    assert torch.equal(torch.get_rng_state(), rng_old)  # what trains next draws the same numbers too
    _same_state(old, new)


def test_defer_changes_nothing_below_the_threshold():
    torch.manual_seed(0)
    plain = sparsestart.models.get("vgg11", num_classes=10)
    torch.manual_seed(0)
    with defer_large_weights():
        deferred = sparsestart.models.get("vgg11", num_classes=10)
    assert not any(t.is_meta for t in deferred.state_dict().values())
    _same_state(plain, deferred)


def test_defer_puts_only_large_weights_on_meta_and_draws_nothing_for_them():
    torch.manual_seed(0)
    with defer_large_weights(1000):
        model = nn.Sequential(nn.Linear(10, 10), nn.Linear(100, 20), nn.Conv2d(3, 50, 3), nn.Linear(10, 10))
        explicit = nn.Linear(100, 20, device="cpu")  # a device asked for is honoured
    assert [m.weight.is_meta for m in model] == [False, True, True, False]
    assert not any(m.bias.is_meta for m in model) and not explicit.weight.is_meta
    torch.manual_seed(0)
    first = nn.Linear(10, 10)
    torch.testing.assert_close(model[0].weight, first.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="min_numel"):
        with defer_large_weights(-1):
            pass


# ---------------------------------------------------------------------------- sparsify of a meta layer
def test_a_meta_linear_is_built_sparse_with_the_dense_init_distribution():
    with torch.device("meta"):
        lin = nn.Linear(1000, 200)
    lin.bias = nn.Parameter(torch.linspace(-0.5, 0.5, 200))  # a real bias is kept as it is
    model = sparsestart.sparsify(nn.Sequential(lin), 0.25, "uniform", seed=0)
    layer = model[0]
    assert isinstance(layer, SparseLinear) and layer.nnz == 50_000 and layer.values.device.type == "cpu"
    torch.testing.assert_close(layer.bias, torch.linspace(-0.5, 0.5, 200), rtol=0, atol=0)
    v = layer.values.detach()
    dense = nn.Linear(1000, 200).weight.detach().flatten()  # what torch's init draws for the dense weight
    bound = 1 / math.sqrt(1000)
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert abs(float(v.std()) - float(dense.std())) < 0.02 * float(dense.std())
    assert abs(float(v.mean())) < 0.02 * bound
    again = sparsestart.sparsify(nn.Sequential(nn.Linear(1000, 200, device="meta")), 0.25, "uniform", seed=0)[0]
    assert torch.equal(again.mask(), layer.mask()) and torch.equal(again.values, layer.values)


def test_a_meta_conv_and_meta_bias_are_built_fresh():
    with torch.device("meta"):
        conv = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    model = sparsestart.sparsify(nn.Sequential(conv), 0.5, "uniform", seed=0)
    layer = model[0]
    assert isinstance(layer, SparseConv2d) and layer.stride == (2, 2) and layer.padding == (1, 1)
    bound = 1 / math.sqrt(8 * 9)
    assert not layer.bias.is_meta and layer.bias.abs().max() <= bound and layer.bias.abs().sum() > 0
    assert model(torch.randn(2, 8, 10, 10)).shape == (2, 16, 5, 5)


# ---------------------------------------------------------------------------- the trainer's path (small threshold)
def test_the_trainer_builds_a_large_layer_sparse_and_materialises_an_excluded_one(monkeypatch):
    monkeypatch.setattr(convert, "LARGE_LAYER_NUMEL", 100_000)  # fc1 of mlp [256, 512, 10] has 131,072
    data = _data(16)
    cfg = _cfg(model_options={"hidden": [512]})
    net = _new_build(cfg, data)
    assert isinstance(net.fc1, SparseLinear) and isinstance(net.fc2, SparseLinear)
    assert not any(t.is_meta for t in net.state_dict().values())
    assert net(data.train.pixels()).shape == (6, 10)
    excluded = _new_build(_cfg(model_options={"hidden": [512]}, exclude=["fc1"]), data)
    assert type(excluded.fc1) is nn.Linear and not excluded.fc1.weight.is_meta
    assert 0 < excluded.fc1.weight.abs().max() <= 1 / math.sqrt(256)
    dense = _new_build(_cfg(model_options={"hidden": [512]}, density=1.0), data)
    _same_state(dense, _old_build(_cfg(model_options={"hidden": [512]}, density=1.0), data))


# ---------------------------------------------------------------------------- a layer too big to allocate
_LARGE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from sparsestart.train import run
    from sparsestart.train.config import TrainConfig
    from sparsestart.train.data import Dataset, Split

    HIDDEN, SIDE, HEADROOM = {hidden}, {side}, {headroom}

    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (4, 1, SIDE, SIDE), dtype=torch.uint8, generator=g), torch.arange(4))
    data = Dataset("synthetic", split, split, split, 10, [0.5], [0.25], False, "test")
    cfg = TrainConfig(model="mlp", model_options={{"hidden": [HIDDEN]}}, density=0.001, distribution="erk",
                      method="static", seed=0, device="cpu")
    x = data.train.pixels()
    limit = vm_bytes() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:  # the control: under this limit the dense weight cannot be allocated at all
        torch.empty(HIDDEN, SIDE * SIDE).fill_(0.0)
        sys.exit("the dense weight fits under the limit: the test proves nothing")
    except RuntimeError:
        pass
    run._seed_everything(0)
    net = run.build_model(cfg, data)
    out = net(x)
    out.sum().backward()
    fc1 = net.fc1
    print(json.dumps(dict(kind=type(fc1).__name__, numel=fc1.weight_shape[0] * fc1.weight_shape[1], nnz=fc1.nnz,
                          out=list(out.shape), finite=bool(torch.isfinite(out).all()),
                          max_value=float(fc1.values.detach().abs().max()), grad=fc1.values.grad is not None)))
""")


def test_a_layer_too_big_for_memory_builds_sparse_and_runs_forward_and_backward():
    hidden, side = 65_536, 64  # fc1: 65,536 x 4,096 = 256 Mi weights, 1 GiB dense in float32
    assert hidden * side * side > LARGE_LAYER_NUMEL
    headroom = 512 * 2 ** 20  # what the process may grow by: half the dense weight
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    r = subprocess.run([sys.executable, "-c", _LARGE.format(hidden=hidden, side=side, headroom=headroom)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["kind"] == "SparseLinear" and res["numel"] == hidden * side * side
    assert 0 < res["nnz"] < 0.01 * res["numel"]
    assert res["out"] == [4, 10] and res["finite"] and res["grad"]
    assert 0 < res["max_value"] <= 1 / math.sqrt(side * side)
