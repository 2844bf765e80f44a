"""The device path of every algorithm, simulated on the CPU.

Off the CPU the native selection and structure ops (``_native_merge_index``,
``_native_absent_at_least``, ``_native_sorted_isin``) are not registered, and every
caller takes the PyTorch twins of ``sparsestart._native`` instead. Patching
``_native.native_op`` to return None forces exactly that path here; every algorithm
must then make the same structure decisions and leave the same values, bit for bit,
as with the native ops. (tests/gpu/test_gpu_algorithms.py runs the real CUDA path.)
"""
import pytest
import torch
from torch import nn

from sparsestart import _native
from sparsestart.algorithms import gradient
from sparsestart.nn import SparseLinear
from tests.algorithms.helpers import batches, build, cnn, mlp, sparse_layers, train
from tests.algorithms.test_common import NAMES, config, imp_levels

NATIVE = _native.native_op("_native_merge_index") is not None
STEPS = 9


def wide(seed: int = 0) -> nn.Module:
    """Big enough (256 x 512 = 4 x 32768 positions) that RigL's one-pass candidate selection runs."""
    torch.manual_seed(seed)
    return nn.Sequential(SparseLinear(12, 256, density=0.3, seed=seed * 10 + 1), nn.ReLU(),
                         SparseLinear(256, 512, density=0.08, seed=seed * 10 + 2), nn.ReLU(),
                         SparseLinear(512, 3, density=0.5, seed=seed * 10 + 3))


MODELS = {"mlp": mlp, "cnn": cnn, "bsr": lambda: mlp(format="bsr", block_size=4), "wide": wide}


def run(name, make, steps=STEPS):
    kwargs = config(name, steps)
    if name == "str":  # finalize() with a target: a global prune on every model
        kwargs.update(total_steps=steps, target_density=0.2)
    if name == "gradual" and make is wide:
        kwargs.update(final_density=0.05)
    model, opt, algo = build(name, make, kwargs)
    train(model, opt, algo, batches(model, steps), validate=True, after_step=imp_levels(algo, {3, 6}))
    state = {n: (m.values.detach().clone(), [t.clone() for t in m.sparse_weight.index_tensors()])
             for n, m in sparse_layers(model).items()}
    return state, algo.history


def cases():
    for name in NAMES:
        for model in ("mlp", "cnn", "bsr"):
            yield name, model
    yield "rigl", "wide"
    yield "gradual", "wide"


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built: the native path cannot be compared")
@pytest.mark.parametrize("name,model", list(cases()))
def test_torch_path_makes_the_same_structure_as_the_native_path(monkeypatch, name, model):
    want_state, want_history = run(name, MODELS[model])
    twin_calls = {"absent": 0}
    original = _native.absent_at_least

    def counted(*args):
        twin_calls["absent"] += 1
        return original(*args)

    monkeypatch.setattr(_native, "native_op", lambda op: None)  # what a CUDA tensor gets
    monkeypatch.setattr(_native, "absent_at_least", counted)
    got_state, got_history = run(name, MODELS[model])
    assert got_history == want_history
    assert got_state.keys() == want_state.keys()
    for layer, (values, index) in want_state.items():
        g_values, g_index = got_state[layer]
        assert torch.equal(g_values, values), layer
        assert all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(g_index, index)), layer
    if model == "wide" and name == "rigl":
        assert twin_calls["absent"] > 0, "the candidate pass never ran on the twin"
    assert any(h["dropped"] or h["grown"] for h in want_history) or name == "static", "nothing was exercised"


def test_the_cpu_keeps_the_native_ops(monkeypatch):
    """On the CPU every native helper is still used (the twins are for other devices), only with CPU tensors."""
    seen = []
    real = _native.native_op

    def guarded(op):
        fn = real(op)
        if fn is None:
            return None

        def call(*args):
            devices = {a.device.type for a in args if torch.is_tensor(a)}
            seen.append((op, devices))
            return fn(*args)
        return call

    monkeypatch.setattr(_native, "native_op", guarded)
    for name in ("rigl", "set", "gradual", "edgepopup", "imp"):
        run(name, wide if name == "rigl" else mlp, steps=7)
    assert all(devices == {"cpu"} for _, devices in seen)
    if NATIVE:
        assert {op for op, _ in seen} >= {"_native_merge_index", "_native_sorted_isin", "_native_absent_at_least"}


def test_gradient_chunks_share_one_host_sync_for_their_bounds(monkeypatch):
    """The present keys of every gradient chunk come from one searchsorted, not one per chunk."""
    torch.manual_seed(0)
    layer = SparseLinear(64, 96, density=0.2, seed=3)
    capture = gradient.GradientCapture({"w": layer}, due=lambda: True)
    nn.functional.cross_entropy(layer(torch.randn(16, 64)), torch.randint(0, 96, (16,))).backward()
    pairs = list(capture.pairs["w"])
    capture.remove()
    rows, cols, _ = layer.sparse_weight.coo()
    present = rows * 64 + cols
    want = gradient.topk_absent_gradient(layer, pairs, 40, present, max_chunk_elements=64 * 96)
    calls = []
    real = torch.searchsorted

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "searchsorted", counting)
    got = gradient.topk_absent_gradient(layer, pairs, 40, present, max_chunk_elements=5 * 64)  # 20 chunks
    monkeypatch.undo()
    assert torch.equal(got, want)
    assert len(calls) == 1
