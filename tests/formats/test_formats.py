"""CSR/BSR structures: construction, invariants, and in-place drop/grow against a set model."""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsestart.formats import BSR, CSR, index_dtype_for, update
from tests.util import random_matrix

MERGE_PATHS = ["native", "python"] if update._native_merge() is not None else ["python"]


@contextlib.contextmanager
def merge_path(path):
    """Run replace() through the native merge or force the pure-PyTorch one."""
    original = update._native_merge
    if path == "python":
        update._native_merge = lambda: None
    try:
        yield
    finally:
        update._native_merge = original


@pytest.mark.parametrize("b", [1, 2, 3])
def test_from_dense_round_trip(b):
    M, K = 6 * b, 4 * b
    w = torch.randn(M, K)
    bm = torch.rand(M // b, K // b) < 0.5
    mask = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
    cls = CSR if b == 1 else BSR
    m = cls.from_dense(w, mask, block_size=b)
    m.validate()
    assert m.nnz == int(bm.sum()) and m.nnz_elements == int(mask.sum())
    assert torch.equal(m.mask(), mask)
    assert torch.equal(m.to_dense(), w * mask)
    assert m.rowptr.dtype == torch.int32 and m.capacity == m.nnz
    assert m.density == pytest.approx(mask.float().mean().item())
    if b > 1:  # a block-level mask gives the same structure
        m2 = BSR.from_dense(w, bm, block_size=b)
        assert torch.equal(m2.to_dense(), m.to_dense())


def test_from_dense_default_mask_is_nonzeros():
    w = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    m = CSR.from_dense(w)
    assert m.nnz == 3 and torch.equal(m.to_dense(), w)
    assert m.col[:3].tolist() == [1, 0, 2] and m.rowptr.tolist() == [0, 1, 3]
    assert m.colptr.tolist() == [0, 1, 2, 3] and m.row[:3].tolist() == [1, 0, 1]


def test_to_dense_is_differentiable():
    m = random_matrix(5, 4, 0.6, seed=1)
    m.values.requires_grad_()
    (m.to_dense() * torch.arange(20.0, dtype=torch.float64).view(5, 4)).sum().backward()
    rows, cols, slots = m.coo()
    assert torch.equal(m.values.grad[slots], (rows * 4 + cols).double())


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("density, extra", [(0.4, 0), (0.4, 7), (0.0, 5), (1.0, 0), (1.0, 3)])
def test_to_dense_over_all_positions_equals_the_live_entries(b, density, extra):
    """The compiled (sync-free, fixed-size) to_dense: every capacity position, dead ones masked, gives the
    dense weight of the live entries and their gradient, also with free slots among the live ones."""
    m = random_matrix(6 * b, 5 * b, density, block_size=b, capacity_extra=extra, empty_rows=(1,), seed=3)
    if m.nnz > 2:  # free slots inside the slot order, with their values set: they must not leak in
        freed = m.drop(torch.tensor([0, m.nnz // 2]))
        m.values.data[freed] = 7.0
    m.values.requires_grad_()
    R, Q = m.grid
    expected = m.to_dense()
    zeros = m.values.new_zeros((R, Q) if b == 1 else (R, Q, b, b))
    got = m._scatter_all_positions(zeros)
    got = got if b == 1 else got.permute(0, 2, 1, 3).reshape(m.shape)
    assert torch.equal(got, expected)
    w = torch.randn(m.shape, dtype=expected.dtype)
    g_expected, = torch.autograd.grad((expected * w).sum(), m.values)
    g_got, = torch.autograd.grad((got * w).sum(), m.values)
    assert torch.equal(g_got, g_expected)


def test_from_mask_init():
    mask = torch.rand(50, 40) < 0.3
    m = CSR.from_mask(mask, init="kaiming_uniform", generator=torch.Generator().manual_seed(0))
    live = m.values[: m.nnz]
    assert bool((live.abs() <= 1 / 40**0.5).all()) and live.std() > 0
    assert torch.equal(m.mask(), mask)
    z = CSR.from_mask(mask)
    assert bool((z.values == 0).all())
    with pytest.raises(ValueError, match="init must be"):
        CSR.from_mask(mask, init="bogus")


def test_index_dtype_rule():
    assert index_dtype_for(10, 2**31 - 2) == torch.int32
    assert index_dtype_for(2**31) == torch.int64
    m = random_matrix(5, 4, 0.5, index_dtype=torch.int64)
    m.validate()
    assert m.col.dtype == torch.int64


def test_bad_input():
    with pytest.raises(ValueError, match="rows must lie in"):
        CSR.from_indices([0, 5], [0, 1], (5, 3))
    with pytest.raises(ValueError, match="cols must lie in"):
        CSR.from_indices([0, 1], [0, -1], (5, 3))
    with pytest.raises(ValueError, match="duplicated"):
        CSR.from_indices([1, 1], [2, 2], (5, 3))
    with pytest.raises(TypeError, match="integer"):
        CSR.from_indices(torch.tensor([0.0]), torch.tensor([1.0]), (5, 3))
    with pytest.raises(ValueError, match="values must have shape"):
        CSR.from_indices([0], [1], (5, 3), values=torch.ones(2))
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        BSR.from_dense(torch.ones(6, 8), block_size=4)
    with pytest.raises(ValueError, match="not constant inside 2x2 blocks"):
        BSR.from_dense(torch.ones(4, 4), torch.eye(4, dtype=torch.bool), block_size=2)
    with pytest.raises(ValueError, match="BSR needs block_size > 1"):
        BSR.from_dense(torch.ones(4, 4))
    with pytest.raises(ValueError, match="capacity must be >= nnz"):
        CSR.from_indices([0, 1], [0, 1], (2, 2), capacity=1)
    with pytest.raises(TypeError, match="mask must be a bool"):
        CSR.from_dense(torch.ones(2, 2), torch.ones(2, 2))


def test_validate_detects_corruption():
    m = random_matrix(6, 5, 0.5, capacity_extra=2)
    m.validate()
    broken = CSR(m.values, m.rowptr, m.col.clone(), m.slot, m.colptr, m.row, m.slot_t, m.shape)
    if m.rowptr[1] - m.rowptr[0] >= 2:
        broken.col[0], broken.col[1] = broken.col[1].clone(), broken.col[0].clone()
    else:
        broken.col[: m.nnz] = broken.col[: m.nnz].flip(0)
    with pytest.raises(ValueError):
        broken.validate()
    slot = m.slot.clone()
    slot[0] = slot[1]
    with pytest.raises(ValueError, match="permutation"):
        CSR(m.values, m.rowptr, m.col, slot, m.colptr, m.row, m.slot_t, m.shape).validate()


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 6), Q=st.integers(1, 6), b=st.sampled_from([1, 2]), density=st.floats(0, 1),
    extra=st.integers(0, 6), seed=st.integers(0, 10_000),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 10_000), st.integers(1, 4)), max_size=6),
)
@pytest.mark.parametrize("path", MERGE_PATHS)
def test_drop_grow_against_set_model(path, R, Q, b, density, extra, seed, steps):
    with merge_path(path):
        _drop_grow_against_set_model(R, Q, b, density, extra, seed, steps)


def _drop_grow_against_set_model(R, Q, b, density, extra, seed, steps):
    m = random_matrix(R * b, Q * b, density, block_size=b, capacity_extra=extra, seed=seed)
    g = torch.Generator().manual_seed(seed)
    # Model: {(row, col): value block}
    rows, cols, slots = m.coo()
    model = {(int(r), int(c)): m.values[s].clone() for r, c, s in zip(rows, cols, slots)}
    for is_drop, pick, k in steps:
        if is_drop:
            if m.nnz == 0:
                continue
            k = min(k, m.nnz)
            pos = torch.randperm(m.nnz, generator=g)[:k]
            rows, cols, _ = m.coo()
            gone = {(int(rows[p]), int(cols[p])) for p in pos}
            freed = m.drop(pos)
            assert freed.numel() == k and bool((m.values[freed] == 0).all())
            for key in gone:
                del model[key]
        else:
            absent = [(r, c) for r in range(R) for c in range(Q) if (r, c) not in model]
            if not absent:
                continue
            take = [absent[i] for i in torch.randperm(len(absent), generator=g)[:k].tolist()]
            if m.nnz + len(take) > m.capacity:
                before = [t.clone() for t in m.index_tensors()]
                with pytest.raises(ValueError, match="capacity"):
                    m.grow([t[0] for t in take], [t[1] for t in take])
                assert all(torch.equal(u, v) for u, v in zip(before, m.index_tensors()))
                continue
            used = m.grow([t[0] for t in take], [t[1] for t in take])
            assert bool((m.values[used] == 0).all())
            for key in take:
                model[key] = torch.zeros_like(m.values[0])
        m.validate()
        rows, cols, slots = m.coo()
        got = {(int(r), int(c)): m.values[s] for r, c, s in zip(rows, cols, slots)}
        assert set(got) == set(model)
        for key, v in model.items():  # values never move
            assert torch.equal(got[key], v)


@pytest.mark.parametrize("path", MERGE_PATHS)
def test_grow_rejects_existing_and_leaves_structure_intact(path, monkeypatch):
    if path == "python":
        monkeypatch.setattr(update, "_native_merge", lambda: None)
    m = random_matrix(4, 4, 0.5, capacity_extra=4, seed=2)
    r, c, _ = m.coo()
    before = [t.clone() for t in m.index_tensors()]
    with pytest.raises(ValueError, match="already stored"):
        m.grow([int(r[0])], [int(c[0])])
    with pytest.raises(ValueError, match="positions must lie in"):
        m.drop([m.nnz])
    with pytest.raises(ValueError, match="duplicates"):
        m.drop([0, 0])
    assert all(torch.equal(u, v) for u, v in zip(before, m.index_tensors()))


@pytest.mark.parametrize("path", MERGE_PATHS)
def test_replace_drops_and_grows_in_one_rewrite(path, monkeypatch):
    if path == "python":
        monkeypatch.setattr(update, "_native_merge", lambda: None)
    m = random_matrix(6, 6, 0.5, seed=4)  # capacity == nnz: growth must reuse freed slots
    rows, cols, slots = m.coo()
    before = {(int(r), int(c)): m.values[s].item() for r, c, s in zip(rows, cols, slots)}
    absent = [(r, c) for r in range(6) for c in range(6) if (r, c) not in before][:2]
    regrown = (int(rows[0]), int(cols[0]))  # dropped and grown again in the same call
    freed, used = m.replace([0, 1, 2], [absent[0][0], absent[1][0], regrown[0]],
                            [absent[0][1], absent[1][1], regrown[1]])
    m.validate()
    assert m.nnz == len(before) and sorted(freed.tolist()) == sorted(used.tolist())
    r2, c2, s2 = m.coo()
    after = {(int(r), int(c)): m.values[s].item() for r, c, s in zip(r2, c2, s2)}
    gone = {(int(rows[i]), int(cols[i])) for i in (1, 2)}
    assert set(after) == (set(before) - gone) | set(absent)
    assert after[regrown] == 0 and after[absent[0]] == 0 and after[absent[1]] == 0
    assert all(after[k] == v for k, v in before.items() if k in after and k != regrown and k not in absent)
    with pytest.raises(ValueError, match="already stored"):
        m.replace([], [absent[0][0]], [absent[0][1]])


@pytest.mark.skipif(update._native_merge() is None, reason="C++ extension not built")
@pytest.mark.parametrize("b,index_dtype", [(1, torch.int32), (1, torch.int64), (2, torch.int32)])
def test_native_and_python_merge_give_the_same_index(b, index_dtype):
    """The native merge of replace() and the pure-PyTorch one write identical index tensors."""
    g = torch.Generator().manual_seed(0)
    results = []
    for path in MERGE_PATHS:
        m = random_matrix(40 * b, 30 * b, 0.3, block_size=b, capacity_extra=50, seed=5)
        m = type(m)(m.values, *(t.to(index_dtype) for t in m.index_tensors()), m.shape)
        g.manual_seed(1)
        with merge_path(path):
            for _ in range(4):
                pos = torch.randperm(m.nnz, generator=g)[:m.nnz // 3]
                present = set(zip(*(t.tolist() for t in m.coo()[:2])))
                absent = [(r, c) for r in range(40) for c in range(30) if (r, c) not in present]
                take = [absent[i] for i in torch.randperm(len(absent), generator=g)[:len(pos) + 7].tolist()]
                m.replace(pos, [t[0] for t in take], [t[1] for t in take])
                m.validate()
        results.append([t.clone() for t in m.index_tensors()])
    assert all(torch.equal(u, v) and u.dtype == index_dtype for u, v in zip(*results))


# ------------------------------------------------- the PyTorch twin of the native merge (GPU path)
def _merge_inputs(m, g, n_drop, n_new, view):
    """(ptr, idx, slot, keep, new_major, new_minor, new_slot, total, minor_extent) for one view of ``m``."""
    R, Q = m.grid
    rows, cols, _ = m.coo()
    present = set(zip(rows.tolist(), cols.tolist()))
    absent = [(r, c) for r in range(R) for c in range(Q) if (r, c) not in present]
    take = sorted(absent[i] for i in torch.randperm(len(absent), generator=g)[:n_new].tolist())
    nr = torch.tensor([t[0] for t in take], dtype=torch.long)
    nc = torch.tensor([t[1] for t in take], dtype=torch.long)
    nslot = torch.randperm(10_000, generator=g)[:len(take)]
    keep = torch.ones(m.nnz, dtype=torch.bool)
    keep[torch.randperm(m.nnz, generator=g)[:n_drop]] = False
    total = int(keep.sum()) + len(take)
    if view == "csr":
        return m.rowptr, m.col, m.slot, keep, nr, nc, nslot, total, Q
    order = torch.sort(nc * R + nr).indices
    return m.colptr, m.row, m.slot_t, keep, nc[order], nr[order], nslot[order], total, R


@pytest.mark.skipif(update._native_merge() is None, reason="C++ extension not built")
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("view", ["csr", "csc"])
def test_merge_index_twin_matches_the_native_op_bit_for_bit(index_dtype, view):
    from sparsestart import _native

    g = torch.Generator().manual_seed(11)
    op = update._native_merge()
    for M, K, density, n_drop, n_new in ((1, 1, 0.0, 0, 0), (1, 1, 0.0, 0, 1), (5, 7, 1.0, 35, 0),
                                         (5, 7, 1.0, 10, 10), (40, 30, 0.3, 100, 150), (40, 30, 0.3, 0, 40),
                                         (64, 3, 0.05, 2, 60), (3, 64, 0.9, 170, 0)):
        m = random_matrix(M, K, density, capacity_extra=n_new, seed=M * K + n_new, index_dtype=index_dtype)
        args = _merge_inputs(m, g, min(n_drop, m.nnz), n_new, view)
        want = op(*args[:8])
        got = _native.merge_index(*args)
        for w, t in zip(want, got):
            assert t.dtype == w.dtype and torch.equal(t, w), (M, K, n_drop, n_new)


@pytest.mark.skipif(update._native_merge() is None, reason="C++ extension not built")
@pytest.mark.parametrize("view", ["csr", "csc"])
def test_native_merge_is_the_same_on_any_thread_count(view):
    # Large enough that the native merge splits the majors into several parallel chunks (it takes
    # about 32k entries per chunk): the result must equal the single-thread one and the twin's.
    from sparsestart import _native

    g = torch.Generator().manual_seed(5)
    m = random_matrix(3000, 200, 0.2, capacity_extra=9000, seed=7)
    args = _merge_inputs(m, g, 30_000, 9000, view)
    op = update._native_merge()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*args[:8])
        torch.set_num_threads(max(2, threads))
        many = op(*args[:8])
    finally:
        torch.set_num_threads(threads)
    twin = _native.merge_index(*args)
    for a, b, c in zip(one, many, twin):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("path", MERGE_PATHS)
def test_merge_index_twin_rejects_what_the_native_op_rejects(path):
    from sparsestart import _native

    m = random_matrix(6, 6, 0.5, capacity_extra=4, seed=3)
    rows, cols, _ = m.coo()
    keep = torch.ones(m.nnz, dtype=torch.bool)
    merge = update._native_merge() if path == "native" else (
        lambda *a: _native.merge_index(*a, m.grid[1]))
    one = torch.tensor([0])
    existing = (rows[:1], cols[:1], one)
    with pytest.raises(ValueError, match="already stored"):
        merge(m.rowptr, m.col, m.slot, keep, *existing, m.nnz + 1)
    r = int(rows[0])
    absent = [c for c in range(6) if c not in cols[rows == r].tolist()]
    if len(absent) >= 2:  # two new entries of one row given in descending order
        with pytest.raises(ValueError, match="not sorted"):
            merge(m.rowptr, m.col, m.slot, keep, torch.tensor([r, r]), torch.tensor(absent[:2][::-1]),
                  torch.tensor([0, 1]), m.nnz + 2)


@pytest.mark.parametrize("path", MERGE_PATHS)
def test_merge_clash_behind_a_valid_new_entry_names_its_coordinates(path):
    from sparsestart import _native

    m = random_matrix(8, 8, 0.5, capacity_extra=4, seed=5)
    rows, cols, _ = m.coo()
    stored = set(zip(rows.tolist(), cols.tolist()))
    keep = torch.ones(m.nnz, dtype=torch.bool)
    merge = update._native_merge() if path == "native" else (
        lambda *a: _native.merge_index(*a, m.grid[1]))
    if merge is None:
        pytest.skip("C++ extension not built")
    free = next((r, c) for r in range(4) for c in range(8) if (r, c) not in stored)
    clash = next((r, c) for r, c in sorted(stored) if r > free[0])
    with pytest.raises(ValueError, match=rf"entry \({clash[0]}, {clash[1]}\) is already stored"):
        merge(m.rowptr, m.col, m.slot, keep, torch.tensor([free[0], clash[0]]), torch.tensor([free[1], clash[1]]),
              torch.tensor([0, 1]), m.nnz + 2)
    assert set(zip(*[t.tolist() for t in m.coo()[:2]])) == stored


@pytest.mark.parametrize("path", MERGE_PATHS)
@pytest.mark.parametrize("shape,density,b,index_dtype", [((1, 1), 0.0, 1, torch.int32), ((7, 5), 1.0, 1, torch.int64),
                                                         ((300, 200), 0.1, 1, torch.int32),
                                                         ((64, 32), 0.3, 4, torch.int64)])
def test_keys_and_keys_at_equal_the_coordinates(path, monkeypatch, shape, density, b, index_dtype):
    from sparsestart import _native

    if path == "python":
        monkeypatch.setattr(_native, "native_op_for", lambda *a: None)
    m = random_matrix(*shape, density, block_size=b, seed=3, index_dtype=index_dtype, capacity_extra=3)
    rows, cols, _ = m.coo()
    want = rows * m.grid[1] + cols
    assert torch.equal(m.keys(), want) and m.keys().dtype == torch.long
    keep = torch.rand(m.nnz, generator=torch.Generator().manual_seed(1)) < 0.6
    assert torch.equal(m.keys(keep), want[keep])
    positions = torch.nonzero(~keep).flatten()
    assert torch.equal(m.keys_at(positions), want[positions])
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape"):
        m.keys(keep[:-1] if m.nnz else torch.ones(1, dtype=torch.bool))
    if path == "native" and m.nnz:
        torch.library.opcheck(torch.ops.sparsestart._native_kept_keys, (m.rowptr, m.col, keep, m.grid[1]))
        torch.library.opcheck(torch.ops.sparsestart._native_kept_keys, (m.rowptr, m.col, None, m.grid[1]))
