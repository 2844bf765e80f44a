"""The ``sync`` hook of gradient growth: every chunk of the dense gradient passes through it before the top-k.

Data-parallel training sets it to an average over the ranks (tests/train/test_distributed.py runs that on 2
processes); here it is checked in one process: what it receives, that its result decides the growth, and
when RigL calls it.
"""
import torch

import sparsestart.algorithms as algorithms
from sparsestart.algorithms.gradient import GradientCapture, dense_gradient, topk_absent_gradient
from sparsestart.nn import SparseLinear
from tests.algorithms.helpers import batches, build, mlp, sparse_layers, train


def _layer_and_pairs():
    layer = SparseLinear(16, 12, density=0.3, seed=5, dtype=torch.float64)
    capture = GradientCapture({"l": layer}, lambda: True)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layer(x).sin().sum().backward()
    pairs = list(capture.pairs["l"])
    capture.remove()
    return layer, pairs


def _present(layer):
    rows, cols, _ = layer.sparse_weight.coo()
    return rows * 16 + cols


def test_sync_sees_every_chunk_and_its_result_decides():
    layer, pairs = _layer_and_pairs()
    grad = dense_gradient(layer, pairs)
    other = torch.randn(12, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def sync(chunk):  # stands for "the average over the ranks": here, another gradient
        r0 = sum(c.shape[0] for c in seen)
        seen.append(chunk.clone())
        return other[r0:r0 + chunk.shape[0]].clone()

    k = 20
    keys = topk_absent_gradient(layer, pairs, k, _present(layer), max_chunk_elements=3 * 16, sync=sync)
    assert [c.shape for c in seen] == [(3, 16)] * 4  # 3 rows per chunk, in order
    torch.testing.assert_close(torch.cat(seen), grad)
    score = other.abs().flatten()
    score[_present(layer)] = -float("inf")
    assert torch.equal(keys, torch.sort(torch.topk(score, k).indices).values)
    assert not torch.equal(keys, topk_absent_gradient(layer, pairs, k, _present(layer)))  # it did decide


def test_identity_sync_changes_nothing():
    layer, pairs = _layer_and_pairs()
    plain = topk_absent_gradient(layer, pairs, 25, _present(layer), max_chunk_elements=40)
    assert torch.equal(plain, topk_absent_gradient(layer, pairs, 25, _present(layer), max_chunk_elements=40,
                                                   sync=lambda g: g))


def test_rigl_calls_sync_at_update_steps_only():
    kwargs = dict(total_steps=12, update_every=4)
    model, optimizer, algo = build("rigl", mlp, kwargs)
    calls = []
    algo.sync = lambda g: calls.append(algo.step_count) or g
    twin, twin_optimizer, twin_algo = build("rigl", mlp, kwargs)
    assert algo.sync is not None and twin_algo.sync is None
    data = batches(model, 12)
    train(model, optimizer, algo, data)
    train(twin, twin_optimizer, twin_algo, data)
    # updates at 4 and 8 (the structure is fixed from 0.75 * 12 = 9 on), one chunk per layer each
    assert calls == [4] * 3 + [8] * 3
    for (name, a), b in zip(sparse_layers(model).items(), sparse_layers(twin).values()):
        assert torch.equal(a.rowptr, b.rowptr) and torch.equal(a.col, b.col), name
    assert algo.history == twin_algo.history and any(h["grown"] for h in algo.history)


def test_every_algorithm_has_the_hook():
    for name in algorithms.ALGORITHMS:
        kwargs = {"total_steps": 10} if name in ("rigl", "set", "gradual", "edgepopup") else {}
        assert build(name, mlp, kwargs)[2].sync is None, name
