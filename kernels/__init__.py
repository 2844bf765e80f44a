"""Triton kernels of sparsestart, installed as ``sparsestart.kernels`` (GPU issue)."""
