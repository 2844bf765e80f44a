"""Structure updates shared by the algorithms: scores of stored entries, drop + grow with optimizer-state
hygiene, uniform sampling of absent positions and global magnitude selection.

Everything here works on the compressed index (``coo()``, ``drop``, ``grow``)
and on tensors of size nnz; none of it builds a dense mask. Positions are
(block) coordinates; a *key* is ``row * Q + col`` on the R x Q (block) grid,
which is sorted in CSR order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _native
from ..formats import SparseMatrix
from ..formats.update import touched_slots
from ..init.sampling import sample_without_replacement
from ..nn.modules import SparseLayer
from ..ops.cpu import pooled_empty
from ..selection import smallest, top_k  # noqa: F401  (re-exported: the algorithms select with them)

__all__ = ["zero_slot_state", "entry_magnitude", "rewire", "rewire_keys", "prune", "sample_absent", "top_k",
           "smallest", "isin_sorted", "smallest_global"]


@torch.no_grad()
def zero_slot_state(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor, slots: torch.Tensor) -> None:
    """Zero, at ``slots`` (indices into dim 0), every optimizer state tensor shaped like ``param``
    (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, Adagrad's sum, ...) and ``param.grad``.

    Scalar state such as Adam's ``step`` is per parameter, not per slot, and stays.
    """
    if slots.numel() == 0:
        return
    slots = slots.to(param.device)
    # index_fill_, not t[slots] = 0: the generic index_put_ path costs several times more per slot.
    if param.grad is not None:
        param.grad.index_fill_(0, slots, 0)
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == param.shape:
            value.index_fill_(0, slots, 0)


def entry_magnitude(matrix: SparseMatrix, values: Optional[torch.Tensor] = None, reduce: str = "sum") -> torch.Tensor:
    """|w| of every stored entry in CSR order (float64 for block sums, whose ranking float32 could blur;
    a single weight's |w| ranks exactly in its own dtype).

    For BSR an entry is a block: its score is the sum (``reduce="sum"``) or the
    mean (``"mean"``, comparable with single weights) of |w| over the block.
    ``values`` replaces ``matrix.values`` (e.g. STR's effective weights).
    """
    vals = (matrix.values if values is None else values).detach()
    slots = matrix.slot[:matrix.nnz]
    out = pooled_empty(slots.shape + vals.shape[1:], vals)  # MBs at every update of a large layer
    mag = (vals.index_select(0, slots) if out is None else torch.index_select(vals, 0, slots, out=out)).abs_()
    if mag.dim() == 3:
        mag = mag.double()
        mag = mag.sum(dim=(1, 2)) if reduce == "sum" else mag.mean(dim=(1, 2))
    return mag


def rewire(layer: SparseLayer, drop_positions: torch.Tensor, grow_rows: torch.Tensor, grow_cols: torch.Tensor,
           optimizer: Optional[torch.optim.Optimizer]) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the entries at CSR ``drop_positions``, then add entries at (grow_rows, grow_cols).

    Both happen in place on the layer's own tensors. Freed and new slots hold 0
    and their optimizer state and gradient are zeroed, so nothing of a removed
    weight survives into a new one. Returns (freed slots, new slots).
    """
    # One index rewrite for both (drop then grow would rewrite the whole index twice).
    return _rewritten(layer, optimizer, lambda m: m.replace(drop_positions, grow_rows, grow_cols))


def rewire_keys(layer: SparseLayer, drop_positions: torch.Tensor, grow_keys: torch.Tensor,
                optimizer: Optional[torch.optim.Optimizer]) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the entries at CSR ``drop_positions`` and grow the keys row * Q + col in ``grow_keys`` (both
    ascending), where a grown key of a dropped entry keeps that entry unchanged (RigL's regrown positions):
    :meth:`SparseMatrix.rewire`, one native op on the CPU. Freed and new slots hold 0 and their optimizer
    state and gradient are zeroed, as in :func:`rewire`. Returns (freed slots, new slots)."""
    return _rewritten(layer, optimizer, lambda m: m.rewire(drop_positions, grow_keys))


def _rewritten(layer: SparseLayer, optimizer: Optional[torch.optim.Optimizer],
               update) -> tuple[torch.Tensor, torch.Tensor]:
    """``update(layer.sparse_weight)`` -> (freed slots, new slots), then the optimizer state and gradient
    of every slot it voided zeroed (the values the update zeroes itself)."""
    matrix = layer.sparse_weight
    tail = matrix.capacity - matrix.nnz  # new slots come from this free tail first
    freed, new = update(matrix)
    zero_slot_state(optimizer, layer.values, touched_slots(freed, new, tail))
    return freed, new


def prune(layer: SparseLayer, positions: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]
          ) -> torch.Tensor:
    """Drop the entries at CSR ``positions`` (no growth), as :func:`rewire`; returns the freed slots."""
    none = torch.empty(0, dtype=torch.long, device=layer.values.device)
    return rewire(layer, positions, none, none, optimizer)[0]


def sample_absent(present_keys: torch.Tensor, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct keys drawn uniformly from [0, n) minus the sorted ``present_keys``, sorted ascending.

    Draws k distinct ranks among the n - len(present) absent keys and maps rank
    r to the r-th absent key: with s_i the present keys in ascending order, the
    number of absent keys below s_i is s_i - i, so the r-th absent key is r + j
    with j = #{i : s_i - i <= r}: one merge on the CPU (O(k + nnz)), a binary search
    per rank elsewhere. No rejection, no dense mask.

    The ranks are drawn by ``generator`` where it lives (the algorithms keep a CPU generator,
    so a structure sampled on a GPU is the one sampled on the CPU, and the generator state in a
    checkpoint is device-independent); only those k ranks travel to ``present_keys``'s device,
    where the mapping runs and the result stays.
    """
    present_keys = present_keys.long()
    absent = n - present_keys.numel()
    if not (0 <= k <= absent):
        raise ValueError(f"cannot sample {k} absent positions: only {absent} of {n} are absent")
    dev = present_keys.device
    ranks = sample_without_replacement(absent, k, generator).to(dev)
    native = _native.native_op_for("_native_absent_at_ranks", present_keys, ranks)
    return (native or _native.absent_at_ranks)(present_keys, ranks)


def isin_sorted(values: torch.Tensor, sorted_set: torch.Tensor, *, values_sorted: bool = False) -> torch.Tensor:
    """``torch.isin(values, sorted_set)`` for an ascending ``sorted_set``, by binary search (O(n log m)),
    or, for ascending int64 ``values`` on the CPU with the extension, one merge pass (O(n + m))."""
    if sorted_set.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if values_sorted and values.dtype == sorted_set.dtype == torch.long:
        merge = _native.native_op_for("_native_sorted_isin", values, sorted_set)
        if merge is not None:
            return merge(values, sorted_set).reshape(values.shape)
    return _native.sorted_isin(values, sorted_set).reshape(values.shape)


def smallest_global(scores: Sequence[torch.Tensor], sizes: Sequence[int], n_remove: int,
                    min_keep: int = 1) -> list[torch.Tensor]:
    """Global magnitude selection: entries of smallest score across layers until ``n_remove`` weights go.

    ``scores[l]`` holds the scores of layer l's entries (CSR order), each entry
    standing for ``sizes[l]`` weights (1, or b*b for a block). The ``min_keep``
    best entries of every layer are never selected, so no layer empties. The
    selection stops at the first entry that reaches ``n_remove`` (it can exceed
    it by less than one block). Ties go to the earlier layer, then the earlier
    position. Returns the CSR positions to drop for every layer, on the device of its scores.

    Everything runs on the scores' device (stable sorts: the same selection on every device).
    """
    if not scores:
        return []
    dev = scores[0].device
    cand_scores, cand_layer, cand_pos = [], [], []
    for i, s in enumerate(scores):
        s = s.detach().double().to(dev)
        n_cand = max(0, s.numel() - min_keep)
        order = torch.sort(s, stable=True).indices[:n_cand]
        cand_scores.append(s[order])
        cand_layer.append(torch.full((n_cand,), i, dtype=torch.long, device=dev))
        cand_pos.append(order)
    out = [torch.empty(0, dtype=torch.long, device=s.device) for s in scores]
    if n_remove <= 0:
        return out
    all_scores, all_layer, all_pos = torch.cat(cand_scores), torch.cat(cand_layer), torch.cat(cand_pos)
    order = torch.sort(all_scores, stable=True).indices  # stable over (layer, position) concatenation order
    weight = torch.tensor([int(z) for z in sizes], dtype=torch.long, device=dev)[all_layer[order]]
    before = torch.cumsum(weight, 0) - weight
    take = order[before < n_remove]
    for i in range(len(scores)):
        sel = all_pos[take[all_layer[take] == i]]
        out[i] = torch.sort(sel).values.to(scores[i].device)
    return out
