"""The public ops under torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap).

torch.library's autograd wrapper for custom ops has no separate ``setup_context``, which torch.func
requires: through the ops, ``torch.func.grad`` of a sparse model raised "must override the
setup_context staticmethod". Under a transform the eager callers (``library.call_*``) therefore take
an autograd.Function built here for each op: its forward calls the op (so vmap reaches the op's
batching rule, sparsestart/ops/batching.py, through ``generate_vmap_rule``), backward is the op's own
formula, and jvp (forward mode) follows from the ops being linear in each differentiable operand.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["transform_function", "wrapped"]


class _Leaf:
    """A list argument (kernel size, padding, dilation) passed through a transform's autograd.Function as one
    pytree leaf: torch.func flattens the arguments, and a list of n ints counted n leaves against one
    tangent ("treespec.unflatten(leaves): leaves has length 11 but the spec ... holds 14 items" in jvp)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def wrapped(args) -> tuple:
    """The arguments for :func:`transform_function`'s apply: lists as single leaves."""
    return tuple(_Leaf(a) if isinstance(a, list) else a for a in args)


def _unwrapped(args) -> tuple:
    return tuple(a.value if isinstance(a, _Leaf) else a for a in args)


def transform_function(name: str, op, setup: Optional[Callable], backward: Optional[Callable],
                       differentiable: tuple, bias_shape: Optional[tuple], call: Callable):
    """The autograd.Function of op ``name`` under a transform. ``setup``/``backward`` are the op's autograd
    formulas (None for the convolutions' gradient ops, which have no derivative), ``differentiable`` the
    positions of its differentiable operands, ``bias_shape`` the view that broadcasts a bias (the last
    differentiable position) over the output, ``call`` the op's eager caller (the jvp calls it, so nested
    transforms come back here). Apply it to :func:`wrapped` arguments."""
    def forward(*args):
        return op(*_unwrapped(args))

    def setup_context(ctx, inputs, output):
        inputs = _unwrapped(inputs)
        if setup is not None:
            setup(ctx, inputs, output)
        ctx.save_for_forward(*(a for a in inputs if isinstance(a, Tensor)))
        ctx.forward_args = tuple(None if isinstance(a, Tensor) else a for a in inputs)
        ctx.tensor_at = tuple(isinstance(a, Tensor) for a in inputs)

    return type(f"_{name.title().replace('_', '')}TransformFunction", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward if backward is not None else _not_differentiable(name)),
        "jvp": staticmethod(_multilinear_jvp(differentiable, bias_shape, call)),
        "generate_vmap_rule": True})


def _multilinear_jvp(differentiable: tuple, bias_shape: Optional[tuple], call: Callable):
    """Forward-mode derivative of an op that is linear in each of its ``differentiable`` operands on its own
    (every op here: the weight values and the dense operand, or the two dense operands of a weight gradient),
    a bias (the last differentiable position, when ``bias_shape`` is given) added: the sum, over the
    operands that have a tangent, of the op with that operand replaced by its tangent."""
    bias_at = differentiable[-1] if bias_shape is not None else None

    def jvp(ctx, *tangents):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if is_tensor else other for is_tensor, other in zip(ctx.tensor_at, ctx.forward_args)]
        out = None
        for i in differentiable:
            t = tangents[i] if i < len(tangents) else None
            if t is None:
                continue
            if i == bias_at:
                term = t.view(bias_shape)
            else:
                term_args = list(args)
                term_args[i] = t
                if bias_at is not None and bias_at < len(term_args):
                    term_args[bias_at] = None
                term = call(*term_args)
            out = term if out is None else out + term
        return out
    return jvp


def _not_differentiable(name: str):
    """The backward of an op without autograd formula (the convolutions' gradient ops) under a transform:
    reached only by a second derivative, which the op does not have."""
    def backward(ctx, *grads):
        raise RuntimeError(f"sparsestart.{name} has no derivative (a second derivative through a SparseConv2d "
                           f"is not supported)")
    return backward
