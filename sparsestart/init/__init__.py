"""Initialisation of sparse structures: layer-wise densities, ER sampling, flow repair."""
from .densities import DISTRIBUTIONS, allocate_densities, layer_budget
from .flow import FlowReport, repair_flow
from .sampling import check_density, er_indices, sample_without_replacement

__all__ = ["allocate_densities", "DISTRIBUTIONS", "layer_budget", "repair_flow", "FlowReport", "er_indices",
           "sample_without_replacement", "check_density"]
