"""sparsestart: neural networks that are sparse from the first step, with real sparse storage and kernels.

Public API: ``sparsify``, ``densify``, ``summary``, ``nn.SparseLinear``,
``nn.SparseConv2d``, ``formats.CSR``/``BSR``, ``ops`` (the op contract and backends),
``init`` (densities, ER sampling, flow repair), ``algorithms`` (static, IMP, STR, RigL/SET, gradual, edge-popup),
``runtime`` (``retain_freed_memory``: keep freed memory in the process, as ``sparsestart train`` does).
"""
from . import formats, init, nn, ops  # noqa: F401  (ops registers torch.ops.sparsestart.*)
from . import algorithms  # noqa: E402  (builds on nn and formats)
from . import runtime  # noqa: F401  (nothing is applied on import)
from .nn import densify, sparsify, summary

__version__ = "0.1.0"
__all__ = ["sparsify", "densify", "summary", "formats", "init", "nn", "ops", "algorithms", "runtime", "__version__"]
