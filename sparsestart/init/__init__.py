"""Initialisation of sparse structures: ER sampling (layer-wise densities and flow repair to come)."""
from .sampling import check_density, er_indices, sample_without_replacement

__all__ = ["er_indices", "sample_without_replacement", "check_density"]
