"""The autotuner of conv_algorithm="auto" / linear_algorithm="auto" (sparsestart.nn.autotune).

Timing is never asserted (machine load): a fake timer decides which candidate wins, and the tests
check that the winner is what the layer then computes with, that every algorithm the tuner may
pick matches the dense module, when the timer runs, and how the cache is kept.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsestart.nn import SparseConv2d, SparseLinear, autotune
from tests.util import compare_with_dense


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on (the suite runs with SPARSESTART_AUTOTUNE=0, see tests/conftest.py), an empty cache,
    no cache file, and both restored afterwards."""
    monkeypatch.delenv(autotune.ENV_CACHE, raising=False)
    autotune.set_enabled(True)
    autotune.clear()
    yield
    autotune.clear()
    autotune.set_enabled(None)


class FakeTimer:
    """Stands in for autotune._time_candidate: runs each candidate once (so a broken one fails) and
    reports the time given for its name, so the winner is chosen by the test."""

    def __init__(self, times: dict):
        self.times, self.calls = times, []

    def __call__(self, name, run, device, limit=None):
        self.calls.append(name)
        run()
        return self.times[name]


def fake_timer(monkeypatch, winner: str, algorithms) -> FakeTimer:
    timer = FakeTimer({a: (1.0 if a == winner else 2.0) for a in algorithms})
    monkeypatch.setattr(autotune, "_time_candidate", timer)
    return timer


def record_algorithms(monkeypatch, layer) -> list:
    """The algorithm of every computation of ``layer`` (the candidates' and the forward's), in order."""
    used = []
    name = "_conv" if isinstance(layer, SparseConv2d) else "_linear"
    real = getattr(layer, name)

    def spy(algorithm, values, x, *bias):
        used.append(algorithm)
        return real(algorithm, values, x, *bias)
    monkeypatch.setattr(layer, name, spy)
    return used


def _empty_conv(**kw):
    conv = nn.Conv2d(3, 4, 3, **kw)
    return SparseConv2d.from_dense(conv, mask=torch.zeros_like(conv.weight, dtype=torch.bool))


# Awkward layers: saturated (density 1), without stored weights (nnz 0), odd sizes, a 1x1 output map,
# strided, dilated, reflect-padded, BSR.
CONV_LAYERS = {
    "density1": lambda: SparseConv2d(3, 5, 3, padding=1, density=1.0, seed=0),
    "nnz0": lambda: _empty_conv(padding=1),
    "odd": lambda: SparseConv2d(3, 7, (3, 2), padding=(1, 0), dilation=(2, 1), density=0.3, seed=1),
    "1x1map": lambda: SparseConv2d(3, 5, 3, density=0.4, seed=2),
    "strided": lambda: SparseConv2d(3, 5, 3, stride=2, padding=1, density=0.4, seed=3),
    "reflect": lambda: SparseConv2d(3, 5, 3, padding=1, padding_mode="reflect", density=0.5, seed=4),
    "bsr": lambda: SparseConv2d(4, 8, 2, density=0.5, format="bsr", block_size=4, seed=5),
}
CONV_INPUTS = {"density1": (2, 3, 7, 5), "nnz0": (1, 3, 5, 5), "odd": (3, 3, 9, 4), "1x1map": (2, 3, 3, 3),
               "strided": (2, 3, 7, 7), "reflect": (2, 3, 5, 6), "bsr": (2, 4, 5, 5)}


@pytest.mark.parametrize("winner", ["direct", "unfold", "dense"])
@pytest.mark.parametrize("case", list(CONV_LAYERS))
def test_every_conv_algorithm_the_tuner_picks_matches_dense(tuning, monkeypatch, case, winner):
    torch.manual_seed(0)
    layer = CONV_LAYERS[case]()
    x = torch.randn(CONV_INPUTS[case])
    direct_ok = layer.stride == (1, 1) and layer.format == "csr"
    valid = ("direct", "unfold", "dense") if direct_ok else ("unfold", "dense")
    timer = fake_timer(monkeypatch, winner, valid)
    used = record_algorithms(monkeypatch, layer)
    compare_with_dense(layer, x)  # forward and backward (input, values, bias) against nn.Conv2d
    assert sorted(timer.calls) == sorted(valid)  # only the algorithms that can compute the call
    expected = winner if winner in valid else "unfold"  # "direct" cannot win where it cannot run
    if winner in valid:
        assert used[-1] == winner
    assert used[-1] == expected and [e["choice"] for e in autotune.entries()] == [expected]


@pytest.mark.parametrize("winner", ["sparse", "dense"])
@pytest.mark.parametrize("case", ["density1", "nnz0", "odd", "bsr", "unbatched"])
def test_every_linear_algorithm_the_tuner_picks_matches_dense(tuning, monkeypatch, case, winner):
    torch.manual_seed(0)
    if case == "nnz0":
        layer = SparseLinear.from_dense(nn.Linear(6, 4), mask=torch.zeros(4, 6, dtype=torch.bool))
    elif case == "bsr":
        layer = SparseLinear(12, 8, density=0.5, format="bsr", block_size=4, seed=0)
    else:
        layer = SparseLinear(7 if case != "density1" else 10, 5, density=1.0 if case == "density1" else 0.3, seed=1)
    x = torch.randn(layer.in_features) if case == "unbatched" else torch.randn(3, 2, layer.in_features)
    timer = fake_timer(monkeypatch, winner, ("sparse", "dense"))
    used = record_algorithms(monkeypatch, layer)
    compare_with_dense(layer, x)
    assert sorted(timer.calls) == ["dense", "sparse"] and used[-1] == winner


def test_dense_linear_gives_gradients_to_stored_values_only(tuning):
    layer = SparseLinear(8, 6, density=0.5, capacity=40, seed=0)  # 24 stored, 16 free slots
    x = torch.randn(5, 8)
    grads = {}
    for algorithm in ("sparse", "dense"):
        layer.linear_algorithm = algorithm
        layer.values.grad = None
        layer(x).square().sum().backward()
        grads[algorithm] = layer.values.grad.clone()
    torch.testing.assert_close(grads["dense"], grads["sparse"], rtol=1e-5, atol=1e-6)
    assert bool((grads["dense"][layer.sparse_weight.slot[24:].long()] == 0).all())


def test_forced_and_heuristic_choices_never_time(tuning, monkeypatch):
    timer = fake_timer(monkeypatch, "unfold", ("direct", "unfold", "dense", "sparse"))
    conv = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)
    lin = SparseLinear(6, 4, density=0.5, seed=0)
    for algorithm in ("direct", "unfold", "dense", "heuristic"):
        conv.conv_algorithm = algorithm
        conv(torch.randn(2, 3, 6, 6)).sum().backward()
    for algorithm in ("sparse", "dense", "heuristic"):
        lin.linear_algorithm = algorithm
        lin(torch.randn(3, 6)).sum().backward()
    assert timer.calls == [] and autotune.entries() == []
    # tuning off: "auto" is the threshold rule, nothing timed either
    autotune.set_enabled(False)
    conv.conv_algorithm, lin.linear_algorithm = "auto", "auto"
    x = torch.randn(2, 3, 6, 6)
    assert conv._algorithm(x, conv._explicit_padding()) == "direct"
    conv(x)
    lin(torch.randn(3, 6))
    assert timer.calls == [] and autotune.entries() == []


def test_cache_hits_once_per_key(tuning, monkeypatch):
    timer = fake_timer(monkeypatch, "unfold", ("direct", "unfold", "dense"))
    layer = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert len(timer.calls) == 3  # one timing per candidate, once
    # another layer of the same shape and density bucket shares the key
    SparseConv2d(3, 5, 3, padding=1, density=0.41, seed=1)(x).sum().backward()
    assert len(timer.calls) == 3
    # new keys: no gradient needed, another input shape, another density bucket
    with torch.no_grad():
        layer(x)
        layer(x)
    layer(torch.randn(1, 3, 6, 6)).sum().backward()
    SparseConv2d(3, 5, 3, padding=1, density=0.1, seed=2)(x).sum().backward()
    assert len(timer.calls) == 4 * 3
    keys = [e["key"] for e in autotune.entries()]
    assert [k["grad"] for k in keys] == ["values", "none", "values", "values"]
    assert keys[0]["input"] == [2, 3, 6, 6] and keys[0]["weight"] == [5, 3, 3, 3]
    assert keys[0]["density_bucket"] == autotune.density_bucket(0.4) == -3
    assert keys[3]["density_bucket"] == -7
    assert keys[0]["threads"] == torch.get_num_threads()


def test_huge_layers_never_materialise_a_dense_weight_to_time_it(tuning, monkeypatch):
    from sparsestart.nn import LARGE_LAYER_NUMEL

    assert autotune.DENSE_MAX_NUMEL == LARGE_LAYER_NUMEL
    monkeypatch.setattr(autotune, "DENSE_MAX_NUMEL", 5 * 3 * 3 * 3 - 1)  # the conv below is just above it
    timer = fake_timer(monkeypatch, "dense", ("direct", "unfold", "dense", "sparse"))
    conv = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)
    conv(torch.randn(2, 3, 6, 6))
    assert sorted(timer.calls) == ["direct", "unfold"]
    monkeypatch.setattr(autotune, "DENSE_MAX_NUMEL", 6 * 4 - 1)
    lin = SparseLinear(6, 4, density=1.0, seed=0)
    used = record_algorithms(monkeypatch, lin)
    lin(torch.randn(3, 6))
    assert used == ["sparse"] and len(timer.calls) == 2  # one candidate left: nothing to time


def test_density_buckets():
    assert autotune.density_bucket(1.0) == 0 and autotune.density_bucket(0.75) == -1
    assert autotune.density_bucket(0.5) == -2 and autotune.density_bucket(0.0) is None


@pytest.mark.parametrize("density", [1.0, 0.75, 0.5, 0.3, 0.1, 0.0625, 0.01, 1e-6, 2.0 ** -0.5, 2.0 ** -7.5])
def test_bucket_density_stays_in_its_bucket(density):
    """Compiled layers choose from the middle of the density's bucket: the same bucket (so the same
    cached choice), one value for every density in it (so no recompilation within it)."""
    mid = autotune.bucket_density(density)
    assert autotune.density_bucket(mid) == autotune.density_bucket(density)
    k = autotune.density_bucket(density)
    for other in (2.0 ** (k / 2) * 1.0001, 2.0 ** ((k + 1) / 2) * 0.9999):
        assert autotune.bucket_density(other) == mid
    assert autotune.bucket_density(0.0) == 0.0


def test_tuning_leaves_the_random_streams_and_the_layer_alone(tuning, monkeypatch):
    import random

    import numpy as np

    layer = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    values = layer.values.detach().clone()
    y = layer(x)
    assert len(autotune.entries()) == 1
    assert torch.equal(before[0], torch.get_rng_state()) and (before[1] == np.random.get_state()[1]).all()
    assert before[2] == random.getstate()
    assert torch.equal(layer.values, values) and layer.values.grad is None and x.grad is None
    y.sum().backward()  # the real call's graph is intact
    assert layer.values.grad is not None and x.grad is not None


def test_save_load_round_trip_and_loaded_choice_is_used(tuning, monkeypatch, tmp_path):
    timer = fake_timer(monkeypatch, "dense", ("direct", "unfold", "dense", "sparse"))
    conv = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)
    lin = SparseLinear(6, 4, density=1.0, seed=0)
    x = torch.randn(2, 3, 6, 6)
    conv(x).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(torch.randn(3, 6)).sum().backward()
    saved = autotune.entries()
    path = tmp_path / "tune.json"
    autotune.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "sparsestart-autotune" and raw["entries"] == saved
    assert saved[1]["key"]["autocast"] == "bfloat16" and saved[1]["key"]["dtype"] == "float32"
    autotune.clear()
    autotune.load(path)
    assert autotune.entries() == saved
    # a loaded choice is used as it is: edit the file so another algorithm is chosen, nothing is timed
    raw["entries"][0]["choice"] = "unfold"
    path.write_text(json.dumps(raw))
    autotune.clear()
    autotune.load(path)
    n = len(timer.calls)
    used = record_algorithms(monkeypatch, conv)
    conv(x).sum().backward()
    assert used == ["unfold"] and len(timer.calls) == n


def test_env_cache_file_is_read_and_written(tuning, monkeypatch, tmp_path):
    path = tmp_path / "auto.json"
    fake_timer(monkeypatch, "direct", ("direct", "unfold", "dense"))
    monkeypatch.setenv(autotune.ENV_CACHE, str(path))
    monkeypatch.setattr(autotune, "_env_cache_loaded", False)
    SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)(torch.randn(2, 3, 6, 6))
    assert [e["choice"] for e in json.loads(path.read_text())["entries"]] == ["direct"]
    autotune.clear()
    monkeypatch.setattr(autotune, "_env_cache_loaded", False)
    assert autotune.lookup(autotune._parse_entry(json.loads(path.read_text())["entries"][0], "x")[0]) == "direct"


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot be read"),
    ('{"format": "other"}', "not a sparsestart autotune cache"),
    ('{"format": "sparsestart-autotune", "version": 9, "entries": []}', "version 9"),
    ('{"format": "sparsestart-autotune", "version": 1, "entries": [{"key": {"op": "conv2d"}, "choice": "direct"}]}',
     r"entry 0: a conv2d key has the fields"),
    ('{"format": "sparsestart-autotune", "version": 1, "entries": [{"key": {"op": "pool"}, "choice": "x"}]}',
     r"key.op must be one of"),
])
def test_corrupt_cache_file_names_the_path_and_adds_nothing(tuning, monkeypatch, tmp_path, content, match):
    fake_timer(monkeypatch, "direct", ("direct", "unfold", "dense"))
    SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=0)(torch.randn(2, 3, 6, 6))
    good = autotune.entries()
    path = tmp_path / "tune.json"
    path.write_text(content)
    with pytest.raises(autotune.AutotuneCacheError, match=match) as info:
        autotune.load(path)
    assert str(path) in str(info.value)
    assert autotune.entries() == good


def test_bad_choice_in_cache_is_refused(tuning, monkeypatch, tmp_path):
    fake_timer(monkeypatch, "unfold", ("unfold", "dense"))
    layer = SparseConv2d(3, 5, 3, stride=2, padding=1, density=0.4, seed=0)
    x = torch.randn(2, 3, 7, 7)
    layer(x)
    state = autotune.state_dict()
    bad = json.loads(json.dumps(state))
    bad["entries"][0]["choice"] = "fastest"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(autotune.AutotuneCacheError, match=r"choice must be one of \('direct', 'unfold', 'dense'\)"):
        autotune.load(path)
    # a known algorithm that cannot compute this call (direct on a strided layer): refused at the call
    bad["entries"][0]["choice"] = "direct"
    path.write_text(json.dumps(bad))
    autotune.clear()
    autotune.load(path)
    with pytest.raises(autotune.AutotuneCacheError, match="chooses 'direct', which cannot compute this call"):
        layer(x)


def test_bad_switches_are_refused(monkeypatch):
    with pytest.raises(TypeError, match="set_enabled takes True, False or None, got 'yes'"):
        autotune.set_enabled("yes")
    monkeypatch.setenv(autotune.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="SPARSESTART_AUTOTUNE must be 0/1.*got 'maybe'"):
        autotune.set_enabled(None)
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    autotune.set_enabled(None)
    assert autotune.enabled() is False
    layer = SparseLinear(4, 3, density=0.5, seed=0)
    layer.linear_algorithm = "fastest"
    with pytest.raises(ValueError, match=r"linear_algorithm must be one of \('auto', 'heuristic', 'sparse', "
                                         r"'dense'\), got 'fastest'"):
        layer(torch.randn(2, 4))


def test_compiled_auto_uses_the_cached_choice_and_never_times(tuning, monkeypatch):
    """Under torch.compile nothing is timed: a key measured eagerly keeps its choice in the graph, an
    unmeasured one takes the threshold rule; both compute what eager does."""
    import torch._dynamo

    torch._dynamo.reset()
    timer = fake_timer(monkeypatch, "unfold", ("direct", "unfold", "dense", "sparse"))
    model = nn.Sequential(SparseConv2d(4, 4, 3, padding=1, density=0.1, seed=0), nn.Flatten(),
                          SparseLinear(4 * 5 * 5, 3, density=1.0, seed=1))
    x = torch.randn(2, 4, 5, 5)
    y_eager = model(x)  # measures: the conv picks "unfold" (the rule says "direct"), the linear ties: "sparse"
    n = len(timer.calls)
    assert [e["choice"] for e in autotune.entries()] == ["unfold", "sparse"]  # "unfold" is no linear candidate
    used = record_algorithms(monkeypatch, model[0])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y_eager, rtol=1e-5, atol=1e-6)
    assert used == ["unfold"] and len(timer.calls) == n
    # an input shape never measured: the rule, still nothing timed
    used.clear()
    x3 = torch.randn(3, 4, 5, 5)
    y3 = compiled(x3)
    assert used[0] == "direct" and len(timer.calls) == n
    model[0].conv_algorithm, model[2].linear_algorithm = "direct", "sparse"  # forced: the eager reference
    torch.testing.assert_close(y3, model(x3), rtol=1e-5, atol=1e-6)


def test_a_hopeless_candidate_is_run_once_not_timed_repeatedly():
    """A candidate whose warm-up is slower than the limit (GIVE_UP_FACTOR x the best so far) cannot win:
    one run stands for it, so a first call does not pay REPEATS dense convolutions at density 0.001."""
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.005)

    cpu = torch.device("cpu")
    assert autotune._time_candidate("dense", slow, cpu, limit=0.001) >= 0.005 and len(calls) == 1
    calls.clear()
    autotune._time_candidate("dense", slow, cpu)
    assert len(calls) == 1 + autotune.REPEATS


def test_choose_gives_later_candidates_a_limit_from_the_best_so_far(monkeypatch):
    limits = []

    def timer(name, run, device, limit=None):
        limits.append(limit)
        return {"direct": 2.0, "unfold": 1.0, "dense": 5.0}[name]

    monkeypatch.setattr(autotune, "_time_candidate", timer)
    key = ("conv2d", "test-limits")
    try:
        choice = autotune.choose(key, {a: (lambda: None) for a in ("direct", "unfold", "dense")},
                                 torch.device("cpu"))
    finally:
        autotune._cache.pop(key, None)
    assert choice == "unfold"
    assert limits == [None, autotune.GIVE_UP_FACTOR * 2.0, autotune.GIVE_UP_FACTOR * 1.0]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_first_call_timing_inside_non_reentrant_checkpoint(tuning, kind):
    # The timed candidates save tensors of their own. Inside torch.utils.checkpoint(use_reentrant=False)
    # those were counted as the checkpointed forward's, and the recomputation in backward (which finds
    # the choice cached and times nothing) raised "Recomputed values ... have different metadata".
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = SparseLinear(20, 16, density=0.3, seed=1), torch.randn(8, 20)
    else:
        layer, x = SparseConv2d(3, 4, 3, padding=1, density=0.3, seed=1), torch.randn(2, 3, 9, 9)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = checkpoint(model, x1, use_reentrant=False)
    assert len(autotune.entries()) == 1  # the first call timed its candidates
    y.square().sum().backward()
    got = (layer.values.grad.clone(), x1.grad)
    layer.zero_grad()
    model(x2).square().sum().backward()
    torch.testing.assert_close(got[0], layer.values.grad)
    torch.testing.assert_close(got[1], x2.grad)
