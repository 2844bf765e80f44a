"""Erdős–Rényi sampling of sparse structures at a cost that follows nnz.

``er_indices`` draws exactly round(p * R * Q) distinct (block) positions
uniformly at random (or independent Bernoulli(p) per position with
``exact=False``) without ever materialising a dense mask; ``er_csr`` gives the
same structure in compressed row form, which the layers build from. Grids above
2**24 positions are sampled one chunk of rows at a time (per-row counts first),
so the temporaries stay a few MiB next to the sample itself; their stream for a
seed differs from the single-pass sampler that smaller grids keep.

Devices: sampling runs where the generator lives, on the CPU by default
(``generator=None`` uses torch's global CPU RNG). The library samples structures
with CPU generators and moves the k sampled positions to the model's device:
the same seed then gives the same structure on every device (CUDA's Philox
stream differs from the CPU's Mersenne twister), a generator state in a
checkpoint is device-independent, and the cost is one copy of k indices.
A CUDA generator samples on its GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _native
from ..formats.compressed import one_thread

__all__ = ["sample_without_replacement", "er_indices", "check_density"]


def check_density(density, name: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {density!r}")
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {density}")
    return density


def sample_without_replacement(n: int, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k distinct integers from [0, n), uniformly, sorted ascending (int64).

    For k well below n, draw with replacement, keep the distinct values and
    repeat until there are enough; the distinct values of i.i.d. uniform draws
    form a uniformly random subset given their number, so a random k-subset of
    them is uniform too. Memory and time are O(k log k), not O(n).
    """
    if not (0 <= k <= n):
        raise ValueError(f"k must lie in [0, n={n}], got {k}")
    dev = generator.device if generator is not None else torch.device("cpu")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    if 2 * k >= n or n <= 1 << 16:
        return _sorted_subset(torch.arange(n, device=dev), torch.randperm(n, generator=generator, device=dev)[:k])
    chosen = torch.empty(0, dtype=torch.long, device=dev)
    while chosen.numel() < k:
        missing = k - chosen.numel()
        draw = torch.randint(0, n, (int(missing * 1.1) + 16,), generator=generator, device=dev)
        chosen = _distinct(torch.cat([chosen, draw]), n)
    keep = torch.randperm(chosen.numel(), generator=generator, device=dev)[:k]
    return _sorted_subset(chosen, keep)


def _distinct(draws: torch.Tensor, n: int) -> torch.Tensor:
    """The distinct values of ``draws`` (in [0, n)), ascending: ``torch.unique``, or on the CPU, when a
    bitmap of n bits is at most 512 bits per draw, the extension's bitmap pass (no sort; the same result,
    so the random stream is the same on every path)."""
    native = _native.native_op_for("_native_sorted_distinct", draws) if n <= 512 * draws.numel() else None
    return native(draws, n) if native is not None else _native.sorted_distinct(draws, n)


def _sorted_subset(ascending: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """``sort(ascending[picks])`` for distinct ``picks``, by a boolean mask: O(n), no sort of k values."""
    mask = torch.zeros(ascending.numel(), dtype=torch.bool, device=ascending.device)
    mask[picks] = True
    return ascending[mask]


def er_indices(grid: tuple[int, int], density: float, *, exact: bool = True,
               generator: Optional[torch.Generator] = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of an ER structure on an R x Q grid, in row-major order.

    exact=True: exactly round(density * R * Q) positions (at least one when the
    grid is non-empty); exact=False: each position kept independently with
    probability ``density`` (what the papers' code does). Sampled where
    ``generator`` lives (default CPU), returned on ``device`` (default: there too).

    Grids of more than 2**24 positions are sampled row chunk by row chunk (see
    ``er_csr``), with temporaries of O(R + a chunk) instead of several int64 copies
    of the sample; smaller grids keep the original single-pass stream, so their
    structure for a given seed is what it always was.
    """
    density = check_density(density)
    R, Q = grid
    n = R * Q
    if n > _CHUNKED_ABOVE:
        rowptr, col = er_csr(grid, density, exact=exact, generator=generator)
        rows = torch.repeat_interleave(torch.arange(R, device=rowptr.device), rowptr.diff(),
                                       output_size=col.numel())
        cols = col.long()
        del col
        if device is not None:
            rows, cols = rows.to(device), cols.to(device)
        return rows, cols
    if exact:
        k = min(n, max(1 if n else 0, round(density * n)))
        flat = sample_without_replacement(n, k, generator)
    else:
        # Bernoulli(p) per position = a Binomial(n, p) number of distinct uniform positions.
        gdev = generator.device if generator is not None else None
        k = int(torch.binomial(torch.tensor([float(n)], dtype=torch.float64, device=gdev),
                               torch.tensor([density], dtype=torch.float64, device=gdev), generator=generator))
        flat = sample_without_replacement(n, k, generator)
    if device is not None:
        flat = flat.to(device)
    return flat // max(Q, 1), flat % max(Q, 1)


# Grids above this many positions are sampled in row chunks. Below it the single-pass sampler
# above stays: the structures of every layer the trainer and the committed references build
# (4096 x 4096 = 2**24 is the largest default) keep their stream bit for bit.
_CHUNKED_ABOVE = 1 << 24
# About this many sampled positions per chunk. Part of the stream's definition (the chunks
# consume the generator in turn), so changing it changes the structure drawn for a seed.
# Large enough that the per-chunk calls cost little, small enough for a few MiB of temporaries.
_CHUNK = 1 << 18


def er_csr(grid: tuple[int, int], density: float, *, exact: bool = True,
           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The structure of :func:`er_indices` in compressed row form: (rowptr [R + 1] int64,
    col [nnz]) with columns ascending within each row; col is int32 when Q < 2**31.

    The same positions as ``er_indices`` with the same arguments and generator state. On
    grids of more than 2**24 positions it never holds more than O(R) counts and one chunk of
    about 2**18 positions besides ``col``: draw the number of positions of every row first
    (exact: the row counts of a uniform k-subset, a multivariate hypergeometric; Bernoulli:
    Binomial(Q, p) per row), then each chunk of rows its distinct columns, written into ``col``.
    """
    density = check_density(density)
    R, Q = int(grid[0]), int(grid[1])
    n = R * Q
    dev = generator.device if generator is not None else torch.device("cpu")
    cdt = torch.int32 if Q < _INT32_LIMIT else torch.long
    if n <= _CHUNKED_ABOVE:
        rows, cols = er_indices((R, Q), density, exact=exact, generator=generator)
        rowptr = torch.zeros(R + 1, dtype=torch.long, device=dev)
        torch.cumsum(torch.bincount(rows, minlength=R), 0, out=rowptr[1:])
        return rowptr, cols.to(cdt)
    with one_thread():
        return _chunked_csr(R, Q, density, exact, generator, dev, cdt)


def _chunked_csr(R: int, Q: int, density: float, exact: bool, generator, dev, cdt):
    n = R * Q
    if exact:
        k = min(n, max(1, round(density * n)))
        # Sample the smaller side: the complement of a uniform k-subset is a uniform (n-k)-subset.
        counts = (_subset_row_counts(R, Q, k, generator, dev) if 2 * k <= n
                  else Q - _subset_row_counts(R, Q, n - k, generator, dev))
    else:
        counts = _binomial(R, Q, density, generator, dev)
    return _distinct_columns(counts, Q, generator, cdt)


_INT32_LIMIT = 2**31


def _binomial(R: int, Q: int, p: float, generator, dev) -> torch.Tensor:
    """Binomial(Q, p) for each of R rows, int64 (torch's sampler draws them one after another)."""
    return torch.binomial(torch.full((R,), float(Q), dtype=torch.float64, device=dev),
                          torch.full((R,), p, dtype=torch.float64, device=dev), generator=generator).long()


def _subset_row_counts(R: int, Q: int, m: int, generator, dev) -> torch.Tensor:
    """Number of positions in each row of a uniform m-subset of the R x Q grid (m <= R*Q/2):
    the multivariate hypergeometric law, drawn without a hypergeometric sampler.

    Keep each position with a probability q a few standard deviations above m/n, so that the
    total T is at least m (else draw again: conditioning on T >= m keeps the kept set, given
    T, a uniform T-subset); then remove T - m of the T positions, uniformly chosen by their
    rank in row order. A uniform (T-m)-subset removed from a uniform T-subset leaves a
    uniform m-subset, whose row counts are what is returned.
    """
    n = R * Q
    if m == 0:
        return torch.zeros(R, dtype=torch.long, device=dev)
    q = min(1.0, (m + 6.0 * math.sqrt(m * (1.0 - m / n)) + 16.0) / n)
    while True:
        counts = _binomial(R, Q, q, generator, dev)
        total = int(counts.sum())
        if total >= m:
            break
    if total > m:
        drop = sample_without_replacement(total, total - m, generator)
        owner = torch.searchsorted(torch.cumsum(counts, 0), drop, right=True)
        counts -= torch.bincount(owner, minlength=R)
    return counts


def _row_chunks(rowptr: torch.Tensor, target: int) -> list[int]:
    """Row boundaries [0, ..., R] of consecutive row ranges holding about ``target`` entries each
    (a row is never split; empty rows join a neighbour)."""
    R = rowptr.numel() - 1
    if R == 0:
        return [0]
    sizes = torch.unique_consecutive(torch.div(rowptr[:-1], target, rounding_mode="floor"), return_counts=True)[1]
    return [0] + torch.cumsum(sizes, 0).tolist()


def _distinct_columns(counts: torch.Tensor, Q: int, generator, cdt) -> tuple[torch.Tensor, torch.Tensor]:
    """(rowptr, col): for every row r, counts[r] distinct columns of [0, Q) chosen uniformly,
    ascending, independently across rows; a chunk of rows at a time.

    A row with more than Q/2 positions draws the columns it leaves out instead (the complement
    of a uniform subset is uniform), so no row ever fills more than half its columns by
    drawing, and the rounds of redrawing duplicates (``_distinct_keys``) stay few.
    """
    R = counts.numel()
    dev = counts.device
    rowptr = torch.zeros(R + 1, dtype=torch.long, device=dev)
    torch.cumsum(counts, 0, out=rowptr[1:])
    nnz = int(rowptr[-1])
    col = torch.empty(nnz, dtype=cdt, device=dev)
    if nnz == 0:
        return rowptr, col
    flip = 2 * counts > Q
    draws = torch.where(flip, Q - counts, counts)
    bounds = _row_chunks(rowptr, _CHUNK)
    starts = rowptr[bounds].tolist()
    widest = max(b - a for a, b in zip(bounds, bounds[1:]))
    # Keys local row * Q + column; int32 when they fit (a faster sort, the same values).
    base = torch.arange(widest, device=dev, dtype=torch.int32 if widest * Q < _INT32_LIMIT else torch.long) * Q
    for i in range(len(bounds) - 1):
        r0, r1 = bounds[i], bounds[i + 1]
        keys = _distinct_keys(base[:r1 - r0], draws[r0:r1], Q, generator)  # local row * Q + column, ascending
        f = flip[r0:r1]
        if bool(f.any()):
            keys = _complement_rows(keys, f, Q)
        col[starts[i]:starts[i + 1]] = keys % Q
    return rowptr, col


def _distinct_keys(base: torch.Tensor, draws: torch.Tensor, Q: int, generator) -> torch.Tensor:
    """Sorted keys base[r] + c holding draws[r] distinct uniform columns c of [0, Q) for each
    local row r (base[r] = r * Q, of the keys' dtype).

    Draw every row's columns with replacement, keep the distinct ones, and draw again, for
    each row, as many columns as it still misses, until none misses any. The procedure treats
    all columns alike (its law is invariant under relabelling the columns of a row) and stops
    with exactly draws[r] columns, so each row's set is a uniform draws[r]-subset; the rows'
    draws are disjoint parts of one i.i.d. stream, so the rows are independent.
    """
    dev, kdt = draws.device, base.dtype
    total = int(draws.sum())
    keys = torch.repeat_interleave(base, draws, output_size=total)
    keys += torch.randint(0, Q, (total,), generator=generator, device=dev, dtype=kdt)
    keys, counts = torch.unique_consecutive(keys.sort().values, return_counts=True)
    if keys.numel() == total:
        return keys
    redo = torch.repeat_interleave(keys, counts - 1, output_size=total - keys.numel())
    del counts
    # Each repeated key is one missing column of its row. The later rounds are small: their
    # distinct new keys gather in ``extra`` (sorted), merged into ``keys`` once at the end.
    extra = keys[:0]
    while redo.numel():
        new = redo - redo % Q
        new += torch.randint(0, Q, (new.numel(),), generator=generator, device=dev, dtype=kdt)
        new = new.sort().values
        seen = _in_sorted(keys, new) | _in_sorted(extra, new)
        seen[1:] |= new[1:] == new[:-1]
        redo = new[seen]
        extra = torch.cat([extra, new[~seen]]).sort().values
    return _insert_sorted(keys, extra)


def _in_sorted(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Which of ``v`` occur in the sorted ``a``."""
    if a.numel() == 0:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    at = torch.searchsorted(a, v).clamp_(max=a.numel() - 1)
    return a[at] == v


def _insert_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sorted union of the disjoint sorted ``a`` and ``b``, without a sort: b's places
    by a binary search each, a's by filling the rest in order."""
    if b.numel() == 0:
        return a
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    pos = torch.searchsorted(a, b) + torch.arange(b.numel(), device=a.device)
    from_a = torch.ones(out.numel(), dtype=torch.bool, device=a.device)
    from_a[pos] = False
    out[pos] = b
    return out.masked_scatter_(from_a, a)


def _complement_rows(keys: torch.Tensor, flipped: torch.Tensor, Q: int) -> torch.Tensor:
    """``keys`` with the columns of every flipped row replaced by the columns they leave out."""
    local = torch.div(keys, Q, rounding_mode="floor")
    is_f = flipped[local]
    plain, left_out = keys[~is_f], keys[is_f]
    frows = flipped.nonzero().flatten()
    rank = torch.cumsum(flipped, 0) - 1  # index of each flipped row among the flipped rows
    # One bool row per flipped row: it keeps at least Q/2 columns, so this is at most twice its output.
    keep = torch.ones(frows.numel(), Q, dtype=torch.bool, device=keys.device)
    keep[rank[local[is_f]], left_out % Q] = False
    fi, c = keep.nonzero(as_tuple=True)
    kept = (frows[fi] * Q + c).to(keys.dtype)
    return _insert_sorted(plain, kept) if plain.numel() else kept
