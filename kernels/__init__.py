"""Triton kernels of sparsestart, installed as ``sparsestart.kernels``.

- ``bsr.py``    block-sparse SpMM (also transposed, over the CSC index) and SDDMM, b in 16/32/64
- ``csr.py``    unstructured SpMM and SDDMM (row per program with gathers)
- ``launch.py`` jit + autotune and launchers with the semantics of the native kernels
                ``_native_spmm`` / ``_native_sddmm`` (csrc/ops.cpp)

The registry backend "triton" (sparsestart/ops/gpu.py) calls ``launch``. This
package imports nothing at import time; ``launch`` imports triton. See docs/gpu.md.
"""
