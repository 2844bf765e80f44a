"""Index contents entering the public ops (issue 17): every corruption is a ValueError naming the op,
the tensor, the position and the value, never a read or write out of bounds.

The native CPU kernels trust the index (csrc/cpu/checks.h); before the check in the ops' real impl
these cases killed the process with SIGSEGV or returned garbage that changed between identical
calls. They therefore run in one child process per group: a crash fails the cases it reached
(and the ones after it) instead of killing pytest. The cache (one validation per structure
version) and the revalidation after a structure update are tested in-process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sparsestart import ops
from sparsestart.nn import SparseConv2d, SparseLinear
from sparsestart.ops import library
from tests.util import random_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = torch.ops.sparsestart
BACKENDS = [b for b in ("cpu", "reference") if b == "reference" or ops.NATIVE_AVAILABLE]
OPS = ("spmm", "spmm_t", "sddmm", "conv2d", "conv2d_input_grad", "conv2d_weight_grad")
CONV_OPS = OPS[3:]
GEOMETRY = ([3, 3], [1, 1], [1, 1])  # kernel_size, padding, dilation of the conv ops
N_IMG, H, W = 2, 5, 4
INDEX = ("rowptr", "col", "slot", "colptr", "row", "slot_t")


# --------------------------------------------------------------------------------- corruptions
# name -> (how, what the message must say). ``how(idx, nnz, C, R, Q)`` writes into
# clones of the six index tensors; None as message: the index stays valid (only the free tail changes).
def _set(name, pos, value):
    def how(idx, nnz, C, R, Q):
        i = INDEX.index(name)
        p = pos(nnz, C, R, Q) if callable(pos) else pos
        idx[i][p] = value(nnz, C, R, Q) if callable(value) else value
    return how


def _swap(name, p, q):
    def how(idx, nnz, C, R, Q):
        t = idx[INDEX.index(name)]
        t[p], t[q] = t[q].clone(), t[p].clone()
    return how


def _col_duplicate(idx, nnz, C, R, Q):
    idx[1][1] = idx[1][0]


def _slot_duplicate(idx, nnz, C, R, Q):
    idx[2][1] = idx[2][0]


def _colptr_boundary(idx, nnz, C, R, Q):
    idx[3][1] += 1  # column 0 takes the first entry of column 1: order or view mismatch


CORRUPTIONS = {
    "col_out_of_range": (_set("col", 2, lambda nnz, C, R, Q: Q), r"col must lie in \[0, \d+\).*col\[2\]="),
    "col_negative": (_set("col", 2, -3), r"col must lie in \[0, \d+\).*col\[2\]=-3"),
    "col_huge": (_set("col", slice(0, None), 10**8), r"col must lie in .*col\[0\]=100000000"),
    "col_unsorted": (_swap("col", 0, 1), r"col must be strictly increasing within each row"),
    "col_duplicate": (_col_duplicate, r"col must be strictly increasing .*col\[0\]=(\d+) then col\[1\]=\1"),
    "slot_out_of_range": (_set("slot", 1, lambda nnz, C, R, Q: C + 7), r"slot must be a permutation .*slot\[1\]="),
    "slot_negative": (_set("slot", 1, -1), r"slot must be a permutation .*slot\[1\]=-1 outside"),
    "slot_duplicate": (_slot_duplicate, r"slot must be a permutation .*slot\[0\] = slot\[1\]"),
    "slot_t_out_of_range": (_set("slot_t", 0, 10**6), r"slot_t must be a permutation .*slot_t\[0\]=1000000"),
    "slots_disagree": (_swap("slot", 0, 1), r"CSC view .* does not describe the same entries"),
    "row_out_of_range": (_set("row", 0, lambda nnz, C, R, Q: R), r"row must lie in \[0, \d+\).*row\[0\]="),
    "row_negative": (_set("row", 0, -1), r"row must lie in .*row\[0\]=-1"),
    "rowptr_not_monotone": (_set("rowptr", 1, lambda nnz, C, R, Q: nnz), r"rowptr must start at 0 and be "
                                                                          r"non-decreasing, got rowptr\[1\]="),
    "rowptr_start": (_set("rowptr", 0, 1), r"rowptr must start at 0 .*rowptr\[0\]=1"),
    "rowptr_above_capacity": (_set("rowptr", -1, lambda nnz, C, R, Q: C + 5),
                              r"rowptr\[-1\]=\d+ live entries exceed the capacity"),
    "rowptr_middle_above_capacity": (_set("rowptr", 1, 10**6), r"rowptr must start at 0 and be non-decreasing"),
    "colptr_not_monotone": (_set("colptr", 1, lambda nnz, C, R, Q: nnz), r"colptr must start at 0 and be "
                                                                          r"non-decreasing"),
    "colptr_count": (_set("colptr", -1, lambda nnz, C, R, Q: nnz - 1), r"rowptr counts \d+ entries but colptr"),
    "colptr_boundary": (_colptr_boundary, r"row must be strictly increasing|CSC view"),
    "free_tail_garbage": (_set("col", lambda nnz, C, R, Q: slice(nnz, None), 10**6), None),
}


def _structure(fmt: str):
    """A small weight with free slots; CSR is (6, 3 * 3 * 3) so the conv ops can take it as 3 -> 6
    channels with a 3x3 kernel. Row 0 and column 0 hold at least two entries (swap corruptions)."""
    if fmt == "csr":
        m = random_matrix(6, 27, 0.5, capacity_extra=3, seed=4)
    else:
        m = random_matrix(8, 12, 0.7, block_size=2, capacity_extra=2, seed=3)
    assert int(m.rowptr[1]) >= 2 and int(m.colptr[1]) >= 2 and m.capacity > m.nnz, "pick another seed"
    return m


def run_op(op: str, values, idx, C: int, b: int, M: int, K: int):
    """Call public op ``op`` with the index ``idx`` (fixed dense operands)."""
    g = torch.Generator().manual_seed(0)
    dt = values.dtype
    if op in ("spmm", "spmm_t", "sddmm"):
        x, dy = torch.randn(K, 5, generator=g, dtype=dt), torch.randn(M, 5, generator=g, dtype=dt)
        if op == "spmm":
            return S.spmm(values, *idx, x)
        if op == "spmm_t":
            return S.spmm_t(values, *idx, dy)
        return S.sddmm(*idx, dy, x, C, b)
    x = torch.randn(N_IMG, K // 9, H, W, generator=g, dtype=dt)
    dy = torch.randn(N_IMG, M, H, W, generator=g, dtype=dt)
    if op == "conv2d":
        return S.conv2d(values, *idx, x, *GEOMETRY)
    if op == "conv2d_input_grad":
        return S.conv2d_input_grad(values, *idx, dy, *GEOMETRY)
    return S.conv2d_weight_grad(*idx, dy, x, C, *GEOMETRY)


def op_case(op: str, corruption: str, fmt: str, backend: str) -> dict:
    """Outcome of one corrupted call: {"error": type, "message": ...} or {"ok": matches the clean result}."""
    m = _structure(fmt)
    how, _ = CORRUPTIONS[corruption]
    idx = [t.clone() for t in m.index_tensors()]
    R, Q = m.grid
    how(idx, m.nnz, m.capacity, R, Q)
    args = (m.values, idx, m.capacity, m.block_size, *m.shape)
    with ops.use_backend(backend):
        try:
            out = run_op(op, *args)
        except Exception as exc:  # noqa: BLE001  (the parent checks the type)
            return {"error": type(exc).__name__, "message": str(exc)}
        clean = run_op(op, m.values, list(m.index_tensors()), *args[2:])
    return {"ok": bool(torch.allclose(out, clean))}


def op_cases():
    for op in OPS:
        for fmt in ("csr",) if op in CONV_OPS else ("csr", "bsr"):
            for corruption in CORRUPTIONS:
                for backend in BACKENDS:
                    yield op, corruption, fmt, backend


OP_CASES = list(op_cases())


def _child(group: str) -> dict:
    """Run ``group``'s cases in a child process; {case id: outcome}, plus "__rc__" and "__stderr__"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"from tests.ops import test_index_validation as t; t.main({group!r})"
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec.pop("case")] = rec
    results["__rc__"], results["__stderr__"] = r.returncode, r.stderr[-3000:]
    return results


def main(group: str) -> None:
    """Child entry point: one JSON line per case, flushed before the next (a crash keeps the earlier ones)."""
    torch.set_num_threads(1)
    if group == "ops":
        cases = ((f"{op}-{c}-{f}-{b}", lambda op=op, c=c, f=f, b=b: op_case(op, c, f, b)) for op, c, f, b in OP_CASES)
    else:
        cases = ((name, fn) for name, fn in LAYER_SCENARIOS.items())
    for name, fn in cases:
        print(json.dumps({"case": name, **fn()}), flush=True)


def _outcome(results: dict, case: str) -> dict:
    if case not in results:
        pytest.fail(f"the child process died before or at this case (rc={results['__rc__']}):\n"
                    f"{results['__stderr__']}")
    return results[case]


@pytest.fixture(scope="module")
def op_results():
    return _child("ops")


@pytest.mark.parametrize("op,corruption,fmt,backend", OP_CASES, ids=[f"{o}-{c}-{f}-{b}" for o, c, f, b in OP_CASES])
def test_corrupted_index_is_a_clear_error(op_results, op, corruption, fmt, backend):
    out = _outcome(op_results, f"{op}-{corruption}-{fmt}-{backend}")
    expected = CORRUPTIONS[corruption][1]
    if expected is None:  # still a valid index: the result must be the clean one
        assert out == {"ok": True}, out
        return
    assert out.get("error") == "ValueError", out
    assert out["message"].startswith(f"sparsestart.{op}: "), out["message"]
    assert re.search(expected, out["message"]), (expected, out["message"])


# --------------------------------------------------------------------------- layer scenarios
def _expect_error(fn, *pieces) -> dict:
    try:
        fn()
    except ValueError as exc:
        missing = [p for p in pieces if p not in str(exc)]
        return {"result": "refused" if not missing else f"message lacks {missing}: {exc}"}
    return {"result": "no error"}


def _write_after_forward(make, buffer, value, op):
    def scenario():
        torch.manual_seed(0)
        layer = make()
        x = torch.randn(3, *layer.example_shape)
        y0 = layer(x).detach()
        t = getattr(layer, buffer)
        old = t[3].clone()
        t[3] = value
        out = _expect_error(lambda: layer(x), f"sparsestart.{op}: ", buffer, str(value))
        t[3] = old  # written back through the tensor: revalidated, and the layer computes as before
        out["restored"] = bool(torch.equal(layer(x).detach(), y0))
        return out
    return scenario


def _linear(**kw):
    layer = SparseLinear(64, 32, density=0.2, seed=0, **kw)
    layer.example_shape = (64,)
    return layer


def _conv(algorithm):
    def make():
        layer = SparseConv2d(3, 4, 3, padding=1, density=0.3, seed=0)
        layer.conv_algorithm = algorithm
        layer.example_shape = (3, 6, 5)
        return layer
    return make


def _replaced_buffer():
    layer = _linear()
    x = torch.randn(3, 64)
    layer(x)
    bad = layer.col.clone()
    bad[0] = 10**6
    layer.col = bad  # a new tensor object (version 0, like the old one was at its start)
    return _expect_error(lambda: layer(x), "sparsestart.spmm: ", "col")


def _inference_tensors():
    with torch.inference_mode():
        layer = _linear()
        x = torch.randn(3, 64)
        ok = bool(torch.allclose(layer(x), layer.to_dense()(x), atol=1e-5))
        layer.col[3] = 10**6  # inference tensors have no version counter: checked on every call
        out = _expect_error(lambda: layer(x), "sparsestart.spmm: ", "col")
    return {**out, "restored": ok}


def _compiled():
    layer = _linear()
    x = torch.randn(3, 64)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    ok = bool(torch.allclose(y, layer.to_dense()(x), atol=1e-5))
    layer.col[3] = 10**6  # the compiled graph runs the op's real impl: checked at run time
    return {**_expect_error(lambda: compiled(x), "sparsestart.spmm: ", "col"), "restored": ok}


def _conv_columns_not_a_multiple_of_the_kernel():
    # 10 columns for a 3x3 kernel: column 9 would address input channel 1 of a 1-channel input.
    m = random_matrix(2, 10, 1.0, seed=0)
    x = torch.randn(1, 1, 4, 4, dtype=m.values.dtype)
    return _expect_error(lambda: S.conv2d(m.values, *m.index_tensors(), x, *GEOMETRY), "sparsestart.conv2d: ",
                         "colptr", "kernel_size")


LAYER_SCENARIOS = {
    "linear_col": _write_after_forward(_linear, "col", 10**6, "spmm"),
    "linear_negative_col": _write_after_forward(_linear, "col", -1, "spmm"),
    "linear_slot": _write_after_forward(_linear, "slot", 10**6, "spmm"),
    "linear_row": _write_after_forward(_linear, "row", 10**6, "spmm"),  # row is read by the backward only
    "linear_rowptr": _write_after_forward(_linear, "rowptr", 10**6, "spmm"),
    "bsr_linear_col": _write_after_forward(lambda: _linear(format="bsr", block_size=4), "col", 10**6, "spmm"),
    "conv_direct_col": _write_after_forward(_conv("direct"), "col", 10**6, "conv2d"),
    "conv_unfold_slot_t": _write_after_forward(_conv("unfold"), "slot_t", 10**6, "spmm"),
    "replaced_buffer": _replaced_buffer,
    "inference_tensors": _inference_tensors,
    "compiled": _compiled,
    "conv_columns": _conv_columns_not_a_multiple_of_the_kernel,
}


@pytest.fixture(scope="module")
def layer_results():
    return _child("layers")


@pytest.mark.parametrize("scenario", list(LAYER_SCENARIOS))
def test_layer_index_written_after_a_forward_is_refused(layer_results, scenario):
    out = _outcome(layer_results, scenario)
    assert out["result"] == "refused", out
    assert out.get("restored", True), out


# ------------------------------------------------------------------- the cache (in-process)
@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    real = library.validate_index

    def counting(*args, **kwargs):
        calls.append(kwargs.get("where"))
        return real(*args, **kwargs)

    monkeypatch.setattr(library, "validate_index", counting)
    return calls


def _step(layer, x):
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()


def test_one_validation_per_structure_version(count_validations):
    layer = SparseLinear(32, 16, density=0.3, seed=0)
    x = torch.randn(4, 32, requires_grad=True)
    _step(layer, x)
    assert len(count_validations) == 0  # built by the library: known valid
    layer.col[0] = layer.col[0].clone()  # the same value, but a write: a new version
    for _ in range(3):
        _step(layer, x)  # spmm, then sddmm and spmm_t in the backward: one index, one check
    assert len(count_validations) == 1


def test_structure_update_by_the_library_is_trusted_and_computes_right(count_validations):
    # SparseMatrix.replace writes a valid index by construction and records the verdict for the
    # versions it leaves: the next forward does not validate again (a whole validation costs more
    # than the update on large layers), and the result is right.
    from sparsestart.algorithms.structure import rewire

    layer = SparseLinear(32, 16, density=0.3, seed=0, capacity=200)
    x = torch.randn(4, 32)
    _step(layer, x)
    before = len(count_validations)
    m = layer.sparse_weight
    rows, cols, _ = m.coo()
    present = set(zip(rows.tolist(), cols.tolist()))
    grow = [(r, c) for r in range(16) for c in range(32) if (r, c) not in present][:5]
    rewire(layer, torch.tensor([0, 3, 7]), torch.tensor([g[0] for g in grow]), torch.tensor([g[1] for g in grow]),
           None)
    y = layer(x)
    _step(layer, x)
    assert len(count_validations) == before
    assert torch.allclose(y, layer.to_dense()(x), atol=1e-5)
    layer.validate()
    # A write of the user's after the update is validated again (and refused when bad).
    layer.col[0] = layer.col[0].clone()
    _step(layer, x)
    assert len(count_validations) == before + 1
    layer.row[0] = 10**6
    with pytest.raises(ValueError, match=r"row must lie in \[0, 16\)"):
        layer(x)


def test_a_structure_built_by_the_library_needs_no_validation(count_validations):
    layer = SparseLinear(32, 16, density=0.3, seed=0)
    _step(layer, torch.randn(4, 32))
    assert count_validations == []
    # An index that comes from outside (a state dict) is validated on first use.
    other = SparseLinear(32, 16, density=0.3, seed=1)
    other.load_state_dict(layer.state_dict())
    _step(other, torch.randn(4, 32))
    assert len(count_validations) == 1


def test_another_tensor_with_the_same_contents_is_validated(count_validations):
    m = random_matrix(7, 5, 0.5, capacity_extra=2, seed=1)
    x = torch.randn(5, 3, dtype=m.values.dtype)
    idx = list(m.index_tensors())
    S.spmm(m.values, *idx, x)
    S.spmm(m.values, *idx, x)
    assert len(count_validations) == 1
    idx[1] = idx[1].clone()
    S.spmm(m.values, *idx, x)
    assert len(count_validations) == 2


def test_write_through_data_bypasses_the_cache_but_validate_sees_it():
    # The documented hole: .data has its own version counter. layer.validate() is the remedy.
    layer = SparseLinear(16, 8, density=0.3, seed=0)
    layer(torch.randn(2, 16))
    layer.col.data[0] = 10**6
    with pytest.raises(ValueError, match=r"col must lie in \[0, 16\).*col\[0\]=1000000"):
        layer.validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_is_validated(count_validations):
    m = random_matrix(64, 48, 0.2, capacity_extra=4, seed=2, dtype=torch.float32)
    values, idx = m.values.cuda(), [t.cuda() for t in m.index_tensors()]
    x = torch.randn(48, 8, device="cuda")
    y = S.spmm(values, *idx, x)
    S.spmm(values, *idx, x)
    assert len(count_validations) == 1
    assert torch.allclose(y.cpu(), m.to_dense().float() @ x.cpu(), atol=1e-4)
    idx[1][2] = 48
    with pytest.raises(ValueError, match=r"sparsestart.spmm: col must lie in \[0, 48\).*col\[2\]=48"):
        S.spmm(values, *idx, x)


def test_a_copied_or_unpickled_layer_is_validated_again(count_validations):
    # The verdict travels with the tensor's attributes but comes out empty: a copy is checked once.
    import copy
    import pickle

    layer = SparseLinear(32, 16, density=0.3, seed=0)
    x = torch.randn(4, 32)
    _step(layer, x)
    assert count_validations == []
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        before = len(count_validations)
        _step(other, x)
        _step(other, x)
        assert len(count_validations) == before + 1
