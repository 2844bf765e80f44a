"""Exact top-k selection in O(n), shared by the density rules and the structure updates.

The structure updates pick k of n scores many times per run (RigL grows the k
absent positions of largest |gradient| among all M x K positions of a layer;
every drop picks the k smallest of nnz magnitudes). A sort is O(n log n) and
``torch.topk``/``torch.kthvalue`` on tens of millions of entries take a large
share of an update, so the selection first narrows the candidates:

1. the threshold that a slightly larger fraction than k / n of a fixed-seed
   random sample of the scores passes (a selection on that small sample);
2. one comparison pass keeps the scores reaching it;
3. if at least k passed, the exact selection runs on those candidates only
   (every score at least as good as the true k-th best passed, ties included,
   so the result is the same); otherwise it runs on all scores.

The result never depends on the sample, only the time does. Ties at the k-th
best go to the smallest ``keys`` (default: the smallest index), so splitting
the candidates into chunks never changes the result.

Scores are ranked through exact integer keys (:func:`rank_keys`): NaN above
every number, -0.0 equal to +0.0, so a selection never comes out short of k.
float32 scores on the CPU skip all of the above: the extension's radix
selection (csrc/cpu/topk.cpp) gives the same indices in a few passes.

Everything runs on the scores' device (the sample's positions come from a
fixed-seed generator there), so a selection on a GPU equals the CPU's.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import _native

__all__ = ["top_k_mask", "top_k", "smallest", "rank_keys", "sample_threshold", "random_positions", "SAMPLE_SIZE"]

# Below this many scores one full selection is cheap enough; above it, prefilter.
_PREFILTER_MIN = 1 << 16
#: Scores sampled to estimate a selection threshold.
SAMPLE_SIZE = 1 << 15


def sample_threshold(sample: torch.Tensor, fraction: float, *, largest: bool = True) -> Optional[torch.Tensor]:
    """A threshold that, judged by ``sample``, a little more than ``fraction`` of the population
    reaches (>= for ``largest``, <= otherwise): the sample's value at about 4 standard deviations
    beyond the expected count. None when that is (nearly) the whole sample."""
    m = sample.numel()
    expected = fraction * m
    rank = math.ceil(expected + 4 * math.sqrt(expected) + 8)
    if rank >= m:
        return None
    return torch.kthvalue(sample, m - rank + 1 if largest else rank).values


def random_positions(n: int, size: int, device, *, ascending: bool = False) -> torch.Tensor:
    """``size`` positions in [0, n) from a fixed-seed generator (the global RNG is not touched), in draw
    order or ``ascending``. The same (n, size, device) always gives the same positions, so the last few
    are kept (RigL asks for the same layer's sample at every update) and a copy is returned: drawing and
    sorting cost ~0.7 ms, the copy ~20 us, and a caller may then modify its positions freely."""
    return _random_positions(int(n), int(size), torch.device(device), bool(ascending)).clone()


@functools.lru_cache(maxsize=16)
def _random_positions(n: int, size: int, device: torch.device, ascending: bool) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    positions = torch.randint(n, (size,), generator=gen, device=device)
    return torch.sort(positions).values if ascending else positions


_RANK_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def rank_keys(scores: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Integer keys whose order is the ranking of ``scores`` (a larger key is a better score):
    NaN ranks above every number (among the largest, never among the smallest), -0.0 equals +0.0,
    as in ``torch.sort``. Exact: no two different numbers share a key."""
    itype = _RANK_INT.get(scores.dtype)
    if itype is None:  # integer scores are their own keys; ~x reverses the order without overflow
        return scores if largest else ~scores
    bits = torch.where(scores == 0, torch.zeros_like(scores), scores).view(itype)
    top = torch.iinfo(itype).max
    # A negative float's bits, read as a signed integer, grow with its magnitude: flipping all but the
    # sign bit reverses that, so the integers sort as the floats do.
    key = torch.where(bits < 0, bits ^ top, bits).masked_fill_(scores.isnan(), top)
    return key if largest else ~key


def _prefiltered(scores: torch.Tensor, k: int, largest: bool) -> Optional[torch.Tensor]:
    """Ascending indices of a superset of the k best scores (None when the estimate fell short)."""
    n = scores.numel()
    rank = rank_keys(scores, largest)
    threshold = sample_threshold(rank[random_positions(n, SAMPLE_SIZE, scores.device)], k / n)
    if threshold is None:
        return None
    cand = (rank >= threshold).nonzero().flatten()
    return cand if cand.numel() >= k else None


def top_k(scores: torch.Tensor, k: int, *, largest: bool = True, keys: Optional[torch.Tensor] = None,
          _prefilter: bool = True) -> torch.Tensor:
    """Ascending indices (into the flattened ``scores``) of the k largest (or smallest) scores.

    Among scores equal to the k-th best the smallest ``keys`` win (default: the
    smallest indices). NaN ranks above every number and -0.0 equals +0.0 (the
    order of ``torch.sort``), so the result always holds exactly min(k, n) indices.
    k >= n gives every index, k <= 0 none.

    float32 scores on the CPU are selected by the extension's radix selection
    (``_native_top_k``, the same indices; five passes over the scores, faster than the prefilter
    below at every k: 4.8 ms for 1.68M scores against 7.4 ms with the prefilter at k = 2% of them).
    """
    scores = scores.reshape(-1)
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if keys is None and scores.dtype == torch.float32:
        native = _native.native_op_for("_native_top_k", scores)
        if native is not None:
            return native(scores, k, largest)
    if _prefilter and n >= _PREFILTER_MIN and 2 * k <= n:
        cand = _prefiltered(scores, k, largest)
        if cand is not None:
            # Candidates keep their index order, so the default tie-break (smallest index) carries over.
            sub_keys = None if keys is None else keys.reshape(-1).index_select(0, cand)
            return cand.index_select(0, top_k(scores.index_select(0, cand), k, largest=largest, keys=sub_keys,
                                              _prefilter=False))
    rank = rank_keys(scores, largest)
    tau = torch.topk(rank, k, sorted=False).values.min()
    mask = rank > tau
    need = k - int(mask.sum())
    if need > 0:
        ties = (rank == tau).nonzero().flatten()
        if keys is not None:
            ties = ties.index_select(0, torch.argsort(keys.reshape(-1).index_select(0, ties), stable=True))
        mask.index_fill_(0, ties[:need], True)
    return mask.nonzero().flatten()


def top_k_mask(scores: torch.Tensor, k: int, *, largest: bool = True,
               keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask over the flattened ``scores`` with the entries of :func:`top_k` set."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[top_k(scores, k, largest=largest, keys=keys)] = True
    return mask


def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k smallest scores, ascending by position (ties: the earlier position)."""
    return top_k(scores, k, largest=False)
