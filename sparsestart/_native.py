"""Native helper ops of the C++ extension, looked up by name (None when the extension is not loaded).

Callers keep a pure-PyTorch path for None (no extension, or tensors off the CPU),
and tests run both paths by patching :func:`native_op`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["native_op"]


def native_op(name: str) -> Optional[Callable]:
    """``torch.ops.sparsestart.<name>`` when the C++ extension registered it, else None."""
    try:
        return getattr(torch.ops.sparsestart, name)
    except (AttributeError, RuntimeError):
        return None
