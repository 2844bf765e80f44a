"""Structure updates of a compressed matrix: drop entries and add new ones in place, rewriting the
index once (``SparseMatrix.drop``/``grow``/``replace`` call :func:`replace`).

The kept entries are already in CSR and CSC order, so both views are merged with the sorted new
entries rather than re-sorted (a structure update of RigL/SET must stay a small fraction of the
training time between updates). The merge is the native op on the CPU and its PyTorch twin
(``sparsestart._native.merge_index``, same result bit for bit) on any other device or without the
extension. Existing values stay in their slots; freed and newly used slots are zeroed.
"""
from __future__ import annotations

import torch

from .. import _native


@torch.no_grad()
def replace(matrix, positions, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the entries of ``matrix`` (a SparseMatrix) at CSR ``positions`` and add (rows, cols); returns
    (freed slots, used slots). See :meth:`sparsestart.formats.SparseMatrix.replace`."""
    dev = matrix.rowptr.device
    nnz = matrix.nnz
    positions = torch.as_tensor(positions, device=dev).long().flatten()
    rows = torch.as_tensor(rows, device=dev).long().flatten()
    cols = torch.as_tensor(cols, device=dev).long().flatten()
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have equal length, got {rows.numel()} and {cols.numel()}")
    if positions.numel():
        lo, hi = torch.stack([positions.min(), positions.max()]).tolist()  # one host synchronisation
        if lo < 0 or hi >= nnz:
            raise ValueError(f"positions must lie in [0, nnz={nnz}), got range [{lo}, {hi}]")
    keep = torch.ones(nnz, dtype=torch.bool, device=dev).index_fill_(0, positions, False)
    n_keep = int(keep.sum())
    if n_keep != nnz - positions.numel():
        twice = _first_repeat(positions.sort().values)
        raise ValueError(f"positions contain duplicates: {twice} is given more than once; each position may be "
                         f"dropped once")
    R, Q = matrix.grid
    _check_range(rows, cols, R, Q, "rows", "cols")
    k = rows.numel()
    # New entries sorted in CSR order; duplicates are then neighbours. Callers usually pass them
    # ascending already (RigL/SET grow sorted keys): then one comparison pass replaces the sort.
    stride = max(Q, 1)
    new_keys = rows * stride + cols
    if k < 2 or bool((new_keys[1:] > new_keys[:-1]).all()):
        by_key = None  # already in CSR order
    else:
        new_keys, by_key = torch.sort(new_keys)
        _check_distinct(new_keys, stride, "rows", "cols")
    if n_keep + k > matrix.capacity:
        erows, ecols, _ = matrix.coo()
        _check_absent(erows * stride + ecols, keep, new_keys,  # the more useful error first
                      torch.arange(k, device=dev) if by_key is None else by_key, rows, cols)
        raise ValueError(
            f"growing {k} entries needs capacity {n_keep + k} but the structure has capacity "
            f"{matrix.capacity}; build it with a larger capacity"
        )
    freed = matrix.slot[:nnz].masked_select(keep.logical_not()).long()
    # Free slots after the drop: the current tail, then the slots just freed.
    free = torch.cat([matrix.slot[nnz:].long(), freed])
    new_slots = free[:k].clone()  # in the order of the given coordinates
    dropped = torch.zeros(matrix.capacity, dtype=torch.bool, device=dev).index_fill_(0, freed, True)
    # CSC entries that stay (index_select takes the int32 slots as they are).
    ckeep = dropped.index_select(0, matrix.slot_t[:nnz]).logical_not_()
    total = n_keep + k
    csr_new = (rows, cols, new_slots) if by_key is None else tuple(t.index_select(0, by_key)
                                                                    for t in (rows, cols, new_slots))
    # CSC order of the new entries: (col, row). They are in CSR order, so rows ascend within each
    # column and a stable sort by column alone gives it; in the narrowest integer type that holds
    # the columns (a 16-bit sort is ~3x faster than a 64-bit one of the (col, row) keys).
    cby_key = torch.sort(csr_new[1].to(_narrow_int(Q)), stable=True).indices
    csc_new = tuple(csr_new[i].index_select(0, cby_key) for i in (1, 0, 2))
    merge = _native_merge() if dev.type == "cpu" else None
    if merge is not None:
        # One native merge pass per view (it also rejects a new entry equal to a kept one).
        csr = merge(matrix.rowptr, matrix.col, matrix.slot, keep, *csr_new, total)
        csc = merge(matrix.colptr, matrix.row, matrix.slot_t, ckeep, *csc_new, total)
    else:
        # The same merge in PyTorch, on the index's own device (the native op is CPU-only).
        csr = _native.merge_index(matrix.rowptr, matrix.col, matrix.slot, keep, *csr_new, total, Q)
        csc = _native.merge_index(matrix.colptr, matrix.row, matrix.slot_t, ckeep, *csc_new, total, R, check=False)
    tail = matrix.capacity - nnz
    matrix._store(csr, csc, free[k:])
    matrix.values.data.index_fill_(0, touched_slots(freed, new_slots, tail), 0)
    return freed, new_slots


@torch.no_grad()
def rewire(matrix, positions, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the entries of ``matrix`` at CSR ``positions`` and grow the entries with keys row * Q + col in
    ``keys`` (both int64, ascending, distinct), where a grown key of a dropped entry keeps that entry as it
    is; returns (freed slots, new slots). See :meth:`sparsestart.formats.SparseMatrix.rewire`."""
    dev = matrix.rowptr.device
    positions = torch.as_tensor(positions, device=dev).long().flatten()
    keys = torch.as_tensor(keys, device=dev).long().flatten()
    tail = matrix.capacity - matrix.nnz
    native = _native.native_op_for("_native_rewire", matrix.rowptr, positions, keys)
    if native is not None:
        # One native op: the index rewritten in three passes over it, checks included (it raises
        # before anything changes: its results are fresh tensors).
        *index, free_tail, freed, new_slots = native(*matrix.index_tensors(), positions, keys)
        matrix._store(tuple(index[:3]), tuple(index[3:6]), free_tail)
        matrix.values.data.index_fill_(0, touched_slots(freed, new_slots, tail), 0)
        return freed, new_slots
    # The same in PyTorch (off the CPU, or without the extension): same checks, same result bit for bit.
    R, Q = matrix.grid
    _check_ascending_in(positions, 0, matrix.nnz, "drop positions")
    _check_ascending_in(keys, 0, R * Q, "grow keys")
    dropped_keys = matrix.keys_at(positions)
    regrown = _native.sorted_isin(keys, dropped_keys)
    really_dropped = positions.masked_select(_native.sorted_isin(dropped_keys, keys).logical_not_())
    new_keys = keys.masked_select(regrown.logical_not_())
    return replace(matrix, really_dropped, new_keys // max(Q, 1), new_keys % max(Q, 1))


def touched_slots(freed: torch.Tensor, new_slots: torch.Tensor, tail: int) -> torch.Tensor:
    """The slots a structure update voids, each once: the freed ones and the new ones that came from the
    free tail of ``tail`` slots before the update (new slots are taken from that tail first, then from
    the freed ones)."""
    return torch.cat([freed, new_slots[:tail]])


def _check_ascending_in(values: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Raise unless ``values`` is strictly ascending within [lo, hi) (the native op's checks and messages)."""
    n = values.numel()
    if n == 0:
        return
    step = values[1:] - values[:-1]
    first, last, worst = torch.stack([values[0], values[-1], step.min() if n > 1 else values.new_ones(())]).tolist()
    if worst <= 0:
        i = int((step <= 0).nonzero()[0]) + 1
        raise ValueError(f"sparsestart.rewire: {what} must be ascending and distinct, but {int(values[i - 1])} at "
                         f"index {i - 1} is followed by {int(values[i])}")
    if first < lo or last >= hi:
        raise ValueError(f"sparsestart.rewire: {what} must lie in [{lo}, {hi}), got range [{first}, {last}]")


def _check_absent(keys, keep, new_keys, by_key, rows, cols) -> None:
    """Raise if a new key (sorted ``new_keys``; ``by_key`` maps back to rows/cols) equals a kept one of
    the sorted ``keys``: a binary search each."""
    nnz = keys.numel()
    at = torch.searchsorted(keys, new_keys).clamp(max=max(nnz - 1, 0))
    present = (keys[at] == new_keys) & keep[at] if nnz else torch.zeros_like(new_keys, dtype=torch.bool)
    if bool(present.any()):
        i = int(by_key[present.nonzero()[0]])
        raise ValueError(f"entry ({int(rows[i])}, {int(cols[i])}) is already stored; grow only adds new entries")


def _native_merge():
    """torch.ops.sparsestart._native_merge_index when the C++ extension is loaded, else None."""
    return _native.native_op("_native_merge_index")


def _narrow_int(n: int) -> torch.dtype:
    """The narrowest signed integer dtype that holds 0 .. n - 1."""
    return torch.int16 if n <= 1 << 15 else torch.int32 if n <= 1 << 31 else torch.int64


def _check_range(rows, cols, R, Q, rname, cname):
    if rows.numel() == 0:
        return
    rlo, rhi, clo, chi = torch.stack([t.long() for t in (rows.min(), rows.max(), cols.min(), cols.max())]).tolist()
    if rlo < 0 or rhi >= R:
        raise ValueError(f"{rname} must lie in [0, {R}), got range [{rlo}, {rhi}]")
    if clo < 0 or chi >= Q:
        raise ValueError(f"{cname} must lie in [0, {Q}), got range [{clo}, {chi}]")


def _first_repeat(sorted_values: torch.Tensor):
    """The smallest value that occurs more than once in the ascending ``sorted_values``, or None."""
    repeats = sorted_values[1:][sorted_values[1:] == sorted_values[:-1]]
    return int(repeats[0]) if repeats.numel() else None


def _check_distinct(sorted_keys, stride: int, rname: str, cname: str) -> None:
    """Raise naming a coordinate pair that occurs twice among the ascending keys row * stride + col."""
    key = _first_repeat(sorted_keys)
    if key is not None:
        raise ValueError(f"({rname}, {cname}) contain duplicated coordinates: ({key // stride}, {key % stride}) is "
                         f"given more than once; each coordinate may be given once")
