"""sparsestart: neural networks that are sparse from the first step, with real sparse storage and kernels.

Public API: ``sparsify``, ``densify``, ``summary``, ``nn.SparseLinear``,
``nn.SparseConv2d``, ``formats.CSR``/``BSR``, ``ops`` (the op contract and backends).
"""
from . import formats, init, nn, ops  # noqa: F401  (ops registers torch.ops.sparsestart.*)
from .nn import densify, sparsify, summary

__version__ = "0.1.0"
__all__ = ["sparsify", "densify", "summary", "formats", "init", "nn", "ops", "__version__"]
