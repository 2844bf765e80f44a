"""The CSC view of a CSR structure, built by a chunked counting sort (construction and rewrites of
:class:`sparsestart.formats.SparseMatrix`)."""
from __future__ import annotations

import torch

__all__ = ["csc_of_csr"]

# Entries per chunk of the CSC counting sort (the result does not depend on it): large enough
# that each column's entries of a chunk land as a run in the CSC arrays rather than one scattered
# write per entry, small enough that its temporaries (~25 bytes an entry) stay a few MiB.
_CSC_CHUNK = 1 << 17


def csc_of_csr(rowptr: torch.Tensor, col: torch.Tensor, Q: int, C: int,
                idt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(colptr [Q + 1], row [C], slot_t [C]) of the CSC view of the CSR entries (rowptr, col),
    whose slots are their CSR positions; the tails (past nnz) are 0 and the free slots
    nnz..C-1 ascending.

    A counting sort: colptr from the column counts, then chunks of rows in order, each entry
    going to the next free position of its column, so rows stay ascending within a column
    (the order a stable sort by column gives). Temporaries: O(Q) and one chunk, instead of
    the int64 permutation of a whole-array argsort.
    """
    dev = col.device
    nnz = col.numel()
    R = rowptr.numel() - 1
    colptr = torch.zeros(Q + 1, dtype=torch.long, device=dev)
    torch.cumsum(torch.bincount(col, minlength=Q), 0, out=colptr[1:])
    row = torch.zeros(C, dtype=idt, device=dev)
    slot_t = torch.empty(C, dtype=idt, device=dev)
    slot_t[nnz:] = torch.arange(nnz, C, dtype=idt, device=dev)
    nxt = colptr[:-1].clone()  # next free CSC position of each column
    rowptr = rowptr.long()
    sizes = torch.unique_consecutive(torch.div(rowptr[:-1], _CSC_CHUNK, rounding_mode="floor"),
                                     return_counts=True)[1] if R else rowptr[:0]
    bounds = [0] + torch.cumsum(sizes, 0).tolist()
    offsets = rowptr[bounds].tolist()
    for i in range(len(bounds) - 1):
        r0, r1, e0, e1 = bounds[i], bounds[i + 1], offsets[i], offsets[i + 1]
        n = e1 - e0
        if n == 0:
            continue
        # The chunk by column, CSR order (rows ascending) kept among equal columns.
        cs, order = torch.sort(col[e0:e1], stable=True)
        cols_here, per_col = torch.unique_consecutive(cs, return_counts=True)
        del cs
        cols_here = cols_here.long()
        # Column j's run of the sorted chunk starts at chunk position start[j] and goes to CSC
        # positions nxt[j], nxt[j] + 1, ...
        start = torch.cumsum(per_col, 0) - per_col
        pos = torch.repeat_interleave(nxt.index_select(0, cols_here) - start, per_col, output_size=n)
        pos += torch.arange(n, device=dev)
        nxt.index_add_(0, cols_here, per_col)
        rows_here = torch.repeat_interleave(torch.arange(r0, r1, device=dev, dtype=idt),
                                            rowptr[r0 + 1:r1 + 1] - rowptr[r0:r1], output_size=n)
        row.scatter_(0, pos, rows_here.index_select(0, order))
        order += e0
        slot_t.scatter_(0, pos, order.to(idt))
    return colptr.to(idt), row, slot_t
