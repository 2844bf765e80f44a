"""Backend registry: which implementation runs a native kernel for given inputs.

Every backend implements the two native kernels (``native_spmm`` and
``native_sddmm``, layouts in csrc/ops.cpp). For each call the registry takes the
highest-priority backend that is available and supports the inputs. A backend
can be forced with the environment variable ``SPARSESTART_BACKEND=<name>`` or
the context manager :func:`use_backend`; a forced backend that cannot run the
inputs is an error, never a silent fallback. When no backend fits, the error
lists every backend's reasons.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

__all__ = ["Backend", "register_backend", "backends", "choose", "use_backend", "forced_backend", "NoBackendError"]


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
    unavailable_reason: str = ""
    # Further native kernels by op name (e.g. "conv2d", "conv2d_input_grad", "conv2d_weight_grad").
    kernels: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)

    def kernel(self, op: str) -> Callable[..., torch.Tensor]:
        return getattr(self, op) if op in ("spmm", "sddmm") else self.kernels[op]


_BACKENDS: dict[str, Backend] = {}
_local = threading.local()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


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


def _reasons(backend: Backend, op: str, tensors: list[torch.Tensor]) -> list[str]:
    if not backend.is_available():
        return [backend.unavailable_reason or "not available"]
    if op not in ("spmm", "sddmm") and op not in backend.kernels:
        return [f"has no {op} kernel"]
    return backend.not_supported_reasons(op, tensors)


def choose(op: str, tensors: list[torch.Tensor]) -> Backend:
    """The backend that runs native kernel ``op`` ('spmm', 'sddmm' or a name in Backend.kernels) on ``tensors``."""
    forced = forced_backend()
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
