"""SparseMatrix.rewire: RigL/SET's drop + grow by keys in one index rewrite, on the native op (CPU) and on
its PyTorch composition (keys_at + replace: what runs off the CPU), against a set model and each other."""
import copy

import pytest
import torch

from sparsestart import _native
from sparsestart.formats import update
from tests.util import random_matrix

NATIVE = _native.native_op("_native_rewire") is not None
PATHS = ["native", "python"] if NATIVE else ["python"]


@pytest.fixture
def rewire_path(request, monkeypatch):
    """Parametrised by path: "python" hides the native op (native_op_for returns None everywhere)."""
    if request.param == "python":
        monkeypatch.setattr(_native, "native_op_for", lambda *a: None)
    return request.param


def _case(m, seed, n_drop, n_regrow, n_new):
    """(drop positions, grow keys, regrown keys): n_drop random positions, n_regrow of the dropped keys grown
    again and n_new absent keys, all ascending."""
    g = torch.Generator().manual_seed(seed)
    R, Q = m.grid
    keys = m.keys()
    drop = torch.sort(torch.randperm(m.nnz, generator=g)[:n_drop]).values
    regrow = keys[drop[torch.randperm(drop.numel(), generator=g)[:n_regrow]]]
    present = torch.zeros(R * Q, dtype=torch.bool)
    present[keys] = True
    absent = (~present).nonzero().flatten()
    new = absent[torch.randperm(absent.numel(), generator=g)[:n_new]]
    return drop, torch.sort(torch.cat([regrow, new])).values, set(regrow.tolist())


CASES = [  # (M, K, block, density, capacity_extra, n_drop, n_regrow, n_new, empty_rows, index_dtype)
    (1, 1, 1, 0.0, 0, 0, 0, 0, (), torch.int32),        # nothing at all
    (0, 5, 1, 0.5, 2, 0, 0, 0, (), torch.int32),        # no rows
    (5, 0, 1, 0.5, 2, 0, 0, 0, (), torch.int64),        # no columns
    (1, 1, 1, 0.0, 1, 0, 0, 1, (), torch.int64),        # nnz = 0, grow into the tail
    (5, 7, 1, 1.0, 0, 10, 10, 0, (), torch.int32),      # density 1: only regrowth possible
    (5, 7, 1, 1.0, 0, 35, 0, 0, (), torch.int64),       # drop everything
    (40, 30, 1, 0.3, 0, 100, 30, 70, (3, 17), torch.int32),
    (40, 30, 1, 0.3, 25, 100, 0, 125, (0, 39), torch.int64),  # tail slots used first
    (40, 30, 1, 0.3, 25, 100, 50, 10, (), torch.int32),  # grows fewer than drops
    (64, 3, 1, 0.05, 0, 5, 5, 0, (), torch.int32),
    (3, 64, 1, 0.9, 0, 17, 2, 15, (1,), torch.int64),
    (32, 48, 4, 0.3, 4, 12, 3, 13, (2,), torch.int32),  # BSR blocks
    (300, 257, 1, 0.1, 0, 2300, 700, 1600, (5, 6, 7), torch.int32),
]


@pytest.mark.parametrize("rewire_path", PATHS, indirect=True)
@pytest.mark.parametrize("M,K,b,density,extra,n_drop,n_regrow,n_new,empty,idt", CASES)
def test_rewire_against_a_set_model(rewire_path, M, K, b, density, extra, n_drop, n_regrow, n_new, empty, idt):
    m = random_matrix(M, K, density, block_size=b, capacity_extra=extra, empty_rows=empty, seed=M + K + n_new,
                      index_dtype=idt)
    n_drop = min(n_drop, m.nnz)
    drop, grow, regrown = _case(m, 7, n_drop, min(n_regrow, n_drop), n_new)
    rows, cols, slots = m.coo()
    Q = m.grid[1]
    before = {int(r) * Q + int(c): int(s) for r, c, s in zip(rows, cols, slots)}
    with torch.no_grad():
        m.values[m.slot[m.nnz:].long()] = 7.0  # whatever a free slot holds, a new entry starts at 0
    values = m.values.detach().clone()
    dropped = {int(rows[p]) * Q + int(cols[p]) for p in drop}
    capacity, tail = m.capacity, m.slot[m.nnz:].long().tolist()

    freed, new = m.rewire(drop, grow)

    m.validate()
    rows, cols, slots = m.coo()
    after = {int(r) * Q + int(c): int(s) for r, c, s in zip(rows, cols, slots)}
    really_dropped = dropped - regrown
    grown = set(grow.tolist()) - regrown
    assert set(after) == (set(before) - really_dropped) | grown
    assert m.nnz == len(before) - len(really_dropped) + len(grown) and m.capacity == capacity
    # Kept and regrown entries keep their slot and value; freed slots (CSR order) and new slots (CSR
    # order, the old tail first) are as documented, and hold 0.
    for key in set(before) - really_dropped:
        assert after[key] == before[key]
        assert torch.equal(m.values[after[key]], values[before[key]])
    assert freed.tolist() == [before[k] for k in sorted(really_dropped)]
    assert new.tolist() == [after[k] for k in sorted(grown)]
    assert new.tolist() == (tail + freed.tolist())[:len(grown)]
    for s in freed.tolist() + new.tolist():
        assert not m.values[s].any()


@pytest.mark.skipif(not NATIVE, reason="C++ extension not built")
@pytest.mark.parametrize("M,K,b,density,extra,n_drop,n_regrow,n_new,empty,idt", CASES)
def test_native_rewire_equals_the_pytorch_composition_bit_for_bit(monkeypatch, M, K, b, density, extra, n_drop,
                                                                  n_regrow, n_new, empty, idt):
    m = random_matrix(M, K, density, block_size=b, capacity_extra=extra, empty_rows=empty, seed=M * K + n_drop,
                      index_dtype=idt)
    drop, grow, _ = _case(m, 3, min(n_drop, m.nnz), min(n_regrow, n_drop, m.nnz), n_new)
    twin = copy.deepcopy(m)
    got = m.rewire(drop, grow)
    with monkeypatch.context() as patch:
        patch.setattr(_native, "native_op_for", lambda *a: None)
        want = twin.rewire(drop, grow)
    for a, w in zip(got + (m.values, *m.index_tensors()), want + (twin.values, *twin.index_tensors())):
        assert a.dtype == w.dtype and torch.equal(a, w)


@pytest.mark.skipif(not NATIVE, reason="C++ extension not built")
def test_native_rewire_is_the_same_on_any_thread_count():
    # Big enough that the rows and the columns are split into several parallel chunks.
    m = random_matrix(3000, 400, 0.2, capacity_extra=500, seed=2)
    drop, grow, _ = _case(m, 1, 70_000, 20_000, 50_500)
    op = torch.ops.sparsestart._native_rewire
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(*m.index_tensors(), drop, grow)
        torch.set_num_threads(max(2, threads))
        many = op(*m.index_tensors(), drop, grow)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.skipif(not NATIVE, reason="C++ extension not built")
def test_native_rewire_opcheck():
    m = random_matrix(40, 30, 0.3, capacity_extra=5, seed=1)
    drop, grow, _ = _case(m, 2, 30, 10, 25)
    torch.library.opcheck(torch.ops.sparsestart._native_rewire, (*m.index_tensors(), drop, grow))


@pytest.mark.parametrize("rewire_path", PATHS, indirect=True)
def test_rewire_rejects_bad_input_and_changes_nothing(rewire_path):
    m = random_matrix(12, 10, 0.4, capacity_extra=2, seed=4)
    state = [t.clone() for t in (m.values, *m.index_tensors())]
    keys = m.keys()
    present = set(keys.tolist())
    absent = [k for k in range(120) if k not in present]
    bad = [
        (([3, 1], []), r"drop positions must be ascending and distinct, but 3 at index 0 is followed by 1"),
        (([2, 2], []), r"drop positions must be ascending and distinct"),
        (([0, m.nnz], []), rf"drop positions must lie in \[0, {m.nnz}\), got range \[0, {m.nnz}\]"),
        (([-1], []), r"drop positions must lie in"),
        (([], absent[:2][::-1]), r"grow keys must be ascending and distinct"),
        (([], [absent[0], 120]), r"grow keys must lie in \[0, 120\)"),
        (([1], [int(keys[0])]), rf"entry \({int(keys[0]) // 10}, {int(keys[0]) % 10}\) is already stored"),
        (([], absent[:3]), r"needs capacity .* but the structure has capacity"),
    ]
    for (drop, grow), message in bad:
        with pytest.raises(ValueError, match=message):
            m.rewire(torch.tensor(drop, dtype=torch.long), torch.tensor(grow, dtype=torch.long))
        for t, s in zip((m.values, *m.index_tensors()), state):
            assert torch.equal(t, s), message
