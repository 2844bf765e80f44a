"""The flow-repair study's networks and cells (sparsestart.init.flow_study), on small inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsestart.init.flow_study import build_network, cifar_resnet50, measure_cell


def test_cifar_resnet50_has_the_54_masked_layers_of_table_6():
    net = cifar_resnet50(100)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 53 and len(linears) == 1  # so the paper's flag count is at most 2 x 54 = 108
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_measure_cell_counts_are_consistent_and_repeatable():
    dense = build_network("lenet5", 10, seed=0)
    a = measure_cell(dense, 0.02, "uniform", 0, input_shape=(1, 28, 28))
    b = measure_cell(dense, 0.02, "uniform", 0, input_shape=(1, 28, 28))
    assert a == b  # the cell is a function of (network, rule, density, seed)
    assert 0 <= a["flags"] <= a["max_flags"] and a["dead"] >= a["flags"] // 2
    assert (a["edges"] > 0) == (a["dead"] > 0)
    # the paper's setup is a different sampler: its own counts, still bounded the same way
    p = measure_cell(dense, 0.02, "uniform", 0, setup="paper", input_shape=(1, 28, 28))
    assert 0 <= p["flags"] <= p["max_flags"] == a["max_flags"]
    with pytest.raises(ValueError, match="setup 'released' is not one of exact, paper"):
        measure_cell(dense, 0.02, "uniform", 0, setup="released")
