"""sparsestart: neural networks that are sparse from the first step, with real sparse storage and kernels.

Public API (every submodule is reachable as ``sparsestart.<name>``; ``models``, ``theory``, ``train``,
``selection``, ``demo``, ``cli`` and ``kernels`` are imported on first access): ``sparsify``, ``densify``,
``summary``, ``nn.SparseLinear``, ``nn.SparseConv2d``, ``formats.CSR``/``BSR``, ``ops`` (the op contract and backends),
``init`` (densities, ER sampling, flow repair), ``algorithms`` (static, IMP, STR, RigL/SET, gradual, edge-popup),
``runtime`` (``retain_freed_memory``: keep freed memory in the process, as ``sparsestart train`` does).
"""
from __future__ import annotations

import importlib as _importlib

from . import formats, init, nn, ops  # noqa: F401  (ops registers torch.ops.sparsestart.*)
from . import algorithms  # noqa: E402  (builds on nn and formats)
from . import runtime  # noqa: F401  (nothing is applied on import)
from .nn import densify, sparsify, summary

__version__ = "0.1.0"

#: Public submodules imported on first attribute access (PEP 562), so that ``import sparsestart`` stays as fast
#: as before: ``sparsestart.models.get("mlp")``, ``sparsestart.theory``, ``sparsestart.train.train(...)`` work
#: without importing them first. ``kernels`` (the Triton kernels) needs triton.
_LAZY_SUBMODULES = ("models", "theory", "train", "selection", "demo", "cli", "kernels")

# kernels stays out of __all__: ``from sparsestart import *`` must not need triton.
__all__ = ["sparsify", "densify", "summary", "formats", "init", "nn", "ops", "algorithms", "runtime",
           *(m for m in _LAZY_SUBMODULES if m != "kernels"), "__version__"]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # later accesses skip __getattr__
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
