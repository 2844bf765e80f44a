"""The dense weight gradient of a sparse layer, only when needed and in bounded memory.

RigL grows the absent positions of largest |dL/dW|. That dense gradient is
dY^T X for a linear layer (the value gradient ``sddmm`` is the same product
sampled at the stored entries). It is needed only at update steps, so
:class:`GradientCapture` keeps a layer's input and output gradient only for
the forward/backward pass right before an update. :func:`topk_absent_gradient`
then forms the gradient a chunk of rows at a time (a chunk holds at most
``max_chunk_elements`` floats, 16M by default) and keeps a running top-k, so a
full dense M x K gradient of a large layer never exists.

Layouts: a captured pair is (x, dy) as the layer saw them: SparseLinear
x [..., K], dy [..., M]; SparseConv2d x [n, C_in, H, W] (or unbatched), dy
[n, C_out, H_out, W_out]. Rows of the gradient are output units/channels,
columns the (flattened C_in x kh x kw) inputs, as in the compressed matrix.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _native
from ..ops.cpu import pooled_empty
from ..nn.modules import SparseConv2d, SparseLayer, SparseLinear
from ..selection import SAMPLE_SIZE, random_positions, sample_threshold, top_k
from .structure import isin_sorted

__all__ = ["GradientCapture", "dense_gradient", "topk_absent_gradient", "feature_major", "DEFAULT_MAX_CHUNK_ELEMENTS"]

DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24

Pair = tuple[torch.Tensor, torch.Tensor]


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands (x, dY) to ``keep``.

    The output is a copy: a tensor hook on the layer's own output would be lost
    when that output is a view (a reshape) and the next op works in place
    (``ReLU(inplace=True)``), while a custom Function's fresh output can be
    modified in place and still receives the gradient before the modification.
    """

    @staticmethod
    def forward(ctx, output, keep, x):
        ctx.keep, ctx.x = keep, x
        return output.clone()

    @staticmethod
    def backward(ctx, dy):
        ctx.keep((ctx.x, dy.detach()))
        return dy, None, None


class GradientCapture:
    """Forward hooks that, while ``due()`` is true, keep each layer's input and the gradient of the
    loss with respect to its output (an identity :class:`_Tap` on the output sees it in backward).

    Only passes that run backward are kept, so evaluation passes under
    ``torch.no_grad()`` cost nothing; several passes before one update
    (gradient accumulation) are summed. When not due, the cost is one Python
    call per layer and forward.
    """

    def __init__(self, layers: dict[str, SparseLayer], due: Callable[[], bool]):
        self.due = due
        self.pairs: dict[str, list[Pair]] = {name: [] for name in layers}
        self._handles = [layer.register_forward_hook(partial(self._forward_hook, name))
                         for name, layer in layers.items()]

    # Opaque to torch.compile (``--compile``): traced, ``due()`` would become a guard on the algorithm's step
    # count and the model would be compiled again at every step; left out, the hook runs eagerly between the
    # compiled pieces of the model.
    @torch.compiler.disable
    def _forward_hook(self, name, module, inputs, output):
        if not torch.is_tensor(output) or not output.requires_grad or not self.due():
            return None
        return _Tap.apply(output, self.pairs[name].append, inputs[0].detach())

    def clear(self) -> None:
        for pairs in self.pairs.values():
            pairs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()


def feature_major(layer: SparseLayer, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X [K, N], dY [M, N]) in the layout of the op contract, from a captured (x, dy) pair.

    For a convolution X is the unfolded (im2col) input, N = batch * output positions.
    """
    M, K = layer.matrix_shape
    if isinstance(layer, SparseLinear):
        return x.reshape(-1, K).t().contiguous(), dy.reshape(-1, M).t().contiguous()
    if isinstance(layer, SparseConv2d):
        if x.dim() == 3:
            x, dy = x.unsqueeze(0), dy.unsqueeze(0)
        x = _padded(layer, x)
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # [n, K, L]
        n, _, L = cols.shape
        return (cols.transpose(0, 1).reshape(K, n * L).contiguous(),
                dy.reshape(n, M, L).transpose(0, 1).reshape(M, n * L).contiguous())
    raise TypeError(f"expected a SparseLinear or SparseConv2d, got {type(layer).__name__}")


def _padded(layer: SparseConv2d, x: torch.Tensor) -> torch.Tensor:
    pad = layer._explicit_padding()
    if any(pad):
        x = F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    return x


def _prepared(layer: SparseLayer, pairs: list[Pair]) -> list[Pair]:
    """Pairs ready for :func:`_gradient_rows`: conv inputs batched and padded once, not once per chunk.

    Both sides are cast to the values' dtype: under bf16 autocast the captured input of a
    layer may be fp32 (e.g. a normalised image) while its output gradient is bf16, and the
    growth scores are compared in the master weights' precision anyway.
    """
    dtype = layer.values.dtype
    pairs = [(x.to(dtype), dy.to(dtype)) for x, dy in pairs]
    if isinstance(layer, SparseLinear):
        return pairs
    if isinstance(layer, SparseConv2d):
        out = []
        for x, dy in pairs:
            if x.dim() == 3:
                x, dy = x.unsqueeze(0), dy.unsqueeze(0)
            out.append((_padded(layer, x), dy))
        return out
    raise TypeError(f"expected a SparseLinear or SparseConv2d, got {type(layer).__name__}")


def _gradient_rows(layer: SparseLayer, prepared: list[Pair], r0: int, r1: int) -> torch.Tensor:
    M, K = layer.matrix_shape
    out = None
    for x, dy in prepared:
        if isinstance(layer, SparseLinear):
            a, b = dy.reshape(-1, M)[:, r0:r1].t(), x.reshape(-1, K)
            with torch.no_grad():
                if out is not None:
                    out.addmm_(a, b)
                    continue
                # From the extension's pool (None off the CPU): RigL forms a chunk of the same size at
                # every update (64 MB for a 4096 x 4096 layer), and a fresh one is page-faulted anew under
                # glibc's default malloc (the 4096 x 256 x 4096 product: 46 ms fresh, 28 ms reused).
                buf = pooled_empty((r1 - r0, K), b)
                g = a @ b if buf is None else torch.mm(a, b, out=buf)
        else:
            g = torch.nn.grad.conv2d_weight(x, (r1 - r0, *layer.weight_shape[1:]), dy[:, r0:r1],
                                            stride=layer.stride, padding=0, dilation=layer.dilation)
            g = g.reshape(r1 - r0, K)
        out = g if out is None else out.add_(g)
    if out is None:
        raise ValueError("no (input, output gradient) pair was captured for this layer")
    return out


def dense_gradient(layer: SparseLayer, pairs: list[Pair], rows: Optional[slice] = None) -> torch.Tensor:
    """Rows ``rows`` (default: all) of the dense gradient dL/dW as [rows, K], summed over ``pairs``.

    Linear: dy[:, rows]^T @ x over the flattened batch. Conv: the weight gradient
    of the convolution for the output channels ``rows`` (torch's convolution
    backward, which does not need the unfolded input), flattened to
    [rows, C_in*kh*kw].
    """
    M = layer.matrix_shape[0]
    r0, r1, _ = (rows or slice(0, M)).indices(M)
    return _gradient_rows(layer, _prepared(layer, pairs), r0, r1)


def topk_absent_gradient(layer: SparseLayer, pairs: list[Pair], k: int, present_keys: torch.Tensor,
                         max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
                         sync: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Keys (row * Q + col on the (block) grid) of the k absent positions of largest |dense gradient|.

    ``present_keys`` (sorted ascending) are excluded. For BSR the score of a
    block is the sum of |gradient| over it. Rows are processed in chunks of at
    most ``max_chunk_elements`` gradient entries (at least one (block) row), with
    a running top-k: memory is O(chunk + k). Ties go to the smaller key, so the
    chunking never changes the result. Returned keys are sorted ascending, on
    the layer's device. ``sync``, when given, is applied to every chunk of the
    gradient (rows of the chunk as [rows, K]) before scoring, e.g. an average
    over data-parallel ranks; the chunks depend only on the layer's shape, so
    its calls line up across ranks.
    """
    matrix = layer.sparse_weight
    b = matrix.block_size
    R, Q = matrix.grid
    dev = layer.values.device
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    prepared = _prepared(layer, pairs)
    present_keys = present_keys.long().to(dev)
    rows_per_chunk = max(1, int(max_chunk_elements) // max(1, b * b * Q))
    starts = list(range(0, R, rows_per_chunk))
    # The present keys of every chunk, found with one search and one host synchronisation for all chunks.
    bounds = torch.searchsorted(present_keys, torch.tensor(starts + [R], device=dev) * Q).tolist()
    best_scores = torch.empty(0, dtype=layer.values.dtype, device=dev)
    best_keys = torch.empty(0, dtype=torch.long, device=dev)
    for i, r0 in enumerate(starts):
        r1 = min(R, r0 + rows_per_chunk)
        g = _gradient_rows(layer, prepared, r0 * b, r1 * b).detach()
        if sync is not None:
            g = sync(g.contiguous())
        chunk_present = present_keys[bounds[i]:bounds[i + 1]]
        floor = best_scores.min() if best_keys.numel() == k else None
        found = None
        if b == 1:
            found = _absent_candidates(_absent_at_least_for(g, chunk_present), g.reshape(-1), chunk_present,
                                       r0 * Q, k, floor)
        if found is not None:
            idx, score = found
        else:
            g = g.abs_()
            score = g if b == 1 else g.reshape(r1 - r0, b, Q, b).sum(dim=(1, 3))
            score = score.reshape(-1).to(best_scores.dtype)
            score[chunk_present - r0 * Q] = -float("inf")
            idx = None
            if floor is not None:
                # Only scores reaching the current k-th best can enter: usually a small fraction of the chunk.
                idx = (score >= floor).nonzero().flatten()
                score = score.index_select(0, idx)
        top = top_k(score, k)
        if idx is not None:
            top, score = idx.index_select(0, top), score.index_select(0, top)
        else:
            score = score.index_select(0, top)
        # Earlier chunks hold smaller keys and top_k returns ascending indices, so the keys stay ascending.
        if best_keys.numel() == 0:  # the first chunk's top-k is the running top-k (no copies of it)
            best_scores, best_keys = score, (top.add_(r0 * Q) if r0 else top)
            continue
        cand_scores = torch.cat([best_scores, score])
        cand_keys = torch.cat([best_keys, top + r0 * Q])
        keep = top_k(cand_scores, k, keys=cand_keys)
        best_scores, best_keys = cand_scores[keep], cand_keys[keep]
    # Present positions score -inf where a chunk is scored whole: one among the best means fewer than
    # k were absent. (Only -inf: a +inf gradient is a score like any other. One reduction, where
    # isinf(...).any() made two passes and two temporaries of size k.)
    if best_keys.numel() < k or bool(best_scores.min() == -float("inf")):
        raise ValueError(f"only {int((best_scores > -float('inf')).sum())} absent positions for k={k}")
    return best_keys


def _absent_at_least_for(scores: torch.Tensor, present: torch.Tensor) -> Callable:
    """The native candidate pass for float32/float64 CPU tensors, else its PyTorch twin (CUDA, half)."""
    if scores.dtype in (torch.float32, torch.float64):
        native = _native.native_op_for("_native_absent_at_least", scores, present)
        if native is not None:
            return native
    return _native.absent_at_least


def _absent_candidates(native, flat: torch.Tensor, present: torch.Tensor, base: int, k: int,
                       floor: Optional[torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(ascending indices, |g| there) of the absent entries of a flat gradient chunk that reach a
    threshold estimated from a sample, in one pass of ``native`` (the native op, or its PyTorch twin
    off the CPU); None when that set may miss one of the chunk's entries that belong in the running
    top-k (then the caller scores the whole chunk).

    With the running top-k full, entries below its k-th best (``floor``) cannot enter, so the
    threshold is at least ``floor``; a threshold at ``floor`` is always safe. A higher one is safe
    when at least k entries reach it (the chunk's own top-k are then all among them).
    """
    n = flat.numel()
    n_absent = n - present.numel()
    if n < 4 * SAMPLE_SIZE or n_absent <= 0:
        return None
    # Sorted, so the membership test is one merge pass over `present` instead of random binary searches.
    sample = random_positions(n, SAMPLE_SIZE, flat.device, ascending=True)
    sample = sample[~isin_sorted(sample + base, present, values_sorted=True)]
    threshold = sample_threshold(flat[sample].abs(), k / n_absent) if sample.numel() else None
    if threshold is None:
        if floor is None:
            return None
        threshold = floor
    elif floor is not None:
        threshold = torch.maximum(threshold, floor.to(threshold.dtype))
    idx, magnitude = native(flat, present, base, float(threshold))
    safe = floor is not None and bool(threshold <= floor)
    if idx.numel() < k and not safe:
        return None
    return idx, magnitude
