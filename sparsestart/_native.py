"""Native helper ops of the C++ extension, and their pure-PyTorch twins for every other device.

The selection and structure helpers (``_native_merge_index``, ``_native_absent_at_least``,
``_native_sorted_isin``, ``_native_sorted_distinct``, ``_native_absent_at_ranks``,
``_native_kept_keys``) are registered for the CPU only: a CUDA tensor handed to them
would make the dispatcher raise. Callers therefore ask :func:`native_op_for` with the
tensors they are about to pass: it gives the native op only when all of them live on
the CPU (and the extension is loaded), and None otherwise; the caller then runs the
twin defined here (:func:`merge_index`, :func:`absent_at_least`, :func:`sorted_isin`, ...),
which takes the same arguments, returns the same tensors (same values, dtypes and
order, bit for bit) and works on any device without a host round trip of the data.
Tests run both paths by patching :func:`native_op`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["native_op", "native_op_for", "merge_index", "absent_at_least", "sorted_isin", "sorted_distinct",
           "absent_at_ranks", "kept_keys"]


def native_op(name: str) -> Optional[Callable]:
    """``torch.ops.sparsestart.<name>`` when the C++ extension registered it, else None."""
    try:
        return getattr(torch.ops.sparsestart, name)
    except (AttributeError, RuntimeError):
        return None


def native_op_for(name: str, *tensors: torch.Tensor) -> Optional[Callable]:
    """The CPU-only native op ``name`` when every one of ``tensors`` is on the CPU, else None
    (then use the pure-PyTorch twin of this module)."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return native_op(name)


# ------------------------------------------------------------------ pure-PyTorch twins
def sorted_isin(values: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """Twin of ``_native_sorted_isin``: bool [values.numel()], whether each value is in the ascending
    ``sorted_set`` (one binary search each; ``values`` need not be sorted here)."""
    values = values.reshape(-1)
    m = sorted_set.numel()
    if m == 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    at = torch.searchsorted(sorted_set, values).clamp_(max=m - 1)
    return sorted_set[at] == values


def sorted_distinct(values: torch.Tensor, n: int) -> torch.Tensor:
    """Twin of ``_native_sorted_distinct``: the distinct values of int64 ``values`` (all in [0, n)),
    ascending, as ``torch.unique`` gives them."""
    return torch.unique(values.reshape(-1))


def absent_at_ranks(present: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Twin of ``_native_absent_at_ranks``: the ranks[i]-th (from 0) non-negative integer absent from
    the ascending, distinct int64 ``present``, for ascending ``ranks``. With s_j the present keys,
    s_j - j absent keys lie below s_j, so the r-th absent key is r + #{j : s_j - j <= r}."""
    below = present - torch.arange(present.numel(), device=present.device)
    return ranks + torch.searchsorted(below, ranks, right=True)


def absent_at_least(scores: torch.Tensor, present: torch.Tensor, base: int,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``_native_absent_at_least``: (ascending int64 i with |scores[i]| >= threshold and
    base + i not in the ascending ``present``, |scores[i]| there).

    The threshold is compared in the dtype of ``scores`` (a Python scalar is cast to it, as the
    native op casts it to scalar_t).
    """
    scores = scores.reshape(-1)
    idx = (scores.abs() >= threshold).nonzero().flatten()
    if present.numel():
        idx = idx[~sorted_isin(idx + base, present)]
    return idx, scores.index_select(0, idx).abs_()


def kept_keys(ptr: torch.Tensor, idx: torch.Tensor, keep: Optional[torch.Tensor], minor_extent: int) -> torch.Tensor:
    """Twin of ``_native_kept_keys``: int64 keys major * minor_extent + minor of the view's entries in
    index order, only where ``keep`` is true when it is given."""
    nnz = int(ptr[-1])
    counts = (ptr[1:] - ptr[:-1]).long()
    major = torch.repeat_interleave(torch.arange(counts.numel(), device=ptr.device), counts, output_size=nnz)
    keys = major.mul_(minor_extent).add_(idx[:nnz])
    return keys if keep is None else keys.masked_select(keep)


def merge_index(ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, keep: torch.Tensor,
                new_major: torch.Tensor, new_minor: torch.Tensor, new_slot: torch.Tensor, total: int,
                minor_extent: int, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of ``_native_merge_index``: (ptr', idx', slot') of the kept entries of one compressed view
    merged with the new entries (int64, sorted by (major, minor)), every major's entries by minor.

    ``minor_extent`` (columns of a CSR view, rows of a CSC view) bounds the minor index; the merge is
    by the key major * minor_extent + minor: binary searches for the new entries and O(nnz + k)
    passes, no sort. With ``check``, new entries that are unsorted, duplicated, out of range or equal
    to a kept entry raise ValueError as the native op does (the caller then changes nothing).
    """
    R = ptr.numel() - 1
    nnz = keep.numel()
    dev = ptr.device
    stride = max(int(minor_extent), 1)
    counts = (ptr[1:] - ptr[:-1]).long()
    major = torch.repeat_interleave(torch.arange(R, device=dev), counts, output_size=nnz)
    kmajor, kminor, kslot = major[keep], idx[:nnz][keep], slot[:nnz][keep]
    kkeys = kmajor * stride + kminor.long()
    nkeys = new_major * stride + new_minor
    n, k = kkeys.numel(), nkeys.numel()
    if n + k != total:
        raise ValueError(f"sparsestart.merge_index: merging {n} kept and {k} new entries, expected total={total}")
    at = torch.searchsorted(kkeys, nkeys)
    if check and k:
        # One host synchronisation for all checks.
        bad_order = (nkeys[1:] <= nkeys[:-1]).any() if k > 1 else torch.zeros((), dtype=torch.bool, device=dev)
        bad_range = (new_major < 0).any() | (new_major >= R).any()
        hit = (kkeys[at.clamp(max=max(n - 1, 0))] == nkeys) if n else torch.zeros_like(nkeys, dtype=torch.bool)
        flags = torch.stack([bad_order, bad_range, hit.any()]).tolist()
        if flags[0]:
            raise ValueError("sparsestart.merge_index: new entries are not sorted or contain duplicates")
        if flags[1]:
            raise ValueError(f"sparsestart.merge_index: new entries have major indices outside [0, {R})")
        if flags[2]:
            j = int(hit.nonzero()[0])
            raise ValueError(f"entry ({int(new_major[j])}, {int(new_minor[j])}) is already stored; grow only adds "
                             f"new entries")
    # Output position of every new entry: the kept entries before it plus the new ones before it.
    pos_new = at + torch.arange(k, device=dev)
    from_new = torch.zeros(n + k, dtype=torch.bool, device=dev)
    from_new[pos_new] = True
    pos_kept = (~from_new).nonzero().flatten()
    omajor = torch.empty(n + k, dtype=torch.long, device=dev)
    omajor[pos_kept] = kmajor
    omajor[pos_new] = new_major
    oidx = torch.empty(n + k, dtype=idx.dtype, device=dev)
    oidx[pos_kept] = kminor
    oidx[pos_new] = new_minor.to(idx.dtype)
    oslot = torch.empty(n + k, dtype=slot.dtype, device=dev)
    oslot[pos_kept] = kslot
    oslot[pos_new] = new_slot.to(slot.dtype)
    optr = torch.zeros(R + 1, dtype=ptr.dtype, device=dev)
    optr[1:] = torch.cumsum(torch.bincount(omajor, minlength=R), 0)
    return optr, oidx, oslot
