"""SparseLinear and SparseConv2d: drop-in layers that store only their nonzeros.

Each layer owns exactly two parameters, ``values`` (the slot-indexed nonzeros,
[C] for CSR or [C, b, b] for BSR) and ``bias``; the index (rowptr, col, slot,
colptr, row, slot_t) lives in buffers. ``sparse_weight`` returns a
:class:`~sparsestart.formats.SparseMatrix` over these very tensors, so a
structure update made through it (drop/grow) is seen by the layer at once.

The code lives in one module per idea: :mod:`.layer` (the shared base),
:mod:`.linear`, :mod:`.conv` (with the convolution algorithm choice and its
thresholds), :mod:`.autotune` (the measured choice of "auto") and :mod:`.build` (constructor
arguments). This module keeps the
names importable from ``sparsestart.nn.modules``, where they were defined
before, and so keeps layers pickled then loadable.
"""
# Re-exported for code that imports them from here (convert.py takes _real_number). The thresholds are
# read from .conv: to change one, set it there (sparsestart.nn.conv.DENSE_COMPUTE_DENSITY).
from .build import (_FORMATS, _check_format, _generator, _nonzero_blocks, _real_number,  # noqa: F401
                    _refuse_meta, _weight_to_matrix)
from .conv import (CONV_ALGORITHMS, DENSE_COMPUTE_DENSITY, DENSE_COMPUTE_MIN_FAN_IN, DIRECT_MIN_PLANE,  # noqa: F401
                   UNFOLD_MIN_DENSITY, SparseConv2d, _pair)
from .layer import _INDEX_NAMES, SparseLayer  # noqa: F401
from .linear import LINEAR_ALGORITHMS, SparseLinear, _autocast_dtype  # noqa: F401

__all__ = ["SparseLayer", "SparseLinear", "SparseConv2d"]
