"""Flow repair on whole networks, cell by cell: what Tables 6-7 of Gadhikar et al. (2023) measure.

One *cell* is (network, layer-wise rule, density, seed): an ER structure is sampled on a
fresh copy of the network with :func:`sparsestart.sparsify` and repaired with
``repair_flow(method="random_addition")``. A cell records two counts that the paper's text
conflates: the edges (weights) really added, and ``FlowReport.flag_count``, the number of
(layer, direction) pairs with any dead unit, which is what the released code sums
(``(degree == 0).any()``) and what the tables print (at most 2 x the masked layers).

No training is involved, so a whole table costs seconds to a minute on a CPU. The experiments
layer runs it for specs of ``kind: flow`` (:mod:`sparsestart.train.experiment`);
``scripts/flow_repair_table.py`` writes ``docs/flow_repair.md`` from the same cells.

The CIFAR ResNet-50 of the paper's released code is not one of :mod:`sparsestart.models`
(nothing else uses it), so it is defined here: :func:`cifar_resnet50`.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["cifar_resnet50", "build_network", "measure_cell", "SETUPS"]

#: How a cell samples and repairs: "exact" (sparsestart's choices: exactly round(p_l N_l) weights
#: per layer, budget-exact balanced, one edge removed per edge added) or "paper" (the released
#: code's: Bernoulli masks, the budget-losing balanced rule, no edge removed).
SETUPS = ("exact", "paper")


def flow_cell_key(model: str, distribution: str, density: float, seed: int) -> str:
    """The key of one measured cell (a network's label, rule, density, seed) in a flow study's results."""
    return f"{model}/{distribution}/d{density:g}/s{seed}"


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet50(nn.Module):
    """The CIFAR ResNet-50 of the paper's released code (``ER_DST/sparselearning/resnet_cifar100.py``):
    3x3 stem of 64 channels, bottleneck stages [3, 4, 6, 3], 1x1 shortcut convs, a linear classifier
    without bias; 53 Conv2d + 1 Linear = 54 masked layers (so the paper's flag count is at most 108)."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = 4 * planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(2048, num_classes, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def cifar_resnet50(num_classes: int = 100) -> nn.Module:
    """:class:`CifarResNet50`, the network behind the paper's Table 6."""
    return CifarResNet50(num_classes)


def build_network(model: str, num_classes: int = 100, *, seed: int = 0) -> nn.Module:
    """A dense network by name: ``resnet50`` (:func:`cifar_resnet50`) or any :mod:`sparsestart.models` name.

    Its weights come from torch's global generator seeded with ``seed``; flow repair depends on the
    structure only, but repaired entries copy values from the layer, so the values are fixed too."""
    from ..models import get

    torch.manual_seed(seed)
    if isinstance(model, str) and model.strip().lower().replace("-", "") == "resnet50":
        return cifar_resnet50(num_classes)
    return get(model, num_classes=num_classes)


def measure_cell(dense: nn.Module, density: float, distribution: str, seed: int, *, setup: str = "exact",
                 input_shape=(3, 32, 32)) -> dict:
    """Sample and repair one cell on a copy of ``dense``; returns the counts of one :class:`FlowReport`.

    ``{"edges": edges added, "flags": the paper's count, "max_flags", "dead": dead units before repair,
    "disconnected": units alive in their layer but cut off across layers, "over_budget": weights added
    beyond the budget, "worst_layer": [name, edges] of the layer receiving most edges (or None)}``.
    """
    from ..nn import sparsify
    from .flow import repair_flow

    if setup not in SETUPS:
        raise ValueError(f"measure_cell: setup {setup!r} is not one of {', '.join(SETUPS)}")
    paper = setup == "paper"
    model = copy.deepcopy(dense)
    opts = dict(exact_budget=False) if paper and distribution == "balanced" else {}
    sparsify(model, density, distribution, seed=seed, exact=not paper, **opts)
    report = repair_flow(model, "random_addition", keep_budget=not paper, seed=seed,
                         input_shape=tuple(input_shape) if input_shape is not None else None)
    worst: Optional[list] = None
    if report.total:
        lf = max(report.layers, key=lambda x: x.edges_added)
        worst = [lf.name, int(lf.edges_added)]
    return {"edges": int(report.total), "flags": int(report.flag_count), "max_flags": int(report.max_flags),
            "dead": int(report.total_dead), "disconnected": int(report.total_disconnected),
            "over_budget": int(sum(lf.over_budget for lf in report.layers)), "worst_layer": worst}
