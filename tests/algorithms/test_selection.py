"""Exact top-k selection (sparsestart/selection.py) and RigL's native candidate selection.

The selection prefilters large inputs with a sampled threshold; the result must be the
same as a full sort for every layout, including the ones where the sample misleads
(sorted scores, big tied blocks, -inf regions), with the documented tie-break.
"""
import pytest
import torch

from sparsestart import _native
from sparsestart.algorithms import gradient
from sparsestart.algorithms.gradient import GradientCapture, topk_absent_gradient
from sparsestart.algorithms.structure import isin_sorted
from sparsestart.nn import SparseLinear
from sparsestart.selection import smallest, top_k, top_k_mask

NATIVE = _native.native_op("_native_absent_at_least") is not None


def _reference(scores, k, largest=True, keys=None):
    """Sort-based top-k: by score (descending for largest), then by key, then by index."""
    scores = scores.reshape(-1)
    n = scores.numel()
    keys = torch.arange(n) if keys is None else keys.reshape(-1)
    order = sorted(range(n), key=lambda i: ((-scores[i] if largest else scores[i]).item(), keys[i].item(), i))
    return torch.sort(torch.tensor(order[:max(0, min(k, n))], dtype=torch.long)).values


def _layouts(n, seed):
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(n, generator=g)
    ties = torch.randint(0, 5, (n,), generator=g).float()  # a handful of values, huge tied blocks
    ascending = torch.arange(n, dtype=torch.float32)  # the sample sees a uniform spread; fine
    blocky = rand.clone()
    blocky[: n // 2] = -float("inf")  # half the scores masked, as RigL masks present positions
    spike = torch.zeros(n)
    spike[torch.randint(0, n, (50,), generator=g)] = 1.0  # almost all tied at 0
    return {"random": rand, "ties": ties, "ascending": ascending, "blocky": blocky, "spike": spike}


@pytest.mark.parametrize("n", [7, 1000, 70_001])
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_sort_reference(n, largest):
    for name, scores in _layouts(n, seed=n).items():
        for k in sorted({0, 1, 3, n // 10, n // 3, n // 2, n - 1, n, n + 5}):
            got = top_k(scores, k, largest=largest)
            if n <= 1000:
                want = _reference(scores, k, largest)
            else:  # the reference's Python sort is slow here: compare with a stable torch sort
                order = torch.sort(scores if not largest else -scores, stable=True).indices
                want = torch.sort(order[:max(0, min(k, n))]).values
            assert torch.equal(got, want), (name, k)
            assert torch.equal(top_k_mask(scores, k, largest=largest).nonzero().flatten(), want)


def test_top_k_tie_break_by_keys_survives_the_prefilter():
    n = 100_000
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (n,), generator=g).float()
    keys = torch.randperm(n, generator=g)
    for k in (10, 5_000, 40_000):
        got = top_k(scores, k, keys=keys)
        # Reference: by score descending, then key ascending.
        order = torch.argsort(keys)
        order = order[torch.sort(-scores[order], stable=True).indices]
        assert torch.equal(got, torch.sort(order[:k]).values), k
    assert torch.equal(smallest(scores, 30_000), torch.sort(torch.sort(scores, stable=True).indices[:30_000]).values)


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built")
def test_native_absent_at_least_matches_torch():
    op = torch.ops.sparsestart._native_absent_at_least
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64):
        # Ranges of 65536 scores with many candidates (a bitmap of the present keys), few (binary
        # searches), a dense present set, a tail shorter than a vector, NaN (never a candidate).
        for n, p in ((0, 0), (1, 0), (1, 1), (1000, 0), (300_000, 20_000), (200_003, 150_000)):
            scores = torch.randn(n, generator=g, dtype=dtype)
            scores[::97] = float("nan")
            base = 12345
            present = torch.sort(torch.randperm(n + 50, generator=g)[:p] + base - 25).values
            for threshold in (0.0, 0.7, 3.0, float("inf")):
                got, magnitude = op(scores, present, base, threshold)
                keys = torch.arange(n) + base
                want = ((scores.abs() >= threshold) & ~torch.isin(keys, present)).nonzero().flatten()
                assert got.dtype == torch.long and torch.equal(got, want), (dtype, n, p, threshold)
                assert magnitude.dtype == dtype and torch.equal(magnitude, scores.abs()[want]), (dtype, n, p)


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built")
def test_native_sorted_isin_matches_torch_and_rejects_unsorted():
    g = torch.Generator().manual_seed(3)
    for k, m in ((0, 0), (5, 0), (0, 5), (1000, 300), (300, 1000)):
        values = torch.sort(torch.randint(0, 2000, (k,), generator=g)).values
        sset = torch.unique(torch.randint(0, 2000, (m,), generator=g))
        want = torch.isin(values, sset)
        assert torch.equal(torch.ops.sparsestart._native_sorted_isin(values, sset), want)
        assert torch.equal(isin_sorted(values, sset, values_sorted=True), want)
        assert torch.equal(isin_sorted(values, sset), want)
    # Several chunks of values (the op merges them in parallel, each from a binary search).
    values = torch.sort(torch.randint(0, 10**6, (20_000,), generator=g)).values
    sset = torch.unique(torch.randint(0, 10**6, (300_000,), generator=g))
    assert torch.equal(torch.ops.sparsestart._native_sorted_isin(values, sset), torch.isin(values, sset))
    with pytest.raises(ValueError, match=r"values are not sorted ascending: values\[0\] = 3 > values\[1\] = 1"):
        torch.ops.sparsestart._native_sorted_isin(torch.tensor([3, 1]), torch.tensor([0, 1, 2]))
    # A descent in a part of the set no search or merge walks is still found.
    sset = torch.arange(100_000)
    sset[70_000], sset[70_001] = 70_001, 70_000
    with pytest.raises(ValueError, match=r"set is not sorted ascending: set\[70000\] = 70001 > set\[70001\] = 70000"):
        torch.ops.sparsestart._native_sorted_isin(torch.tensor([0, 99_999]), sset)
    with pytest.raises(TypeError, match="must be int64, got Int and Long"):
        torch.ops.sparsestart._native_sorted_isin(torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1, 2]))


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built")
def test_native_selection_ops_pass_opcheck():
    scores, present = torch.randn(500), torch.tensor([3, 10, 400], dtype=torch.long)
    torch.library.opcheck(torch.ops.sparsestart._native_sorted_isin, (torch.arange(0, 20, 3), present))
    torch.library.opcheck(torch.ops.sparsestart._native_absent_at_least, (scores, present, 0, 0.5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _captured(layer, x, y):
    capture = GradientCapture({"w": layer}, due=lambda: True)
    torch.nn.functional.cross_entropy(layer(x), y).backward()
    pairs = list(capture.pairs["w"])  # remove() clears the capture's own lists
    capture.remove()
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_columns", [False, True], ids=["distinct", "tied-at-zero"])
def test_large_layer_growth_is_the_same_on_the_native_and_python_paths(monkeypatch, dtype, zero_columns):
    torch.manual_seed(0)
    layer = SparseLinear(512, 1024, density=0.05, seed=1, dtype=dtype)  # 524,288 positions: the prefilter path
    x = torch.randn(64, 512, dtype=dtype)
    if zero_columns:
        x[:, 8:] = 0  # most gradient columns are exactly 0: k reaches into a huge tie at 0
    y = torch.randint(0, 1024, (64,))
    pairs = _captured(layer, x, y)
    m = layer.sparse_weight
    R, Q = m.grid
    rows, cols, _ = m.coo()
    present = rows * Q + cols
    dense = (pairs[0][1].reshape(-1, R).t() @ pairs[0][0].reshape(-1, Q)).abs().reshape(-1)
    absent = torch.ones(R * Q, dtype=torch.bool)
    absent[present] = False
    for k in (1, 3000, 20_000):
        order = torch.sort(-dense[absent], stable=True).indices  # ties: smaller key first
        want = torch.sort(absent.nonzero().flatten()[order[:k]]).values
        results, native_chunks = {}, []
        original = gradient._absent_candidates

        def recording(*args):
            out = original(*args)
            native_chunks.append(out is not None)
            return out

        for path in ("native", "python"):
            if path == "python":
                monkeypatch.setattr(_native, "native_op", lambda name: None)
            elif not NATIVE:
                continue
            else:
                monkeypatch.setattr(gradient, "_absent_candidates", recording)
            for chunk in (R * Q, 256 * Q, 3 * Q):  # one chunk, four chunks, many chunks below the sample size
                results[(path, chunk)] = topk_absent_gradient(layer, pairs, k, present, max_chunk_elements=chunk)
            monkeypatch.undo()
        for key, got in results.items():
            assert torch.equal(got, want), (key, k)
        if NATIVE:
            assert any(native_chunks), "the native candidate path was never taken"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_gradient_of_several_pairs_reuses_the_pooled_buffer(dtype):
    """A layer called twice in a step has two (input, output gradient) pairs: the dense gradient is the sum of
    both products, whether formed into a pooled scratch buffer (CPU, native extension) or a fresh tensor; a
    second update of the same size takes its buffer from the pool instead of allocating."""
    from sparsestart import runtime
    from sparsestart.ops import NATIVE_AVAILABLE

    g = torch.Generator().manual_seed(3)
    layer = SparseLinear(300, 400, density=0.1, seed=1, dtype=dtype)  # 400 x 300 gradient: 0.5-1 MB, pooled
    pairs = [(torch.randn(8, 300, generator=g, dtype=dtype), torch.randn(8, 400, generator=g, dtype=dtype))
             for _ in range(2)]
    want = sum(dy.t() @ x for x, dy in pairs)
    torch.testing.assert_close(gradient.dense_gradient(layer, pairs), want)
    torch.testing.assert_close(gradient.dense_gradient(layer, pairs, rows=slice(7, 91)), want[7:91])
    if NATIVE_AVAILABLE:
        before = runtime.output_pool_stats()["hits"]
        gradient.dense_gradient(layer, pairs)
        assert runtime.output_pool_stats()["hits"] > before


@pytest.mark.parametrize("estimate", ["too-high", "too-low"])
def test_a_misleading_sample_changes_time_not_results(monkeypatch, estimate):
    """Force the sampled threshold to the worst values: the result must not change."""
    import sparsestart.selection as selection

    def forced(sample, fraction, *, largest=True):
        high = sample.max() if largest else sample.min()
        low = sample.min() if largest else sample.max()
        return high if estimate == "too-high" else low

    scores = _layouts(70_001, seed=5)
    want = {(name, k, largest): top_k(s, k, largest=largest)
            for name, s in scores.items() for k in (1, 500, 30_000) for largest in (True, False)}
    layer = SparseLinear(512, 1024, density=0.05, seed=1)
    x = torch.randn(64, 512)
    pairs = _captured(layer, x, torch.randint(0, 1024, (64,)))
    rows, cols, _ = layer.sparse_weight.coo()
    present = rows * 512 + cols
    grown = {k: topk_absent_gradient(layer, pairs, k, present) for k in (1, 3000)}

    monkeypatch.setattr(selection, "sample_threshold", forced)
    monkeypatch.setattr(gradient, "sample_threshold", forced)
    for (name, k, largest), w in want.items():
        assert torch.equal(top_k(scores[name], k, largest=largest), w), (name, k, largest)
    for k, w in grown.items():
        assert torch.equal(topk_absent_gradient(layer, pairs, k, present), w), k


# ------------------------------------------------------------- the PyTorch twins of the native ops
# On a GPU the CPU-only native ops are replaced by their twins in sparsestart._native; here both run
# on the CPU and must agree bit for bit (values, dtype, order).
def test_native_op_for_gives_the_op_only_for_cpu_tensors(monkeypatch):
    cpu, meta = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long, device="meta")
    assert _native.native_op_for("_native_sorted_isin", cpu, meta) is None
    assert _native.native_op_for("_native_sorted_isin", meta) is None
    assert _native.native_op_for("_native_sorted_isin", cpu) is _native.native_op("_native_sorted_isin")
    monkeypatch.setattr(_native, "native_op", lambda name: None)  # how the tests force the torch path
    assert _native.native_op_for("_native_sorted_isin", cpu) is None


def _absent_cases():
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        for n, p in ((0, 0), (1, 0), (1, 1), (1000, 0), (1000, 1000), (70_000, 5_000), (300_000, 20_000)):
            scores = torch.randn(n, generator=g, dtype=dtype)
            if n >= 1000:
                scores[::97] = 0.0   # ties at zero
                scores[5::101] = scores[4::101][: scores[5::101].numel()]  # equal neighbours
            base = 777
            present = torch.sort(torch.randperm(n + 50, generator=g)[:p] + base - 25).values
            # Thresholds between two float32 values: both compare in the dtype of the scores.
            for threshold in (0.0, 0.7, 1.0 + 1e-9, 1.0000000596, 3.0, float("inf"), -1.0):
                yield dtype, n, p, scores, present, base, threshold


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built")
def test_absent_at_least_twin_matches_the_native_op_bit_for_bit():
    op = torch.ops.sparsestart._native_absent_at_least
    for dtype, n, p, scores, present, base, threshold in _absent_cases():
        want = op(scores, present, base, threshold)
        got = _native.absent_at_least(scores, present, base, threshold)
        assert got[0].dtype == want[0].dtype == torch.long and torch.equal(got[0], want[0]), (dtype, n, p, threshold)
        assert got[1].dtype == want[1].dtype == dtype and torch.equal(got[1], want[1]), (dtype, n, p, threshold)


def test_absent_at_least_twin_matches_its_definition():
    for dtype, n, p, scores, present, base, threshold in _absent_cases():
        keys = torch.arange(n) + base
        t = torch.tensor(threshold, dtype=dtype)
        want = ((scores.abs() >= t) & ~torch.isin(keys, present)).nonzero().flatten()
        got, magnitude = _native.absent_at_least(scores, present, base, threshold)
        assert torch.equal(got, want) and torch.equal(magnitude, scores.abs()[want]), (dtype, n, p)


@pytest.mark.skipif(not NATIVE, reason="sparsestart._C not built")
def test_sorted_isin_twin_matches_the_native_op_bit_for_bit():
    g = torch.Generator().manual_seed(8)
    op = torch.ops.sparsestart._native_sorted_isin
    for k, m, hi in ((0, 0, 10), (5, 0, 10), (0, 5, 10), (1, 1, 2), (1000, 300, 2000), (300, 1000, 2000),
                     (5000, 5000, 6000), (4000, 10, 2**40)):
        values = torch.sort(torch.randint(-3, hi, (k,), generator=g)).values  # duplicates included
        sset = torch.unique(torch.randint(0, hi, (m,), generator=g))
        want = op(values, sset)
        got = _native.sorted_isin(values, sset)
        assert got.dtype == want.dtype == torch.bool and torch.equal(got, want), (k, m)
        assert torch.equal(got, torch.isin(values, sset))
        # isin_sorted takes the twin when the native op is not for these tensors: same answer.
        assert torch.equal(isin_sorted(values, sset, values_sorted=True), want)


def test_isin_sorted_takes_the_twin_when_the_native_op_is_unavailable(monkeypatch):
    calls = []
    twin = _native.sorted_isin
    monkeypatch.setattr(_native, "native_op", lambda name: None)
    monkeypatch.setattr(_native, "sorted_isin", lambda v, s: calls.append(1) or twin(v, s))
    values, sset = torch.tensor([[1, 4], [5, 9]]), torch.tensor([0, 4, 9])
    assert torch.equal(isin_sorted(values, sset, values_sorted=True), torch.tensor([[False, True], [False, True]]))
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rigl_candidate_pass_runs_on_the_twin_when_the_native_op_is_unavailable(monkeypatch, dtype):
    """Off the CPU (simulated: no native op) the one-pass candidate selection still runs, on the twin."""
    torch.manual_seed(0)
    layer = SparseLinear(512, 1024, density=0.05, seed=1, dtype=dtype)
    pairs = _captured(layer, torch.randn(64, 512, dtype=dtype), torch.randint(0, 1024, (64,)))
    rows, cols, _ = layer.sparse_weight.coo()
    present = rows * 512 + cols
    want = {k: topk_absent_gradient(layer, pairs, k, present) for k in (1, 3000)}
    used = []
    original = gradient._absent_candidates

    def recording(native, *args):
        used.append(native)
        return original(native, *args)

    monkeypatch.setattr(_native, "native_op", lambda name: None)
    monkeypatch.setattr(gradient, "_absent_candidates", recording)
    for k, w in want.items():
        assert torch.equal(topk_absent_gradient(layer, pairs, k, present), w), k
    assert used and all(fn is _native.absent_at_least for fn in used)


def _sort_reference(scores, k, largest):
    """torch.sort's order (NaN above every number, -0.0 == +0.0, stable: earlier index first)."""
    order = torch.sort(scores, descending=largest, stable=True).indices
    return torch.sort(order[:max(0, min(k, scores.numel()))]).values


def _awkward(n, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=g)
    s[torch.randint(0, n, (max(1, n // 7),), generator=g)] = float("nan")
    s[torch.randint(0, n, (max(1, n // 11),), generator=g)] = -0.0
    s[torch.randint(0, n, (max(1, n // 11),), generator=g)] = 0.0
    s[torch.randint(0, n, (max(1, n // 13),), generator=g)] = float("inf")
    s[torch.randint(0, n, (max(1, n // 13),), generator=g)] = -float("inf")
    s[torch.randint(0, n, (max(1, n // 5),), generator=g)] = 1.5  # a big tied block
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n", [9, 1000, 70_001])
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_ranks_nan_above_every_number_and_returns_exactly_k(dtype, n, largest):
    # Before: NaN scores never passed the threshold comparisons, so a selection reaching into them
    # returned fewer than k indices (a silent short result).
    scores = _awkward(n, seed=n).to(dtype)
    for k in sorted({1, 2, n // 9, n // 7, n // 2, n - 1}):
        got = top_k(scores, k, largest=largest)
        assert got.numel() == k, k
        assert torch.equal(got, _sort_reference(scores, k, largest)), k


def test_rank_keys_order_is_the_sort_order():
    from sparsestart.selection import rank_keys
    s = torch.tensor([0.5, -0.0, 0.0, float("nan"), -float("inf"), float("inf"), -2.0, -1.0, 1e-45, -1e-45])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = s.to(dtype)
        for largest in (True, False):
            by_key = torch.sort(rank_keys(x, largest), descending=True, stable=True).indices
            assert torch.equal(by_key, torch.sort(x, descending=largest, stable=True).indices), (dtype, largest)


NATIVE_TOP_K = _native.native_op("_native_top_k") is not None


@pytest.mark.skipif(not NATIVE_TOP_K, reason="sparsestart._C not built")
@pytest.mark.parametrize("n", [1, 2, 9, 65_536, 65_537, 300_001])
@pytest.mark.parametrize("largest", [True, False])
def test_native_top_k_equals_the_pytorch_path(monkeypatch, n, largest):
    layouts = dict(_layouts(n, seed=n + 1), awkward=_awkward(n, seed=n))
    for name, scores in layouts.items():
        for k in sorted({0, 1, n // 10, n // 3, n // 2, n - 1, n}):
            native = torch.ops.sparsestart._native_top_k(scores, k, largest)
            assert torch.equal(native, _sort_reference(scores, k, largest)), (name, k)
            with monkeypatch.context() as m:  # the PyTorch path of top_k
                m.setattr(_native, "native_op_for", lambda *a: None)
                assert torch.equal(top_k(scores, k, largest=largest), native), (name, k)
            assert torch.equal(top_k(scores, k, largest=largest), native), (name, k)


@pytest.mark.skipif(not NATIVE_TOP_K, reason="sparsestart._C not built")
def test_native_top_k_is_thread_count_independent_and_checked():
    scores = _awkward(400_000, seed=3)
    want = torch.ops.sparsestart._native_top_k(scores, 123_456, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.sparsestart._native_top_k(scores, 123_456, True), want)
    finally:
        torch.set_num_threads(before)
    assert torch.ops.sparsestart._native_top_k(scores, -3, True).numel() == 0
    assert torch.equal(torch.ops.sparsestart._native_top_k(scores[:5], 9, False), torch.arange(5))
    with pytest.raises(TypeError, match="scores must be float32, got Double"):
        torch.ops.sparsestart._native_top_k(scores.double(), 3, True)
    torch.library.opcheck(torch.ops.sparsestart._native_top_k, (torch.randn(300), 17, False))


def test_random_positions_are_fixed_and_a_caller_may_modify_them():
    from sparsestart.selection import random_positions

    first = random_positions(10_000, 300, "cpu", ascending=True)
    assert torch.equal(first, torch.sort(random_positions(10_000, 300, "cpu")).values)
    assert bool((first[1:] >= first[:-1]).all()) and 0 <= int(first.min()) and int(first.max()) < 10_000
    expected = first.clone()
    first.fill_(-1)  # the kept copy must not see this
    assert torch.equal(random_positions(10_000, 300, "cpu", ascending=True), expected)
