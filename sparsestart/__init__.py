"""sparsestart: neural networks that are sparse from the first step, with real sparse storage and kernels.

Public API (every submodule is reachable as ``sparsestart.<name>``; ``models``, ``theory``, ``train``,
``selection``, ``demo``, ``cli`` and ``kernels`` are imported on first access): ``sparsify``, ``densify``,
``summary``, ``nn.SparseLinear``, ``nn.SparseConv2d``, ``formats.CSR``/``BSR``, ``ops`` (the op contract and backends),
``init`` (densities, ER sampling, flow repair), ``algorithms`` (static, IMP, STR, RigL/SET, gradual, edge-popup),
``runtime`` (``retain_freed_memory``: keep freed memory in the process, as ``sparsestart train`` does),
``info()`` (versions, build, kernels, backends and datasets of this installation: ``sparsestart info``).
"""
from __future__ import annotations

import importlib as _importlib

# nn before init: nn's conversion (sparsify) builds on init, whose densities and flow repair build on nn's
# layers and model walk; loaded the other way round, init would meet a half-loaded nn.convert.
from . import formats, nn, init, ops  # noqa: F401  (ops registers torch.ops.sparsestart.*)
from . import algorithms  # noqa: E402  (builds on nn and formats)
from . import runtime  # noqa: F401  (nothing is applied on import)
from .nn import densify, sparsify, summary
# The name `info` is the function: bound after the submodule's import has set it to the module.
from .info import info  # noqa: E402  (imports nothing heavy until called)

__version__ = "0.1.0"

#: Public submodules imported on first attribute access (PEP 562), so that ``import sparsestart`` stays as fast
#: as before: ``sparsestart.models.get("mlp")``, ``sparsestart.theory``, ``sparsestart.train.train(...)`` work
#: without importing them first. ``kernels`` (the Triton kernels) needs triton.
_LAZY_SUBMODULES = ("models", "theory", "train", "selection", "demo", "cli", "kernels")

# kernels stays out of __all__: ``from sparsestart import *`` must not need triton.
__all__ = ["sparsify", "densify", "summary", "info", "formats", "init", "nn", "ops", "algorithms", "runtime",
           *(m for m in _LAZY_SUBMODULES if m != "kernels"), "__version__"]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # later accesses skip __getattr__
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
