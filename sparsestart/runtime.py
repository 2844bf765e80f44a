"""Process-wide settings for training on the CPU: keeping freed memory in the process.

PyTorch on the CPU has no caching allocator: every tensor comes from ``malloc``
and goes back with ``free``. glibc serves blocks above its mmap threshold
(dynamic, 128 KiB to 32 MiB) with fresh ``mmap`` calls and returns freed heap
tops to the system, so a training step that allocates the same multi-MB
activations every iteration page-faults on all of them every iteration, and how
often depends on what else the process allocated (a large freed block raises
glibc's threshold), so benchmarks interleaving two models measure each other's
allocations. On the 2-core machines this project is measured on, the layers
suite of ``python -m bench`` gives SparseConv2d 64->64 at 32x32, density 0.01,
forward+backward 23.7 ms under glibc's default (bench/results/cpu-default-malloc.json)
and 7.2 ms with freed memory retained (bench/results/cpu.json): the page faults
of its 16 MiB outputs cost more than the arithmetic.

:func:`retain_freed_memory` fixes the policy for the whole process, as jemalloc
or tcmalloc (PyTorch's CPU tuning guide recommends them) would: blocks up to
``mmap_threshold`` come from the heap and freed memory stays in the process up
to ``trim_threshold``. It is not applied on ``import sparsestart`` (a library
should not change its host's allocator); ``sparsestart train`` and
``python -m bench`` apply it unless told not to (``--default-malloc``), and
record that they did. It only changes when memory is returned to the system,
never results.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

__all__ = ["retain_freed_memory", "malloc_settings"]

# mallopt parameter numbers of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: Optional[dict] = None


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 4 << 30) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold``
    freed bytes in the process (glibc ``mallopt``). Returns False (and changes nothing) when the C
    library is not glibc. Values above 2 GiB - 1 are clamped (mallopt takes an int)."""
    global _applied
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt takes an int: thresholds are clamped to what fits (2 GiB - 1).
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1)
    if ok:
        _applied = {"mmap_threshold": min(mmap_threshold, 2**31 - 1), "trim_threshold": min(trim_threshold, 2**31 - 1)}
    return ok


def malloc_settings() -> dict:
    """What this process uses, for run records: glibc defaults or the retained-memory thresholds."""
    if _applied is None:
        return {"policy": "default"}
    return {"policy": "retain_freed_memory", **_applied}
