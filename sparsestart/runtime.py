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

The native CPU ops need neither: their large outputs (spmm, sddmm, conv2d and
its gradients, 256 KiB and up) come from an output-buffer pool inside the
extension (csrc/cpu/pool.h) that keeps freed blocks by size and hands them out
again, so a training step under glibc's default reuses the pages of the step
before (RigL's dense-gradient chunks come from it too). :func:`output_pool_stats`
shows it, :func:`set_output_pool_limit` (or
``SPARSESTART_POOL_LIMIT_MB`` before the first op) bounds the free bytes it
keeps (default 1 GiB; 0 turns it off). Dense layers and the rest of PyTorch
still allocate through ``malloc``, which is what :func:`retain_freed_memory`
is for.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

__all__ = ["retain_freed_memory", "malloc_settings", "output_pool_stats", "set_output_pool_limit"]

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


def _native():
    from .ops import cpu

    if not cpu.NATIVE_AVAILABLE:
        return None
    from . import _C

    return _C


def output_pool_stats() -> dict:
    """The native CPU ops' output-buffer pool: ``held_bytes`` (free blocks kept for reuse),
    ``limit_bytes`` (the most it keeps), ``hits`` (outputs served from a kept block) and ``misses``
    (outputs that allocated a new block), counted since the process started. All zero when the C++
    extension is not built (the reference backend allocates through PyTorch)."""
    native = _native()
    if native is None:
        return {"held_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(native.output_pool_stats())


def set_output_pool_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` free bytes in the native CPU ops' output-buffer pool; kept blocks
    beyond it are freed now. 0 keeps none (every output goes back to ``free`` when it dies). Never
    changes results. Without the C++ extension there is no pool and this only checks ``nbytes``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_output_pool_limit: nbytes must be a whole number of bytes >= 0, got {nbytes!r}")
    native = _native()
    if native is not None:
        native.set_output_pool_limit(nbytes)
