"""Argument checks shared by the model builders.

Errors follow the library convention: a ValueError (or TypeError for a wrong
type) that names the argument, the value given and the accepted range.
"""
from __future__ import annotations

import numbers


def positive_int(name: str, value, *, where: str) -> int:
    # bool is an int subclass; True as a channel count is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: invalid {name}={value!r} ({type(value).__name__}); expected a positive int")
    if value <= 0:
        raise ValueError(f"{where}: invalid {name}={value!r}; expected a positive int (>= 1)")
    return int(value)


def positive_float(name: str, value, *, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: invalid {name}={value!r} ({type(value).__name__}); expected a positive number")
    if not float(value) > 0 or float(value) == float("inf"):
        raise ValueError(f"{where}: invalid {name}={value!r}; expected a finite number > 0")
    return float(value)


def scaled(channels: int, width: float) -> int:
    """Channel count after a width multiplier; never below one channel."""
    return max(1, int(round(channels * width)))


def min_input_size(out_size, *, start: int = 1, limit: int = 4096) -> int:
    """Smallest input size s >= start for which out_size(s) >= 1 (out_size is monotone)."""
    for s in range(start, limit + 1):
        if out_size(s) >= 1:
            return s
    raise AssertionError("no valid input size below limit")  # pragma: no cover


def check_input_size(input_size, out_size, *, where: str) -> int:
    """Validate input_size against the spatial reductions of a model.

    out_size maps an input side length to the side length of the last feature
    map; it must stay >= 1 or the pooling layers would produce empty tensors.
    """
    input_size = positive_int("input_size", input_size, where=where)
    if out_size(input_size) < 1:
        need = min_input_size(out_size)
        raise ValueError(
            f"{where}: input_size={input_size} is too small for the model's convolutions and pools; "
            f"it needs input_size >= {need}"
        )
    return input_size
