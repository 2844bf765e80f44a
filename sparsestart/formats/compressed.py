"""Fixed-capacity compressed sparse matrices: CSR and BSR over value slots.

A sparse weight of logical shape (M, K) keeps its nonzeros in ``values``, a
tensor of fixed capacity C >= nnz addressed by *slot*: ``[C]`` for CSR,
``[C, b, b]`` for BSR with square blocks of size b. The index lives in plain
integer tensors, all of fixed length so they can be buffers of a module and be
updated in place:

    rowptr [R + 1]  entries of (block) row r are positions rowptr[r]:rowptr[r+1]
    col    [C]      (block) column of each entry, sorted within a row
    slot   [C]      slot of each entry in ``values``
    colptr [Q + 1]  the transposed (CSC) view over the same entries
    row    [C]      (block) row of each CSC entry, sorted within a column
    slot_t [C]      slot of each CSC entry

with R = M / b and Q = K / b block rows/columns (b = 1 for CSR). Only the first
nnz = rowptr[R] positions of col/slot/row/slot_t are live. ``slot`` is always a
permutation of 0..C-1 whose tail slot[nnz:] lists the free slots, so growing
takes free slots without any search; the same tail is kept in ``slot_t``.

Structure updates (``drop``, ``grow``) rewrite only the index; existing values
stay in their slots, freed and newly used slots are zeroed.
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Callable, Optional, Sequence, Union

import torch

from .. import _native
from . import update
from .csc import csc_of_csr
from .update import _check_distinct, _check_range
from .validation import remember_valid, validate_index

__all__ = ["SparseMatrix", "CSR", "BSR", "index_dtype_for"]

_INT32_MAX = 2**31 - 1


def index_dtype_for(*extents: int) -> torch.dtype:
    """int32 unless some extent (dimension or capacity) needs int64."""
    return torch.int32 if max(extents, default=0) < _INT32_MAX else torch.int64


def _check_capacity(capacity) -> int:
    """``capacity`` as an int: any integer (Python, numpy, 0-d integer tensor); a float, even 100.0,
    is refused rather than truncated."""
    if isinstance(capacity, bool) or (isinstance(capacity, torch.Tensor) and capacity.dtype == torch.bool):
        raise TypeError(f"capacity must be an int, got {capacity!r}")
    try:
        return operator.index(capacity)
    except TypeError:
        raise TypeError(f"capacity must be an int (number of value slots), got {capacity!r}") from None


@contextlib.contextmanager
def one_thread():
    """Run the body on one intra-op thread (the count is restored after; nesting is free).

    For the chunked construction paths (ER sampling, the CSC counting sort): hundreds of torch
    calls on chunks of ~10^5 entries, where a parallel region saves little and costs a thread
    hand-off each time. On a machine shared with other jobs a worker that waits for a core
    stalls every region: a 32768 x 32768 layer took 20-40 s on two threads at a load of 8,
    1.7 s on one. The results never depend on the thread count.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _rows_of(rowptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The (block) row of each of the first nnz CSR positions, as int64."""
    counts = (rowptr[1:] - rowptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=rowptr.device), counts, output_size=nnz)



def per_version(t: torch.Tensor, name: str, compute):
    """``compute(t)``, cached on the tensor ``t`` until ``t`` changes.

    For values derived from an index tensor that hot paths need on every call (the CUDA
    SpMM's row order, a layer's density for its algorithm choice): reading them from a
    GPU tensor costs a sort or a host synchronisation. Structure updates rewrite the index
    in place, which bumps the tensor's version counter, or replace it; either way the value
    is computed again. The cache lives on the tensor, so it dies with it. A write that
    bypasses the counter (through ``.data``) would leave a stale value: callers use this
    only for values that steer speed, never results. Not cached under torch.compile or
    for inference tensors (they have no version counter).
    """
    if torch.compiler.is_compiling() or t.is_inference():
        return compute(t)
    attr = "_sparsestart_" + name
    cached = getattr(t, attr, None)
    if cached is None or cached[0] != t._version:
        cached = (t._version, compute(t))
        setattr(t, attr, cached)
    return cached[1]

class SparseMatrix:
    """Common implementation of :class:`CSR` (``block_size == 1``) and :class:`BSR`.

    The object only references its tensors; a module that registers them as
    parameter/buffers and rebuilds the object from them sees every in-place
    update made through it.
    """

    def __init__(
        self,
        values: torch.Tensor,
        rowptr: torch.Tensor,
        col: torch.Tensor,
        slot: torch.Tensor,
        colptr: torch.Tensor,
        row: torch.Tensor,
        slot_t: torch.Tensor,
        shape: Sequence[int],
    ):
        self.values = values
        self.rowptr, self.col, self.slot = rowptr, col, slot
        self.colptr, self.row, self.slot_t = colptr, row, slot_t
        self.shape = (int(shape[0]), int(shape[1]))

    # ------------------------------------------------------------------ basics
    @property
    def block_size(self) -> int:
        return 1 if self.values.dim() == 1 else int(self.values.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """Number of (block) rows and columns."""
        b = self.block_size
        return self.shape[0] // b, self.shape[1] // b

    @property
    def capacity(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        """Number of stored entries (blocks for BSR)."""
        return int(self.rowptr[-1])

    @property
    def nnz_elements(self) -> int:
        """Number of stored weights (nnz * b * b)."""
        return self.nnz * self.block_size**2

    @property
    def density(self) -> float:
        numel = self.shape[0] * self.shape[1]
        return self.nnz_elements / numel if numel else 1.0

    def index_tensors(self) -> tuple[torch.Tensor, ...]:
        """(rowptr, col, slot, colptr, row, slot_t), the index every op takes."""
        return self.rowptr, self.col, self.slot, self.colptr, self.row, self.slot_t

    def coo(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, slots) of the live entries in CSR order, as int64."""
        nnz = self.nnz
        return _rows_of(self.rowptr, nnz), self.col[:nnz].long(), self.slot[:nnz].long()

    def keys(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int64 keys row * Q + col (on the R x Q (block) grid) of the live entries in CSR order (ascending),
        only where the bool ``keep`` [nnz] is true when it is given. One native pass on the CPU; no int64
        copies of the whole index as ``coo()`` makes."""
        nnz = self.nnz
        if keep is not None and (keep.dtype != torch.bool or keep.shape != (nnz,)):
            raise ValueError(f"keep must be a bool tensor of shape ({nnz},), got {keep.dtype} {tuple(keep.shape)}")
        Q = self.grid[1]
        native = _native.native_op_for("_native_kept_keys", self.rowptr, *(() if keep is None else (keep,)))
        return (native or _native.kept_keys)(self.rowptr, self.col, keep, Q)

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor:
        """int64 keys row * Q + col of the entries at CSR ``positions`` (in [0, nnz)): a binary search each."""
        positions = positions.long()
        rowptr = self.rowptr[1:].long()
        rows = torch.searchsorted(rowptr, positions, right=True)
        return rows.mul_(self.grid[1]).add_(self.col.index_select(0, positions))

    def __repr__(self) -> str:
        b = f", block_size={self.block_size}" if self.block_size > 1 else ""
        return (
            f"{type(self).__name__}(shape={self.shape}{b}, nnz={self.nnz}, capacity={self.capacity}, "
            f"density={self.density:.4g}, dtype={self.values.dtype}, index_dtype={self.rowptr.dtype})"
        )

    # ------------------------------------------------------------ construction
    @classmethod
    def _check_shape(cls, shape: Sequence[int], block_size: int) -> tuple[int, int]:
        if len(shape) != 2 or any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must be two non-negative ints (M, K), got {tuple(shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size}")
        M, K = int(shape[0]), int(shape[1])
        if M % block_size or K % block_size:
            raise ValueError(
                f"shape {(M, K)} is not a multiple of block_size={block_size}: BSR needs both dimensions "
                f"divisible by the block size (pad the layer or choose a block size that divides both)"
            )
        return M, K

    @classmethod
    def _build(
        cls,
        rows: torch.Tensor,
        cols: torch.Tensor,
        values_of_entries: Optional[torch.Tensor],
        shape: Sequence[int],
        block_size: int,
        capacity: Optional[int],
        dtype: Optional[torch.dtype],
        device: Optional[torch.device],
        index_dtype: Optional[torch.dtype],
    ) -> "SparseMatrix":
        """Build from entries already checked to be in range and unique.

        Entries get slots 0..nnz-1 in CSR order; ``values_of_entries`` (or zeros)
        fills them.
        """
        nnz = rows.numel()
        M, K, R, Q, C, dtype, idt = cls._layout(shape, block_size, nnz, capacity, dtype, index_dtype)
        device = device if device is not None else rows.device
        vshape = (C,) if block_size == 1 else (C, block_size, block_size)
        values = torch.zeros(vshape, dtype=dtype, device=device)
        empty = lambda n: torch.zeros(n, dtype=idt, device=device)  # noqa: E731
        m = cls(values, empty(R + 1), empty(C), torch.arange(C, dtype=idt, device=device),
                empty(Q + 1), empty(C), torch.arange(C, dtype=idt, device=device), (M, K))
        rows, cols = rows.to(device=device, dtype=torch.long), cols.to(device=device, dtype=torch.long)
        keys = rows * max(Q, 1) + cols
        # Samplers return entries in CSR order already: then skip the O(nnz log nnz) sort.
        order = None if nnz < 2 or bool((keys[1:] > keys[:-1]).all()) else torch.argsort(keys)
        del keys
        if order is not None:
            rows, cols = rows[order], cols[order]
        rowptr = torch.zeros(R + 1, dtype=torch.long, device=device)
        torch.cumsum(torch.bincount(rows, minlength=R), 0, out=rowptr[1:])
        del rows
        m._write_csr(rowptr, cols)
        if values_of_entries is not None:
            v = values_of_entries.to(device=device, dtype=dtype)
            m.values.data[:nnz] = v if order is None else v[order]
        return m

    @classmethod
    def _layout(cls, shape, block_size: int, nnz: int, capacity, dtype, index_dtype) -> tuple:
        """(M, K, R, Q, capacity, values dtype, index dtype) of a matrix being built with ``nnz`` entries."""
        M, K = cls._check_shape(shape, block_size)
        C = nnz if capacity is None else _check_capacity(capacity)
        if C < nnz:
            raise ValueError(f"capacity must be >= nnz ({nnz}), got {capacity}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        idt = index_dtype or index_dtype_for(M + 1, K + 1, C + 1)
        return M, K, M // block_size, K // block_size, C, dtype, idt

    @classmethod
    def _from_csr(
        cls,
        rowptr: torch.Tensor,
        col: torch.Tensor,
        shape: Sequence[int],
        block_size: int,
        capacity: Optional[int],
        dtype: Optional[torch.dtype],
        device: Optional[torch.device],
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseMatrix":
        """Build from a checked CSR index (rowptr [R + 1], col [nnz], columns ascending within
        rows), with zero values: what the layers' ER constructors use.

        Nothing of O(nnz) is allocated besides the result (``col`` itself is taken as the
        column buffer when its dtype, device and length already fit): the CSC view comes from
        a counting sort one chunk of rows at a time. The index is built where ``col`` lives
        and then moved to ``device``.
        """
        nnz = col.numel()
        M, K, R, Q, C, dtype, idt = cls._layout(shape, block_size, nnz, capacity, dtype, index_dtype)
        device = torch.device(device) if device is not None else col.device
        here = col.device
        if col.dtype == idt and C == nnz:
            col_buf = col
        else:
            col_buf = torch.zeros(C, dtype=idt, device=here)
            col_buf[:nnz] = col
        del col
        rowptr_buf = rowptr.to(idt)
        with one_thread():
            colptr, row, slot_t = csc_of_csr(rowptr, col_buf[:nnz], Q, C, idt)
        slot = torch.arange(C, dtype=idt, device=here)
        vshape = (C,) if block_size == 1 else (C, block_size, block_size)
        values = torch.zeros(vshape, dtype=dtype, device=device)
        index = [t.to(device) for t in (rowptr_buf, col_buf, slot, colptr, row, slot_t)]
        remember_valid(index, C)  # the samplers' CSR, checked by their tests: ops skip re-validating
        return cls(values, *index, (M, K))

    @classmethod
    def from_indices(
        cls,
        rows,
        cols,
        shape: Sequence[int],
        values: Optional[torch.Tensor] = None,
        *,
        block_size: int = 1,
        capacity: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseMatrix":
        """From (block) coordinates; ``values`` ([nnz] or [nnz, b, b]) default to zero.

        Coordinates are in blocks for BSR. Out-of-range or duplicated
        coordinates raise ValueError.
        """
        block_size = cls._block_size_arg(block_size)
        M, K = cls._check_shape(shape, block_size)
        rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
        if rows.dim() != 1 or cols.shape != rows.shape:
            raise ValueError(f"rows and cols must be 1-D of equal length, got {tuple(rows.shape)} and {tuple(cols.shape)}")
        if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
            raise TypeError(f"rows and cols must be integer tensors, got {rows.dtype} and {cols.dtype}")
        R, Q = M // block_size, K // block_size
        _check_coordinates(rows.long(), cols.long(), R, Q, "rows", "cols")
        if values is not None:
            values = torch.as_tensor(values)
            want = (rows.numel(),) if block_size == 1 else (rows.numel(), block_size, block_size)
            if tuple(values.shape) != want:
                raise ValueError(f"values must have shape {want} for {rows.numel()} entries, got {tuple(values.shape)}")
            dtype = dtype or values.dtype
        return cls._build(rows, cols, values, (M, K), block_size, capacity, dtype, device or rows.device, index_dtype)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        *,
        block_size: int = 1,
        capacity: Optional[int] = None,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseMatrix":
        """Keep ``weight`` where ``mask`` is true (default: where weight != 0).

        For BSR the mask is either per block ([M/b, K/b]) or per element and then
        must be constant inside every block.
        """
        block_size = cls._block_size_arg(block_size)
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (M, K), got shape {tuple(weight.shape)}")
        M, K = cls._check_shape(weight.shape, block_size)
        block_mask = cls._block_mask(weight != 0 if mask is None else mask, (M, K), block_size)
        rows, cols = block_mask.nonzero(as_tuple=True)
        b = block_size
        with torch.no_grad():
            if b == 1:
                vals = weight.detach()[rows, cols]
            else:
                blocks = weight.detach().reshape(M // b, b, K // b, b).permute(0, 2, 1, 3)
                vals = blocks[rows, cols]
        return cls._build(rows, cols, vals, (M, K), b, capacity, weight.dtype, weight.device, index_dtype)

    @classmethod
    def from_mask(
        cls,
        mask: torch.Tensor,
        init: Union[str, Callable[[torch.Tensor], None]] = "zeros",
        *,
        block_size: int = 1,
        capacity: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseMatrix":
        """Structure from a dense bool mask; values from ``init``.

        ``init`` is "zeros", "kaiming_uniform" (torch's default for Linear/Conv
        weights, bound 1/sqrt(K)) or a callable filling the [nnz(, b, b)] tensor
        it is given in place.
        """
        block_size = cls._block_size_arg(block_size)
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
        M, K = cls._check_shape(tuple(mask.shape), block_size)
        rows, cols = cls._block_mask(mask, (M, K), block_size).nonzero(as_tuple=True)
        m = cls._build(rows, cols, None, (M, K), block_size, capacity, dtype, mask.device, index_dtype)
        nnz = rows.numel()
        with torch.no_grad():
            live = m.values.data[:nnz]
            if callable(init):
                init(live)
            elif init == "kaiming_uniform":
                bound = 1.0 / math.sqrt(K) if K else 0.0
                if generator is None or generator.device == live.device:
                    live.uniform_(-bound, bound, generator=generator)
                else:
                    # Draw where the generator lives (e.g. a CPU generator for a CUDA structure: the same
                    # values on every device), then copy once.
                    live.copy_(torch.empty(live.shape, dtype=live.dtype, device=generator.device)
                               .uniform_(-bound, bound, generator=generator))
            elif init != "zeros":
                raise ValueError(f"init must be 'zeros', 'kaiming_uniform' or a callable, got {init!r}")
        return m

    @staticmethod
    def _block_size_arg(block_size) -> int:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        return block_size

    @staticmethod
    def _block_mask(mask: torch.Tensor, shape: tuple[int, int], b: int) -> torch.Tensor:
        M, K = shape
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if b == 1:
            if tuple(mask.shape) != (M, K):
                raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight shape {(M, K)}")
            return mask
        if tuple(mask.shape) == (M // b, K // b) and (M, K) != (M // b, K // b):
            return mask
        if tuple(mask.shape) != (M, K):
            raise ValueError(f"mask must have shape {(M, K)} or block shape {(M // b, K // b)}, got {tuple(mask.shape)}")
        blocks = mask.reshape(M // b, b, K // b, b)
        anyb, allb = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
        if not torch.equal(anyb, allb):
            raise ValueError(f"element mask is not constant inside {b}x{b} blocks; BSR keeps whole blocks")
        return anyb

    # --------------------------------------------------------------- inspection
    def mask(self) -> torch.Tensor:
        """Dense bool [M, K] of stored positions (for inspection and tests)."""
        rows, cols, _ = self.coo()
        R, Q = self.grid
        bm = torch.zeros(R, Q, dtype=torch.bool, device=self.values.device)
        bm[rows, cols] = True
        b = self.block_size
        return bm if b == 1 else bm.repeat_interleave(b, 0).repeat_interleave(b, 1)

    def to_dense(self) -> torch.Tensor:
        """Dense [M, K] weight; differentiable with respect to ``values``."""
        R, Q = self.grid
        b = self.block_size
        dense = self.values.new_zeros((R, Q) if b == 1 else (R, Q, b, b))
        if torch.compiler.is_compiling():
            dense = self._scatter_all_positions(dense)
        else:
            rows, cols, slots = self.coo()
            dense = dense.index_put((rows, cols), self.values[slots])
        return dense if b == 1 else dense.permute(0, 2, 1, 3).reshape(self.shape)

    def _scatter_all_positions(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense`` with the live entries added in, computed over all C positions with the dead ones
        (>= nnz) masked to zero: no size depends on nnz, so torch.compile traces it (reading nnz is a
        graph break that split compiled models at every layer on the "dense" path) and a GPU never
        waits for the host. Dead positions add zero at a clamped in-range place (accumulate)."""
        R = self.grid[0]
        pos = torch.arange(self.capacity, device=self.rowptr.device, dtype=torch.int64)
        rowptr = self.rowptr.long()
        live = pos < rowptr[-1]
        rows = (torch.searchsorted(rowptr, pos, right=True) - 1).clamp_(0, max(R - 1, 0))
        cols = torch.where(live, self.col.long(), 0)
        vals = self.values[self.slot.long()]
        vals = vals * live.view((-1,) + (1,) * (vals.dim() - 1)).to(vals.dtype)
        return dense.index_put((rows, cols), vals, accumulate=True)

    def validate(self) -> None:
        """Check every invariant of the structure; raise ValueError naming the broken one (the tensor,
        the position and value, what is allowed). The same check guards the public ops, see
        :func:`sparsestart.formats.validation.validate_index`."""
        validate_index(self.index_tensors(), self.grid, self.capacity, device=self.values.device)
        remember_valid(self.index_tensors(), self.capacity)

    # ------------------------------------------------------- structure updates
    def _write_csr(self, rowptr: torch.Tensor, cols: torch.Tensor) -> None:
        """Rewrite all index tensors in place from live entries in CSR order (rowptr [R + 1], cols
        [nnz]) with slots 0..nnz-1 in that order and the free slots ascending in the tails.
        The CSC view comes from a chunked counting sort: O(nnz + R + Q), no O(nnz) temporaries
        beyond one chunk."""
        C = self.capacity
        nnz = cols.numel()
        idt = self.rowptr.dtype
        self.rowptr.copy_(rowptr)
        self.col[:nnz] = cols
        self.col[nnz:] = 0
        self.slot.copy_(torch.arange(C, dtype=idt, device=self.slot.device))
        with one_thread():
            colptr, row, slot_t = csc_of_csr(rowptr, self.col[:nnz], self.grid[1], C, idt)
        self.colptr.copy_(colptr)
        self.row.copy_(row)
        self.slot_t.copy_(slot_t)
        remember_valid(self.index_tensors(), self.capacity)  # valid by construction: ops skip re-validating

    def _store(self, csr: tuple, csc: tuple, free: torch.Tensor) -> None:
        """Write (ptr, minor indices, slots) of both views and the free-slot tails into the buffers."""
        nnz = csr[1].numel()
        idt = self.rowptr.dtype
        for (ptr, idx, slot), (ptr_buf, idx_buf, slot_buf) in zip(
                (csr, csc), ((self.rowptr, self.col, self.slot), (self.colptr, self.row, self.slot_t))):
            ptr_buf.copy_(ptr)
            idx_buf[:nnz] = idx.to(idt)
            idx_buf[nnz:] = 0
            slot_buf[:nnz] = slot.to(idt)
            slot_buf[nnz:] = free.to(idt)
        remember_valid(self.index_tensors(), self.capacity)  # valid by construction: ops skip re-validating

    @torch.no_grad()
    def drop(self, positions) -> torch.Tensor:
        """Remove the entries at CSR ``positions`` (indices into 0..nnz-1).

        Returns the freed slots (int64); their values are zeroed. Other values
        do not move.
        """
        return self.replace(positions, (), ())[0]

    @torch.no_grad()
    def grow(self, rows, cols) -> torch.Tensor:
        """Add entries at (block) coordinates (rows, cols), taking free slots.

        Returns the slots used (int64), in the order of the given coordinates;
        their values are zero. Coordinates already present, duplicated or out of
        range raise ValueError, as does exceeding the capacity; on error nothing
        changes.
        """
        return self.replace((), rows, cols)[1]

    @torch.no_grad()
    def replace(self, positions, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the entries at CSR ``positions`` and add (rows, cols), rewriting the index once.

        Returns (freed slots, used slots). A position dropped here may be grown
        again in the same call; it then gets a fresh, zeroed slot like any new
        entry. All checks happen before anything changes.

        Cost: O(nnz) passes plus O(k log k) for the k new entries and binary searches
        (how: :mod:`sparsestart.formats.update`).
        """
        return update.replace(self, positions, rows, cols)

    @torch.no_grad()
    def rewire(self, positions, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the entries at CSR ``positions`` and grow the entries with keys row * Q + col (on the
        (block) grid) in ``keys``; both int64, ascending and distinct.

        What RigL and SET do at an update, in one index rewrite: a grown key that is the key of a
        dropped entry keeps that entry as it is (slot, value, optimizer state), a grown key of an entry
        that is not dropped is an error. Returns (freed slots, new slots), int64 in CSR order; both are
        zeroed. All checks happen before anything changes. On the CPU one native op (three passes over
        the index); elsewhere the same result, bit for bit, from :meth:`keys_at` and :meth:`replace`.
        """
        return update.rewire(self, positions, keys)


def _check_coordinates(rows, cols, R, Q, rname, cname):
    _check_range(rows, cols, R, Q, rname, cname)
    _check_distinct(torch.sort(rows * max(Q, 1) + cols).values, max(Q, 1), rname, cname)


class CSR(SparseMatrix):
    """Fixed-capacity CSR matrix with a CSC view over the same value slots."""

    @classmethod
    def _block_size_arg(cls, block_size) -> int:
        if block_size != 1:
            raise ValueError(f"CSR has block_size 1, got {block_size!r}; use BSR for blocks")
        return 1


class BSR(SparseMatrix):
    """Fixed-capacity block-sparse matrix with square b x b blocks (b in 16, 32, 64 for GPU kernels).

    Values are [C, b, b]; the index is the CSR/CSC scheme over block coordinates.
    """

    @classmethod
    def _block_size_arg(cls, block_size) -> int:
        block_size = SparseMatrix._block_size_arg(block_size)
        if block_size == 1:
            raise ValueError("BSR needs block_size > 1, got 1; use CSR for unstructured sparsity")
        return block_size
