"""sparsestart: neural networks that are sparse from the first step, with real sparse storage and kernels."""
from . import formats, ops  # noqa: F401  (ops registers torch.ops.sparsestart.*)

__version__ = "0.1.0"
