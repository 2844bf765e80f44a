"""Compressed sparse weight structures (see compressed.py for the layout)."""
from .compressed import BSR, CSR, SparseMatrix, index_dtype_for

__all__ = ["SparseMatrix", "CSR", "BSR", "index_dtype_for"]
