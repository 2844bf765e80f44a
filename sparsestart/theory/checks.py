"""Argument checks shared by the bounds and the construction (each error names the argument)."""
from __future__ import annotations

import numbers
from typing import Any, List, Sequence


def _check_density(name: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1], got {p!r}")
    p = float(p)
    if not (0.0 < p <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {p!r}")
    return p


def _check_delta(delta: Any, name: str = "delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return delta


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _check_sizes(name: str, sizes: Any, min_len: int = 2) -> List[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise ValueError(f"{name} must be a list of positive integers, got {sizes!r}")
    if len(sizes) < min_len:
        raise ValueError(f"{name} needs at least {min_len} entries, got {list(sizes)!r}")
    return [_check_positive_int(f"{name}[{i}]", s) for i, s in enumerate(sizes)]


def _check_densities(densities: Any, n: int) -> List[float]:
    """``n`` densities p_0..p_{n-1}; a single number is broadcast to all layers."""
    if isinstance(densities, numbers.Real) and not isinstance(densities, bool):
        return [_check_density("densities", densities)] * n
    if isinstance(densities, (str, bytes)) or not isinstance(densities, Sequence):
        raise ValueError(f"densities must be a list of numbers in (0, 1], got {densities!r}")
    if len(densities) != n:
        raise ValueError(
            f"densities must have one entry per source layer ({n} = target depth + 1: "
            f"p_0 .. p_{n - 1}), got {len(densities)} entries: {list(densities)!r}"
        )
    return [_check_density(f"densities[{i}]", p) for i, p in enumerate(densities)]


def _check_nonzeros(target_nonzeros: Any, dense: List[int]) -> List[int]:
    if target_nonzeros is None:
        return list(dense)
    if isinstance(target_nonzeros, (str, bytes)) or not isinstance(target_nonzeros, Sequence):
        raise ValueError(f"target_nonzeros must be a list of integers, got {target_nonzeros!r}")
    if len(target_nonzeros) != len(dense):
        raise ValueError(
            f"target_nonzeros must have one entry per target layer ({len(dense)}: m_1 .. m_L), "
            f"got {len(target_nonzeros)} entries: {list(target_nonzeros)!r}"
        )
    out = []
    for i, (m, full) in enumerate(zip(target_nonzeros, dense)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or int(m) < 0:
            raise ValueError(f"target_nonzeros[{i}] must be a nonnegative integer, got {m!r}")
        if int(m) > full:
            raise ValueError(
                f"target_nonzeros[{i}] = {m!r} exceeds the size of target layer {i + 1} ({full})"
            )
        out.append(int(m))
    return out
