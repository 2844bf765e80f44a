"""The sparse-to-sparse algorithms and the structure helpers on a CUDA device, against the same run on
the CPU.

- The PyTorch twins of the CPU-only native helpers (merge of a compressed index, RigL's
  candidate pass, sorted membership) give on the device what the native ops give on the CPU,
  bit for bit; so do the exact top-k selection, the global magnitude selection, SET's
  sampling of absent positions and a sequence of drop/grow/replace.
- Every algorithm (Static, IMP, STR, RigL, SET, Gradual, EdgePopup) runs a few steps on a
  small model on the device: the structure stays valid after every step, the densities are
  the CPU run's, and the structure equals the CPU run's. All of them are deterministic given
  identical inputs; the two runs differ only in rounding (float64, reference backend on both
  sides, so no kernel differs), which no structure decision here is close enough to see.
- sparsify (ER sampling, SNIP ratios with a batch from the CPU, flow repair), densify and
  summary on a model that lives on the device.

Skipped without CUDA. ``SPARSESTART_GPU_TEST_DEVICE=cpu`` runs the file on the CPU against
itself (a dry run of the test code on a machine without a GPU).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart import _native, ops
from sparsestart.algorithms import gradient
from sparsestart.algorithms.structure import isin_sorted, sample_absent, smallest_global
from sparsestart.formats import CSR
from sparsestart.init import er_indices, sample_without_replacement
from sparsestart.nn import SparseLayer, SparseLinear
from sparsestart.selection import top_k
from tests.algorithms.helpers import batches, cnn, mlp, n_classes, sparse_layers
from tests.algorithms.test_common import NAMES, config
from tests.gpu.backends import SKIP_WITHOUT_DEVICE, TEST_DEVICE
from tests.util import random_matrix

DEV = TEST_DEVICE
pytestmark = pytest.mark.skipif(**SKIP_WITHOUT_DEVICE)

STEPS = 9


@pytest.fixture(autouse=True)
def _reference_backend():
    with ops.use_backend("reference"):
        yield


def _on(t):
    return t.to(DEV, copy=True)  # a copy even in a dry run on the CPU


def _native_or_twin(name):
    """The native op on the CPU when built, else its twin (itself checked against the op in tests/algorithms)."""
    twin = {"_native_merge_index": _native.merge_index, "_native_absent_at_least": _native.absent_at_least,
            "_native_sorted_isin": _native.sorted_isin}[name]
    op = _native.native_op(name)
    if op is None:
        return twin
    if name == "_native_merge_index":
        return lambda *args: op(*args[:8])
    return op


# ----------------------------------------------------------------------- the native twins
def test_native_op_for_refuses_device_tensors():
    assert _native.native_op_for("_native_sorted_isin", torch.zeros(2, dtype=torch.long, device=DEV)) is (
        _native.native_op("_native_sorted_isin") if torch.device(DEV).type == "cpu" else None)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_merge_index_twin_on_the_device_equals_the_native_op(index_dtype):
    g = torch.Generator().manual_seed(0)
    op = _native_or_twin("_native_merge_index")
    for M, K, density, n_new in ((1, 1, 0.0, 1), (40, 30, 0.3, 150), (64, 3, 0.05, 60), (200, 300, 0.1, 4000)):
        m = random_matrix(M, K, density, capacity_extra=n_new, seed=M + n_new, index_dtype=index_dtype)
        R, Q = m.grid
        rows, cols, _ = m.coo()
        absent = (~m.mask()).flatten().nonzero().flatten()
        take = torch.sort(absent[torch.randperm(absent.numel(), generator=g)[:n_new]]).values
        nr, nc = take // Q, take % Q
        nslot = torch.randperm(m.capacity, generator=g)[:take.numel()]
        keep = torch.rand(m.nnz, generator=g) < 0.7
        total = int(keep.sum()) + take.numel()
        args = (m.rowptr, m.col, m.slot, keep, nr, nc, nslot, total, Q)
        want = op(*args)
        got = _native.merge_index(*(_on(a) if torch.is_tensor(a) else a for a in args))
        for w, t in zip(want, got):
            assert t.device.type == torch.device(DEV).type and t.dtype == w.dtype and torch.equal(t.cpu(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absent_at_least_and_sorted_isin_twins_on_the_device_equal_the_native_ops(dtype):
    g = torch.Generator().manual_seed(1)
    absent_op, isin_op = _native_or_twin("_native_absent_at_least"), _native_or_twin("_native_sorted_isin")
    for n, p in ((0, 0), (1000, 300), (300_000, 20_000)):
        scores = torch.randn(n, generator=g, dtype=dtype)
        scores[::97] = 0.0
        present = torch.sort(torch.randperm(n + 50, generator=g)[:p] + 99).values
        for threshold in (0.0, 0.7, 1.0 + 1e-9, 3.0):
            want = absent_op(scores, present, 124, threshold)
            got = _native.absent_at_least(_on(scores), _on(present), 124, threshold)
            assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want)), (n, p, threshold)
        values = torch.sort(torch.randint(0, n + 200, (n // 2,), generator=g)).values
        assert torch.equal(_native.sorted_isin(_on(values), _on(present)).cpu(), isin_op(values, present))
        assert torch.equal(isin_sorted(_on(values), _on(present), values_sorted=True).cpu(), isin_op(values, present))


# ------------------------------------------------------------------- selection and sampling
def test_top_k_and_global_selection_on_the_device_equal_the_cpu():
    g = torch.Generator().manual_seed(2)
    for n in (1000, 300_000):
        for scores in (torch.randn(n, generator=g), torch.randint(0, 4, (n,), generator=g).float()):
            keys = torch.randperm(n, generator=g)
            for k in (1, n // 100, n // 3):
                for largest in (True, False):
                    want = top_k(scores, k, largest=largest)
                    assert torch.equal(top_k(_on(scores), k, largest=largest).cpu(), want)
                assert torch.equal(top_k(_on(scores), k, keys=_on(keys)).cpu(), top_k(scores, k, keys=keys))
    scores = [torch.randint(0, 50, (s,), generator=g).double() for s in (10, 3000, 200)]
    for n_remove in (0, 5, 1500, 4000):
        want = smallest_global(scores, [1, 1, 4], n_remove, min_keep=2)
        got = smallest_global([_on(s) for s in scores], [1, 1, 4], n_remove, min_keep=2)
        assert all(w.device.type == "cpu" and torch.equal(x.cpu(), w) for x, w in zip(got, want))


def test_set_samples_the_same_absent_positions_on_the_device():
    present = torch.sort(torch.randperm(100_000, generator=torch.Generator().manual_seed(3))[:20_000]).values
    want = sample_absent(present, 100_000, 5000, torch.Generator().manual_seed(4))
    got = sample_absent(_on(present), 100_000, 5000, torch.Generator().manual_seed(4))
    assert got.device.type == torch.device(DEV).type and torch.equal(got.cpu(), want)


def test_replace_sequence_on_the_device_equals_the_cpu():
    g = torch.Generator().manual_seed(5)
    cpu = random_matrix(60, 50, 0.2, capacity_extra=300, seed=6)
    dev = type(cpu)(*(_on(t) for t in (cpu.values, *cpu.index_tensors())), cpu.shape)
    R, Q = cpu.grid
    for step in range(6):
        nnz = cpu.nnz
        drop = torch.randperm(nnz, generator=g)[:nnz // 4]
        absent = (~cpu.mask()).flatten().nonzero().flatten()
        grow = absent[torch.randperm(absent.numel(), generator=g)[:nnz // 4 + step]]
        if step % 2:
            grow = torch.sort(grow).values  # sorted (RigL/SET) and unsorted (user) growth
        want = cpu.replace(drop, grow // Q, grow % Q)
        got = dev.replace(_on(drop), _on(grow // Q), _on(grow % Q))
        dev.validate()
        assert all(torch.equal(x.cpu(), w) for x, w in zip(got, want))
        assert all(torch.equal(x.cpu(), w) for x, w in zip(dev.index_tensors(), cpu.index_tensors()))
    with pytest.raises(ValueError, match="already stored"):
        rows, cols, _ = dev.coo()
        dev.grow(rows[:1], cols[:1])


def test_from_mask_with_a_cpu_generator_gives_the_cpu_values_on_the_device():
    mask = torch.rand(30, 40, generator=torch.Generator().manual_seed(7)) < 0.3
    want = CSR.from_mask(mask, "kaiming_uniform", generator=torch.Generator().manual_seed(8))
    got = CSR.from_mask(_on(mask), "kaiming_uniform", generator=torch.Generator().manual_seed(8))
    got.validate()
    assert torch.equal(got.values.cpu(), want.values)
    rows, cols = er_indices((300, 500), 0.02, generator=torch.Generator().manual_seed(9), device=DEV)
    ref = er_indices((300, 500), 0.02, generator=torch.Generator().manual_seed(9))
    assert rows.device.type == torch.device(DEV).type and torch.equal(rows.cpu(), ref[0])


def test_sampling_with_a_device_generator_runs_on_the_device():
    for n, k in ((100, 60), (1 << 20, 5000)):
        s = sample_without_replacement(n, k, torch.Generator(device=DEV).manual_seed(0))
        assert s.device.type == torch.device(DEV).type and s.numel() == k
        assert bool((s[1:] > s[:-1]).all()) and 0 <= int(s[0]) and int(s[-1]) < n
    for exact in (True, False):
        rows, cols = er_indices((300, 500), 0.05, exact=exact, generator=torch.Generator(device=DEV).manual_seed(1))
        assert rows.device.type == torch.device(DEV).type and bool((rows < 300).all() and (cols < 500).all())


def test_rigl_gradient_selection_on_the_device_equals_the_cpu():
    """The chunked dense gradient and its running top-k (candidate pass on the twin) as on the CPU."""
    torch.manual_seed(0)
    layer = SparseLinear(512, 1024, density=0.05, seed=1, dtype=torch.float64)
    x = torch.randn(64, 512, dtype=torch.float64)
    x[:, 300:] = 0  # many exactly-zero gradient columns: ties broken by key on both devices
    y = torch.randint(0, 1024, (64,))
    results = []
    for d in ("cpu", DEV):
        lay = copy.deepcopy(layer).to(d)
        capture = gradient.GradientCapture({"w": lay}, due=lambda: True)
        nn.functional.cross_entropy(lay(x.to(d)), y.to(d)).backward()
        pairs = list(capture.pairs["w"])
        capture.remove()
        rows, cols, _ = lay.sparse_weight.coo()
        present = rows * 512 + cols
        results.append([gradient.topk_absent_gradient(lay, pairs, k, present, max_chunk_elements=c).cpu()
                        for k in (1, 3000, 40_000) for c in (1 << 24, 256 * 512, 3 * 512)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --------------------------------------------------------------------------- the algorithms
MODELS = {"mlp": mlp, "cnn": cnn, "bsr": lambda: mlp(format="bsr", block_size=4)}


def _run(name, make, device):
    kwargs = config(name, STEPS)
    if name == "str":
        kwargs.update(total_steps=STEPS, target_density=0.2)
    model = make().double().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    algo = sparsestart.algorithms.get(name, model, optimizer, **kwargs)
    classes = n_classes(model)
    densities = []
    for i, (x, y) in enumerate(batches(model, STEPS)):
        x, y = x.double().to(device), (y % classes).to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        algo.step()
        if name == "imp" and i + 1 in (3, 6):
            algo.prune_and_rewind()
        for layer in sparse_layers(model).values():
            layer.validate()
            assert layer.values.device.type == torch.device(device).type
        densities.append(algo.densities())
    return model, algo, densities


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", NAMES)
def test_algorithm_on_the_device_makes_the_cpu_structure(name, model):
    cpu_model, cpu_algo, cpu_dens = _run(name, MODELS[model], "cpu")
    dev_model, dev_algo, dev_dens = _run(name, MODELS[model], DEV)
    assert dev_dens == cpu_dens
    _assert_same_history(dev_algo.history, cpu_algo.history)
    cpu_layers, dev_layers = sparse_layers(cpu_model), sparse_layers(dev_model)
    for n, layer in cpu_layers.items():
        got = dev_layers[n]
        assert all(torch.equal(u.cpu(), v) for u, v in zip(got.sparse_weight.index_tensors(),
                                                           layer.sparse_weight.index_tensors())), n
        torch.testing.assert_close(got.values.detach().cpu(), layer.values.detach(), rtol=1e-9, atol=1e-12)
    if name != "static":
        assert any(h["dropped"] or h["grown"] for h in cpu_algo.history)


def _assert_same_history(got, want):
    """Equal records; STR's learned threshold (a float trained on each device) only to rounding."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if key == "threshold":
                assert g[key] == pytest.approx(w[key], rel=1e-9), g
            else:
                assert g[key] == w[key], (key, g, w)


@pytest.mark.parametrize("name", ["set", "rigl", "edgepopup", "imp", "str"])
def test_algorithm_state_loads_whatever_device_it_was_mapped_to(name):
    """A state dict mapped onto the device (torch.load(map_location=...)) resumes: the generator stays on the
    CPU, snapshots and counters follow the model."""
    model, algo, _ = _run(name, mlp, DEV)
    state = algo.state_dict()
    moved = {k: (_map(v) if k != "history" else v) for k, v in state.items()}
    algo.load_state_dict(moved)
    if hasattr(algo, "generator"):
        assert algo.generator.device.type == "cpu"
    algo.step()
    for layer in sparse_layers(model).values():
        layer.validate()


def _map(obj):
    if torch.is_tensor(obj):
        return obj.to(DEV)
    if isinstance(obj, dict):
        return {k: _map(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v) for v in obj]
    return obj


# ------------------------------------------------------------------------ init and convert
def _dense_lenet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 10))


def test_snip_ratios_of_a_model_on_the_device_from_a_cpu_batch():
    model = _dense_lenet().to(DEV)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))  # the batch stays on the CPU
    numel = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    sparsestart.sparsify(model, 0.05, "snip", seed=0, data=(x, y), flow="rejection")
    for layer in sparse_layers(model).values():
        layer.validate()
        assert layer.values.device.type == torch.device(DEV).type
    over = sum(lf.over_budget for lf in model.flow_report.layers)
    assert sum(m.nnz for m in sparse_layers(model).values()) == round(0.05 * numel) + over


def test_sparsify_with_flow_repair_on_the_device_equals_the_cpu():
    models = {}
    for d in ("cpu", DEV):
        model = _dense_lenet().to(d)
        sparsestart.sparsify(model, 0.02, "erk", seed=0, flow="random_addition")
        models[d] = model
    assert str(models[DEV].flow_report) == str(models["cpu"].flow_report)
    assert models["cpu"].flow_report.total > 0
    cpu_layers, dev_layers = sparse_layers(models["cpu"]), sparse_layers(models[DEV])
    for n, layer in cpu_layers.items():
        got = dev_layers[n]
        got.validate()
        assert got.values.device.type == torch.device(DEV).type
        assert all(torch.equal(u.cpu(), v) for u, v in zip(got.sparse_weight.index_tensors(),
                                                           layer.sparse_weight.index_tensors())), n
        assert torch.equal(got.values.detach().cpu(), layer.values.detach()), n
    s_cpu = sparsestart.summary(models["cpu"], input_size=(1, 28, 28))
    s_dev = sparsestart.summary(models[DEV], input_size=(1, 28, 28))
    assert s_cpu.rows == s_dev.rows
    dense = sparsestart.densify(models[DEV])
    assert not any(isinstance(m, SparseLayer) for m in dense.modules())
    assert all(p.device.type == torch.device(DEV).type for p in dense.parameters())


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_on_the_device_equals_the_cpu_selection(largest):
    # On the CPU, float32 goes through the extension's radix selection; on the device through rank keys.
    g = torch.Generator().manual_seed(7)
    for n in (9, 70_001, 300_000):
        scores = torch.randn(n, generator=g)
        scores[torch.randint(0, n, (n // 9 + 1,), generator=g)] = float("nan")
        scores[torch.randint(0, n, (n // 5 + 1,), generator=g)] = 0.5
        scores[torch.randint(0, n, (n // 11 + 1,), generator=g)] = -0.0
        for k in (1, n // 50, n // 8, n // 2):
            want = top_k(scores, k, largest=largest)
            assert want.numel() == k
            assert torch.equal(top_k(_on(scores), k, largest=largest).cpu(), want), (n, k)
