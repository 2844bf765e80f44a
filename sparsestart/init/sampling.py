"""Erdős–Rényi sampling of sparse structures at a cost that follows nnz.

``er_indices`` draws exactly round(p * R * Q) distinct (block) positions
uniformly at random (or independent Bernoulli(p) per position with
``exact=False``) without ever materialising a dense mask.

Devices: sampling runs where the generator lives, on the CPU by default
(``generator=None`` uses torch's global CPU RNG). The library samples structures
with CPU generators and moves the k sampled positions to the model's device:
the same seed then gives the same structure on every device (CUDA's Philox
stream differs from the CPU's Mersenne twister), a generator state in a
checkpoint is device-independent, and the cost is one copy of k indices.
A CUDA generator samples on its GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

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
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=generator, device=dev)[:k]
    return _sorted_subset(chosen, keep)


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
    """
    density = check_density(density)
    R, Q = grid
    n = R * Q
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
