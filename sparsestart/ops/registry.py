"""Backend registry: which implementation runs a native kernel for given inputs.

Every backend implements the two native kernels (``native_spmm`` and
``native_sddmm``, layouts in csrc/ops.cpp). For each call the registry takes the
highest-priority backend that is available and supports the inputs. A backend
can be forced with the environment variable ``SPARSESTART_BACKEND=<name>`` or
the context manager :func:`use_backend`; a forced backend that cannot run the
inputs is an error, never a silent fallback. When no backend fits, the error
lists every backend's reasons.

The choice is cached (host overhead: every op call asks). The key is what the
backends' ``not_supported_reasons`` may look at: the op, the device of every
probe tensor, the dtype of the first, the block size (:func:`block_size`), the
index dtype (the second tensor), the forced backend (``use_backend`` or
``SPARSESTART_BACKEND``, read on every call) and ``TRITON_INTERPRET``.
Registering a backend or assigning any attribute of one (tests monkeypatch
``is_available``) clears the cache; :func:`clear_cache` does it by hand. A
backend whose reasons depend on anything else must call :func:`clear_cache`
when that changes. Failed choices are not cached (their error is recomputed).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch

__all__ = ["Backend", "register_backend", "backends", "choose", "use_backend", "forced_backend", "NoBackendError",
           "block_size", "clear_cache"]


class NoBackendError(RuntimeError):
    """No backend can run the given inputs; the message lists why for each."""


@dataclass
class Backend:
    name: str
    priority: int
    spmm: Callable[..., torch.Tensor]
    sddmm: Callable[..., torch.Tensor]
    # Returns [] when the backend can run on these inputs, else human-readable reasons.
    not_supported_reasons: Callable[[str, list[torch.Tensor]], list[str]] = field(default=lambda op, ts: [])
    is_available: Callable[[], bool] = field(default=lambda: True)
    # Why is_available() is False: a string, or a callable returning one (computed when asked).
    unavailable_reason: Union[str, Callable[[], str]] = ""
    # Further native kernels by op name (e.g. "conv2d", "conv2d_input_grad", "conv2d_weight_grad").
    kernels: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)

    def kernel(self, op: str) -> Callable[..., torch.Tensor]:
        return getattr(self, op) if op in ("spmm", "sddmm") else self.kernels[op]

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        clear_cache()  # a changed backend may change any cached choice

    def why_unavailable(self) -> str:
        reason = self.unavailable_reason
        return (reason() if callable(reason) else reason) or "not available"


_BACKENDS: dict[str, Backend] = {}
_local = threading.local()
# (op, forced, TRITON_INTERPRET, dtype, block size, index dtype, devices...) -> Backend
_CACHE: dict[tuple, Backend] = {}
_CACHE_LIMIT = 4096


def clear_cache() -> None:
    """Forget every cached backend choice."""
    _CACHE.clear()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    clear_cache()


def backends() -> dict[str, Backend]:
    """All registered backends by name (available or not)."""
    return dict(_BACKENDS)


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``SPARSESTART_BACKEND``, if any."""
    name = getattr(_local, "forced", None) or os.environ.get("SPARSESTART_BACKEND") or None
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"SPARSESTART_BACKEND / use_backend: unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force backend ``name`` (None: automatic choice) inside the block (per thread)."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; known: {sorted(_BACKENDS)}")
    old = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = old


def block_size(op: str, tensors) -> Optional[int]:
    """1 for CSR, b for BSR, None when it cannot be told (sddmm over zero rows).

    spmm, conv2d and conv2d_input_grad get [values, ptr, dense]; sddmm gets [a, ptr, b]
    with a of R * block_size rows; conv2d_weight_grad (CSR only) gets [dy, ptr, x].
    """
    first, ptr = tensors[0], tensors[1]
    if op in ("spmm", "conv2d", "conv2d_input_grad"):
        return 1 if first.dim() == 1 else int(first.shape[1])
    if op != "sddmm":
        return 1
    R = ptr.numel() - 1
    return int(first.shape[0]) // R if R > 0 else None


def _reasons(backend: Backend, op: str, tensors: list[torch.Tensor]) -> list[str]:
    if not backend.is_available():
        return [backend.why_unavailable()]
    if op not in ("spmm", "sddmm") and op not in backend.kernels:
        return [f"has no {op} kernel"]
    return backend.not_supported_reasons(op, tensors)


def choose(op: str, tensors: list[torch.Tensor]) -> Backend:
    """The backend that runs native kernel ``op`` ('spmm', 'sddmm' or a name in Backend.kernels) on ``tensors``."""
    forced = forced_backend()
    first = tensors[0]
    key = (op, forced, os.environ.get("TRITON_INTERPRET"), first.dtype, block_size(op, tensors), tensors[1].dtype,
           *[t.device for t in tensors])
    backend = _CACHE.get(key)
    if backend is None:
        backend = _choose(op, tensors, forced)
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = backend
    return backend


def _choose(op: str, tensors: list[torch.Tensor], forced: Optional[str]) -> Backend:
    if forced is not None:
        backend = _BACKENDS[forced]
        reasons = _reasons(backend, op, tensors)
        if reasons:
            raise NoBackendError(f"sparsestart.{op}: forced backend {forced!r} cannot run these inputs: {'; '.join(reasons)}")
        return backend
    report = []
    for backend in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        reasons = _reasons(backend, op, tensors)
        if not reasons:
            return backend
        report.append(f"{backend.name}: {'; '.join(reasons)}")
    raise NoBackendError(f"sparsestart.{op}: no backend can run these inputs:\n  " + "\n  ".join(report))
