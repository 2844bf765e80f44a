"""Validation of raw index tensors (rowptr, col, slot, colptr, row, slot_t) of a compressed structure.

One validator for every place an index enters: :meth:`SparseMatrix.validate` and the real
implementations of the public ops (sparsestart/ops/library.py, which caches the verdict per
structure version). The native kernels trust the index (they read ``x[col]`` and
``values[slot]`` unchecked), so everything they rely on is checked here:

    rowptr[0] == 0, rowptr non-decreasing, nnz = rowptr[-1] <= C; the same for colptr, colptr[-1] == nnz
    slot and slot_t are permutations of 0..C-1
    col[:nnz] in [0, Q), strictly increasing within each row; row[:nnz] in [0, R), the same per column
    the CSC view holds the same (row, col, slot) triples as the CSR index

The data checks run as tensor operations on the index's own device and are read back with a
single host synchronisation; only when one fails are the tensors walked again for a message
naming the tensor, the position, the bad value and what is allowed. Cost O(C + R + Q)
(counting passes, no sort or search).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["INDEX_NAMES", "validate_index", "known_valid", "remember_valid"]

INDEX_NAMES = ("rowptr", "col", "slot", "colptr", "row", "slot_t")


def validate_index(index: Sequence[Tensor], grid: Optional[tuple[int, int]] = None, capacity: Optional[int] = None,
                   *, device: Optional[torch.device] = None, where: str = "") -> None:
    """Raise ValueError unless ``index`` = (rowptr, col, slot, colptr, row, slot_t) is a valid index.

    ``grid`` = (R, Q) (block) rows and columns and ``capacity`` = C default to what the tensors'
    lengths say (R = rowptr.numel() - 1, Q = colptr.numel() - 1, C = col.numel()); ``device``
    (default: rowptr's) is where every tensor must live. ``where`` prefixes every message (an op's
    name, say).
    """
    if len(index) != len(INDEX_NAMES):
        raise ValueError(f"{where}an index is {len(INDEX_NAMES)} tensors {INDEX_NAMES}, got {len(index)}")
    rowptr, col, slot, colptr, row, slot_t = index
    idt = rowptr.dtype
    device = rowptr.device if device is None else device
    for name, t in zip(INDEX_NAMES, index):
        if t.dtype not in (torch.int32, torch.int64) or t.dtype != idt:
            raise ValueError(f"{where}{name} has dtype {t.dtype}; all index tensors must share int32 or int64")
        if t.dim() != 1:
            raise ValueError(f"{where}{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{where}{name} is on {t.device} but values on {device}: the whole structure must "
                             f"share one device")
    R, Q = (rowptr.numel() - 1, colptr.numel() - 1) if grid is None else grid
    if R < 0 or Q < 0:
        raise ValueError(f"{where}rowptr and colptr need at least one entry each, got {rowptr.numel()} and "
                         f"{colptr.numel()}")
    C = col.numel() if capacity is None else capacity
    want = {"rowptr": R + 1, "colptr": Q + 1, "col": C, "slot": C, "row": C, "slot_t": C}
    for name, t in zip(INDEX_NAMES, index):
        if t.numel() != want[name]:
            raise ValueError(f"{where}{name} has {t.numel()} entries, expected {want[name]}")
    oks = torch.stack(_content_oks(rowptr, col, slot, colptr, row, slot_t, R, Q, C)).tolist()  # one host sync
    for good, explain in zip(oks, _EXPLAIN):
        if not good:
            raise ValueError(where + explain(rowptr, col, slot, colptr, row, slot_t, R, Q, C))



# The verdict of a validation, cached on rowptr per structure version (see sparsestart/ops/library.py).
_VERDICT = "_sparsestart_index_ok"


def _verdict_key(index: Sequence[Tensor], capacity: int) -> Optional[tuple]:
    """The version counters and data pointers of the six index tensors, or None when a tensor has
    no version counter (inference tensors) or no storage: then nothing is cached."""
    try:
        return (capacity, *(t._version for t in index), *(t.data_ptr() for t in index))
    except RuntimeError:
        return None


class _Verdict:
    """The cached verdict: the key it was given for and weak references to the other five tensors
    (they tell a tensor freed and reallocated at the same address apart). A copy or an unpickled
    one (``copy.deepcopy``, ``pickle`` of a layer carry the tensor's attributes along) is empty,
    so a copied index is validated again; weak references could not be pickled anyway."""

    __slots__ = ("key", "refs")

    def __init__(self, key=None, refs=()):
        self.key, self.refs = key, refs

    def __reduce__(self):
        return (_Verdict, ())


def known_valid(index: Sequence[Tensor], capacity: int) -> bool:
    """Whether ``index`` was validated (or written valid by the format) and not written since."""
    key = _verdict_key(index, capacity)
    cached = getattr(index[0], _VERDICT, None) if key is not None else None
    return (isinstance(cached, _Verdict) and cached.key is not None and cached.key == key
            and all(r() is t for r, t in zip(cached.refs, index[1:])))


def remember_valid(index: Sequence[Tensor], capacity: int) -> None:
    """Record that ``index`` is valid for ``capacity`` value slots at its tensors' current versions.

    Called after :func:`validate_index` passed, and by the format's own index writers
    (:meth:`SparseMatrix.replace` and the builders), whose output is valid by construction; any
    later write through the tensors bumps a version counter and voids the record."""
    key = _verdict_key(index, capacity)
    if key is not None:
        setattr(index[0], _VERDICT, _Verdict(key, tuple(weakref.ref(t) for t in index[1:])))

# The checks, in the order a message reports them. Each is a 0-d bool tensor computed without host
# synchronisation. A later check may compute garbage when an earlier one fails (a row number from a
# decreasing rowptr, say): harmless, because only the first failing check is reported, and every
# gather and scatter clamps its indices so garbage never reads or writes out of bounds. Only the
# error path walks the tensors again (the explanations below), so no intermediate outlives its check.
def _content_oks(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> list[Tensor]:
    # Fresh multi-MB buffers cost page faults on the CPU (no caching allocator): the large temporaries
    # are few, updated in place, and bool where a flag suffices.
    dead = ~_live(rowptr, C)
    oks = [_pointer_ok(rowptr, C), _pointer_ok(colptr, C), colptr[-1] == rowptr[-1],
           _permutation_ok(slot, C), _permutation_ok(slot_t, C)]
    stride = max(Q, 1)
    # Same entries in both views: the CSR key (row * Q + col) of the entry held in each slot, or -1 for
    # a free slot, must be the same through slot as through slot_t. Both are permutations (checked
    # above), so this also makes the free tails of slot and slot_t the same set.
    rows = _majors(rowptr, C, R)
    oks += [_in_range(col, dead, Q).all(), _increasing(rows, col, dead).all()]
    csr_at = _by_slot(slot, rows.mul_(stride).add_(col).masked_fill_(dead, -1), C)
    del rows
    ccols = _majors(colptr, C, Q)
    oks += [_in_range(row, dead, R).all(), _increasing(ccols, row, dead).all()]
    csc_at = _by_slot(slot_t, ccols.add_(row, alpha=stride).masked_fill_(dead, -1), C)
    del ccols
    oks.append((csr_at == csc_at).all())
    return oks


def _live(ptr: Tensor, C: int) -> Tensor:
    return torch.arange(C, device=ptr.device, dtype=ptr.dtype) < ptr[-1]


def _majors(ptr: Tensor, C: int, n: int) -> Tensor:
    """The (block) row of each of the C positions for rowptr (column for colptr), as int64, clamped to
    [0, n): the number of rows r >= 1 starting at or before the position. For a valid pointer array
    this is searchsorted(ptr, position, right=True) - 1, in O(C + n) instead of O(C log n)."""
    starts = ptr[1:-1].clamp(0, C).long()
    # A counting scatter, not bincount: on CUDA bincount reads the maximum back to size its output
    # (a host synchronisation); accumulating index_put_ is deterministic there too.
    counts = torch.zeros(C + 1, dtype=torch.long, device=ptr.device)
    counts.index_put_((starts,), torch.ones_like(starts), accumulate=True)
    return counts[:C].cumsum_(0).clamp_(0, max(n - 1, 0))


def _pointer_ok(ptr: Tensor, C: int) -> Tensor:
    return (ptr[0] == 0) & (ptr[1:] >= ptr[:-1]).all() & (ptr[-1] <= C)


def _permutation_ok(s: Tensor, C: int) -> Tensor:
    """C values, all in [0, C), covering every one of them: a permutation."""
    inside = ((s >= 0) & (s < C)).all()
    seen = torch.zeros(C, dtype=torch.bool, device=s.device).index_fill_(0, s.clamp(0, max(C - 1, 0)).long(), True)
    return inside & seen.all()


def _in_range(idx: Tensor, dead: Tensor, n: int) -> Tensor:
    """Per position: False where a live entry is outside [0, n)."""
    return dead | ((idx >= 0) & (idx < n))


def _increasing(majors: Tensor, minors: Tensor, dead: Tensor) -> Tensor:
    """Per pair of neighbouring positions: False where both are live and (major, minor) does not increase
    (majors never decrease here: they count row starts)."""
    return dead[1:] | (majors[1:] > majors[:-1]) | (minors[1:] > minors[:-1])


def _by_slot(slots: Tensor, keys: Tensor, C: int) -> Tensor:
    at = slots.clamp(0, max(C - 1, 0)).long()
    return torch.full((C,), -1, dtype=torch.long, device=keys.device).scatter_(0, at, keys)


# ------------------------------------------------------------------ messages (error path only)
def _explain_pointer(name: str, what: str):
    def explain(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
        ptr = rowptr if name == "rowptr" else colptr
        if int(ptr[0]) != 0:
            return f"{name} must start at 0 and be non-decreasing, got {name}[0]={int(ptr[0])}"
        down = (ptr[1:] < ptr[:-1]).nonzero()
        if down.numel():
            i = int(down[0])
            return (f"{name} must start at 0 and be non-decreasing, got {name}[{i}]={int(ptr[i])} > "
                    f"{name}[{i + 1}]={int(ptr[i + 1])} ({what} {i} would have a negative length)")
        return f"{name}[-1]={int(ptr[-1])} live entries exceed the capacity {C}: nnz must be <= capacity"

    return explain


def _explain_counts(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
    return (f"rowptr counts {int(rowptr[-1])} entries but colptr {int(colptr[-1])}: colptr[-1] must equal "
            f"rowptr[-1] (both views hold the same entries)")


def _explain_permutation(name: str):
    def explain(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
        s = (slot if name == "slot" else slot_t).long()
        allowed = f"{name} must be a permutation of 0..{C - 1} (live slots then free slots)"
        out = ((s < 0) | (s >= C)).nonzero()
        if out.numel():
            p = int(out[0])
            return f"{allowed}, got {name}[{p}]={int(s[p])} outside [0, {C})"
        order = torch.sort(s, stable=True).indices
        i = int((s[order[1:]] == s[order[:-1]]).nonzero()[0])
        first, second = int(order[i]), int(order[i + 1])
        return f"{allowed}, got {name}[{first}] = {name}[{second}] = {int(s[first])}"

    return explain


def _explain_range(name: str):
    def explain(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
        idx, n, what = (col, Q, "columns") if name == "col" else (row, R, "rows")
        p = int((~_in_range(idx, ~_live(rowptr, C), n)).nonzero()[0])
        return (f"{name} must lie in [0, {n}) (the weight's {what}) at the {int(rowptr[-1])} live positions, "
                f"got {name}[{p}]={int(idx[p])}")

    return explain


def _explain_order(name: str, major: str):
    def explain(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
        ptr, minors, n = (rowptr, col, R) if name == "col" else (colptr, row, Q)
        majors = _majors(ptr, C, n)
        p = int((~_increasing(majors, minors, ~_live(rowptr, C))).nonzero()[0])
        return (f"{name} must be strictly increasing within each {major} (sorted, no duplicates), got "
                f"{name}[{p}]={int(minors[p])} then {name}[{p + 1}]={int(minors[p + 1])} in {major} {int(majors[p])} "
                f"(or {'rowptr' if name == 'col' else 'colptr'} puts a {major} boundary in the wrong place)")

    return explain


def _explain_views(rowptr, col, slot, colptr, row, slot_t, R, Q, C) -> str:
    live, stride = _live(rowptr, C), max(Q, 1)
    csr_at = _by_slot(slot, torch.where(live, _majors(rowptr, C, R) * stride + col.long(), -1), C)
    csc_at = _by_slot(slot_t, torch.where(live, row.long() * stride + _majors(colptr, C, Q), -1), C)
    s = int((csr_at != csc_at).nonzero()[0])

    def entry(key: int) -> str:
        return "no entry (free)" if key < 0 else f"entry ({key // stride}, {key % stride})"

    return (f"the CSC view (colptr, row, slot_t) does not describe the same entries as the CSR index: slot {s} "
            f"holds {entry(int(csr_at[s]))} through (rowptr, col, slot) but {entry(int(csc_at[s]))} through "
            f"(colptr, row, slot_t)")


_EXPLAIN = (_explain_pointer("rowptr", "row"), _explain_pointer("colptr", "column"), _explain_counts,
            _explain_permutation("slot"), _explain_permutation("slot_t"), _explain_range("col"),
            _explain_order("col", "row"), _explain_range("row"), _explain_order("row", "column"), _explain_views)
