"""Batching rules of the public ops for ``torch.func.vmap`` (per-sample gradients, batched models).

A rule gets the op's arguments with ``in_dims`` (the batched dimension of each, None if unbatched)
and returns the output with its batched dimension. Where only the dense operand is batched, and the
op is linear in it without reducing over its columns, the batch folds into one call: spmm/spmm_t
take the B feature-major operands side by side as [K, B*N], the convolutions take them as a batch
of B*n images; one kernel launch, whatever B. Everything else (a batched weight or index, and the
weight gradients sddmm and conv2d_weight_grad, which sum over the columns of each sample) runs the
op once per batch entry: correct for any batching, and what per-sample weight gradients cost anyway.
"""
from __future__ import annotations

import torch

from . import library

__all__ = ["loop_rule"]


def _batched(dim) -> bool:
    """Whether an ``in_dims`` entry names a batched dimension (non-tensor arguments, e.g. the kernel size
    lists, come with None or a list of Nones)."""
    return isinstance(dim, int)


def _select(arg, dim, b: int):
    return arg.select(dim, b) if _batched(dim) else arg


def loop_rule(op):
    """A rule that runs ``op`` once per batch entry and stacks the outputs along dimension 0."""
    def rule(info, in_dims, *args):
        outs = [op(*(_select(a, d, b) for a, d in zip(args, in_dims))) for b in range(info.batch_size)]
        return torch.stack(outs), 0
    return rule


def _only_batched(in_dims, position: int) -> bool:
    return _batched(in_dims[position]) and not any(_batched(d) for i, d in enumerate(in_dims) if i != position)


def _feature_major_rule(op, dense: int):
    """spmm / spmm_t: the dense operand [features, N] of every batch entry side by side as [features, B*N]."""
    fallback = loop_rule(op)

    def rule(info, in_dims, *args):
        if not _only_batched(in_dims, dense):
            return fallback(info, in_dims, *args)
        x = args[dense].movedim(in_dims[dense], 1)  # [features, B, N]
        features, batch, n = x.shape
        out = op(*args[:dense], x.reshape(features, batch * n), *args[dense + 1:])
        return out.view(out.shape[0], batch, n), 1
    return rule


def _image_batch_rule(op, dense: int):
    """conv2d / conv2d_input_grad: the B batches of n NCHW images as one batch of B*n images."""
    fallback = loop_rule(op)

    def rule(info, in_dims, *args):
        if not _only_batched(in_dims, dense):
            return fallback(info, in_dims, *args)
        x = args[dense].movedim(in_dims[dense], 0)  # [B, n, C, H, W]
        batch, n = x.shape[:2]
        out = op(*args[:dense], x.reshape(batch * n, *x.shape[2:]), *args[dense + 1:])
        return out.view(batch, n, *out.shape[1:]), 0
    return rule


library.spmm.register_vmap(_feature_major_rule(library.spmm, 7))
library.spmm_t.register_vmap(_feature_major_rule(library.spmm_t, 7))
library.sddmm.register_vmap(loop_rule(library.sddmm))
library.conv2d.register_vmap(_image_batch_rule(library.conv2d, 7))
library.conv2d_input_grad.register_vmap(_image_batch_rule(library.conv2d_input_grad, 7))
library.conv2d_weight_grad.register_vmap(loop_rule(library.conv2d_weight_grad))
