"""The ER samplers draw the law their docstrings promise.

exact=True: exactly round(p R Q) distinct positions, uniform over all subsets of that size;
exact=False: every position kept independently with probability p. Grids above 2**24
positions take the chunked sampler (per-row counts first, then distinct columns one chunk of
rows at a time); the small-grid tests force that path with a zero threshold and tiny chunks,
so they check the same code on grids small enough to enumerate.

Every test uses fixed seeds, so it is deterministic; the thresholds (p-values above 1e-4,
deviations within 5 standard deviations) are loose enough for any correct sampler at most
seeds, and each statistic moves far past them for the mistakes it targets (balanced rows,
binomial instead of hypergeometric totals, clustered or biased columns, a broken complement).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import sparsestart.init.sampling as S
from sparsestart import _native
from sparsestart.init import er_indices, sample_without_replacement

stats = pytest.importorskip("scipy.stats")

P_MIN = 1e-4


@pytest.fixture
def chunked(monkeypatch):
    """The chunked sampler on every grid, with chunks of a few dozen positions."""
    monkeypatch.setattr(S, "_CHUNKED_ABOVE", 0)
    monkeypatch.setattr(S, "_CHUNK", 32)


def _keys(grid, density, exact, seed):
    rowptr, col = S.er_csr(grid, density, exact=exact, generator=torch.Generator().manual_seed(seed))
    rows = torch.repeat_interleave(torch.arange(grid[0]), rowptr.diff())
    return rows * grid[1] + col.long()


def _chi2_p(observed, expected) -> float:
    """Pearson chi-square p-value, pooling the categories expected below 5 into one."""
    observed = torch.as_tensor(observed, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(stat, observed.numel() - 1))


def _subset_histogram(n, k_sizes, samples):
    """Counts of each sampled subset (as a bit mask over n positions)."""
    counts = {}
    for keys in samples:
        mask = sum(1 << int(x) for x in keys)
        counts[mask] = counts.get(mask, 0) + 1
    return counts


@pytest.mark.parametrize("R,Q,k", [(2, 4, 3), (3, 3, 6), (1, 7, 2)])
def test_exact_is_uniform_over_k_subsets(chunked, R, Q, k):
    """Every k-subset of a tiny grid equally often: covers the hypergeometric row counts (with
    their thinning), the redraw of duplicate columns and the complement of rows over half full."""
    n = R * Q
    trials = 60 * math.comb(n, k)
    samples = [_keys((R, Q), k / n, True, seed) for seed in range(trials)]
    assert all(s.numel() == k and torch.unique(s).numel() == k for s in samples)
    hist = _subset_histogram(n, k, samples)
    subsets = [sum(1 << i for i in c) for c in itertools.combinations(range(n), k)]
    assert set(hist) <= set(subsets)
    observed = [hist.get(m, 0) for m in subsets]
    assert _chi2_p(observed, [trials / len(subsets)] * len(subsets)) > P_MIN


def test_bernoulli_is_independent_per_position(chunked):
    """Each subset S of a 2 x 4 grid with probability p^|S| (1-p)^(8-|S|)."""
    R, Q, p, trials = 2, 4, 0.35, 12000
    n = R * Q
    hist = _subset_histogram(n, None, (_keys((R, Q), p, False, seed) for seed in range(trials)))
    masks = range(1 << n)
    expected = [trials * p ** bin(m).count("1") * (1 - p) ** (n - bin(m).count("1")) for m in masks]
    assert _chi2_p([hist.get(m, 0) for m in masks], expected) > P_MIN


@pytest.mark.parametrize("exact", [True, False])
def test_dense_grids_through_the_complement(chunked, exact):
    """Densities above 1/2 sample the positions left out; per-position frequencies stay p."""
    R, Q, p, trials = 3, 5, 0.8, 3000
    freq = torch.zeros(R * Q)
    for seed in range(trials):
        keys = _keys((R, Q), p, exact, seed)
        if exact:
            assert keys.numel() == round(p * R * Q)
        freq[keys] += 1
    assert _chi2_p(freq, [trials * p] * (R * Q)) > P_MIN  # every position as often (sum of counts fixed)
    assert (_keys((R, Q), 1.0, exact, 0) == torch.arange(R * Q)).all()


def test_bernoulli_total_is_binomial(chunked):
    """The number of positions of a Bernoulli sample: Binomial(n, p), not a fixed or Poisson count."""
    R, Q, p, trials = 4, 6, 0.25, 4000
    n = R * Q
    totals = torch.tensor([_keys((R, Q), p, False, seed).numel() for seed in range(trials)])
    observed = torch.bincount(totals, minlength=n + 1)
    expected = [trials * stats.binom.pmf(j, n, p) for j in range(n + 1)]
    assert _chi2_p(observed, expected) > P_MIN


# ------------------------------------------------------------------ one large grid, chunked as in use
GRID = (8192, 4096)  # 2**25 positions: above the threshold, the production chunk size
P = 0.01


@pytest.fixture(scope="module", params=[True, False], ids=["exact", "bernoulli"])
def large(request):
    exact = request.param
    assert GRID[0] * GRID[1] > S._CHUNKED_ABOVE
    rowptr, col = S.er_csr(GRID, P, exact=exact, generator=torch.Generator().manual_seed(11))
    return exact, rowptr, col


def test_large_total_and_order(large):
    exact, rowptr, col = large
    n = GRID[0] * GRID[1]
    k = col.numel()
    if exact:
        assert k == round(P * n)
    else:
        assert abs(k - P * n) < 5 * math.sqrt(n * P * (1 - P))
    rows = torch.repeat_interleave(torch.arange(GRID[0]), rowptr.diff())
    keys = rows * GRID[1] + col.long()
    assert bool((keys[1:] > keys[:-1]).all())  # distinct, row-major, columns ascending in a row
    assert int(col.min()) >= 0 and int(col.max()) < GRID[1]


def test_large_row_counts(large):
    """Row counts: hypergeometric (exact: a row's share of a uniform k-subset) or binomial."""
    exact, rowptr, col = large
    R, Q = GRID
    counts = rowptr.diff()
    k = col.numel()
    support = torch.arange(int(counts.max()) + 1)
    law = stats.hypergeom(R * Q, Q, k) if exact else stats.binom(Q, P)
    expected = torch.tensor(law.pmf(support.numpy())) * R
    observed = torch.bincount(counts, minlength=support.numel())
    assert _chi2_p(observed, expected) > P_MIN
    # A sampler that spreads positions evenly (all rows ~k/R) fails the spread check first.
    assert abs(float(counts.double().var()) / law.var() - 1) < 0.1


def test_large_columns_uniform(large):
    exact, rowptr, col = large
    Q = GRID[1]
    observed = torch.bincount(col.long(), minlength=Q)
    assert _chi2_p(observed, [col.numel() / Q] * Q) > P_MIN
    # The chi-square over thousands of columns hides one column that is never drawn: bound each
    # column's count too (binomial, 6 standard deviations: a false alarm ~ Q * 2e-9).
    mean = col.numel() / Q
    assert float((observed - mean).abs().max()) < 6 * math.sqrt(mean * (1 - 1 / Q))


def test_large_columns_within_a_row_independent(large):
    """Pairs of neighbouring columns in the same row: a row's c columns hold c(c-1)/Q adjacent
    pairs on average for a uniform subset; clustered draws give more, spread-out draws fewer."""
    exact, rowptr, col = large
    R, Q = GRID
    counts = rowptr.diff().double()
    rows = torch.repeat_interleave(torch.arange(R), rowptr.diff())
    same_row = rows[1:] == rows[:-1]
    adjacent = int((same_row & (col[1:] - col[:-1] == 1)).sum())
    expected = float((counts * (counts - 1) / Q).sum())
    assert abs(adjacent - expected) < 5 * math.sqrt(expected)
    # The lowest column of each row: P(min >= j) = C(Q-j, c) / C(Q, c); compare its mean.
    has = counts > 0
    first = col[rowptr[:-1][has]].double()
    c = counts[has]
    mean_min = (Q - c) / (c + 1)  # E[min] of a uniform c-subset of [0, Q)
    var_min = c * (Q + 1) * (Q - c) / ((c + 1) ** 2 * (c + 2))
    z = float((first - mean_min).sum()) / math.sqrt(float(var_min.sum()))
    assert abs(z) < 5


# ------------------------------------------------------------------ determinism and the stream
def test_same_structure_on_every_thread_count():
    grid = (6000, 3000)  # above 2**24: chunked
    out = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(S.er_csr(grid, 0.02, generator=torch.Generator().manual_seed(5)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("exact", [True, False])
def test_er_indices_and_er_csr_agree(exact):
    for grid in [(300, 500), (6000, 3000)]:  # below and above the chunking threshold
        rows, cols = er_indices(grid, 0.02, exact=exact, generator=torch.Generator().manual_seed(3))
        rowptr, col = S.er_csr(grid, 0.02, exact=exact, generator=torch.Generator().manual_seed(3))
        assert torch.equal(torch.repeat_interleave(torch.arange(grid[0]), rowptr.diff()), rows)
        assert torch.equal(col.long(), cols)


def test_small_grids_keep_the_single_pass_stream():
    """Up to 2**24 positions (4096 x 4096 included) the structure for a seed is the one of the
    original sampler: sample_without_replacement over the flattened grid."""
    for grid, p in [((4096, 4096), 0.01), ((784, 300), 0.1)]:
        n = grid[0] * grid[1]
        flat = sample_without_replacement(n, round(p * n), torch.Generator().manual_seed(8))
        rowptr, col = S.er_csr(grid, p, generator=torch.Generator().manual_seed(8))
        assert torch.equal(torch.repeat_interleave(torch.arange(grid[0]), rowptr.diff()) * grid[1] + col.long(),
                           flat)


NATIVE_DISTINCT = _native.native_op("_native_sorted_distinct") is not None


@pytest.mark.skipif(not NATIVE_DISTINCT, reason="sparsestart._C not built")
def test_native_distinct_and_rank_mapping_equal_their_twins():
    g = torch.Generator().manual_seed(4)
    for n, m in ((1, 1), (64, 100), (65, 3), (100_003, 20_000), (5_000_000, 40_000)):
        draws = torch.randint(0, n, (m,), generator=g)
        got = torch.ops.sparsestart._native_sorted_distinct(draws, n)
        assert torch.equal(got, _native.sorted_distinct(draws, n)) and torch.equal(got, torch.unique(draws))
    assert torch.ops.sparsestart._native_sorted_distinct(torch.empty(0, dtype=torch.long), 0).numel() == 0
    with pytest.raises(ValueError, match=r"values\[1\] = 7 is outside \[0, n=7\)"):
        torch.ops.sparsestart._native_sorted_distinct(torch.tensor([0, 7]), 7)
    for n, p, k in ((10, 0, 10), (10, 10, 0), (50, 20, 30), (200_000, 30_000, 50_000)):
        present = torch.sort(torch.randperm(n, generator=g)[:p]).values
        ranks = torch.sort(torch.randperm(n - p, generator=g)[:k]).values
        got = torch.ops.sparsestart._native_absent_at_ranks(present, ranks)
        absent = torch.tensor(sorted(set(range(n)) - set(present.tolist())), dtype=torch.long)
        assert torch.equal(got, absent[ranks]) and torch.equal(got, _native.absent_at_ranks(present, ranks))
    with pytest.raises(ValueError, match="ranks must be non-negative and ascending, got ranks\\[1\\] = 2 after 5"):
        torch.ops.sparsestart._native_absent_at_ranks(torch.tensor([1, 4]), torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="present is not sorted and distinct"):
        torch.ops.sparsestart._native_absent_at_ranks(torch.tensor([4, 1]), torch.tensor([0, 5]))
    torch.library.opcheck(torch.ops.sparsestart._native_absent_at_ranks, (torch.tensor([1, 4]), torch.tensor([0, 5])))
    torch.library.opcheck(torch.ops.sparsestart._native_sorted_distinct, (torch.tensor([3, 1, 3]), 5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(not NATIVE_DISTINCT, reason="sparsestart._C not built")
def test_sampling_stream_is_the_same_with_and_without_the_native_helpers(monkeypatch):
    from sparsestart.algorithms.structure import sample_absent

    def draw():
        g = torch.Generator().manual_seed(11)
        present = torch.sort(torch.randperm(3_000_000, generator=g)[:300_000]).values
        return sample_without_replacement(10_000_000, 90_000, g), sample_absent(present, 3_000_000, 80_000, g)

    native = draw()
    monkeypatch.setattr(_native, "native_op_for", lambda *a: None)
    twin = draw()
    assert all(torch.equal(a, b) for a, b in zip(native, twin))
