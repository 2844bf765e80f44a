"""How an algorithm changes the weight a sparse layer computes with, from outside the layer.

SparseLinear and SparseConv2d read ``self.values`` in their forward (whatever
kernel path they take). :func:`substitute_values` installs a forward pre-hook
that puts an effective tensor computed from the stored values (STR's soft
threshold) into the instance ``__dict__`` under the name ``values``, where
attribute lookup finds it before the registered Parameter, and a forward hook
(``always_call=True``, so also when the forward raises) that removes it. The
Parameter itself, the state dict, the optimizer and every structure update are
untouched, and outside a forward ``layer.values`` is the Parameter again.

A public hook in sparsestart.nn (a ``weight_transform`` the layer applies to
``values`` in forward) would make this shadowing unnecessary.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..nn.modules import SparseLayer

__all__ = ["substitute_values"]


def substitute_values(layer: SparseLayer, effective: Callable[[torch.nn.Parameter], torch.Tensor]
                      ) -> Callable[[], None]:
    """Make ``layer``'s forward compute with ``effective(layer's values Parameter)``; returns the undo function."""
    if getattr(layer, "_sparsestart_substituted", False):
        raise ValueError(f"{type(layer).__name__} already computes with substituted values (is another "
                         f"algorithm attached to this model?)")

    def pre_hook(module, inputs):
        module.__dict__.pop("values", None)
        module.__dict__["values"] = effective(module._parameters["values"])

    def post_hook(module, inputs, output):
        module.__dict__.pop("values", None)

    handles = [layer.register_forward_pre_hook(pre_hook),
               layer.register_forward_hook(post_hook, always_call=True)]
    layer.__dict__["_sparsestart_substituted"] = True

    def remove() -> None:
        for h in handles:
            h.remove()
        layer.__dict__.pop("values", None)
        layer.__dict__.pop("_sparsestart_substituted", None)

    return remove
