"""CPU backend of the registry: the C++ kernels of the extension ``sparsestart._C`` (csrc/cpu).

Loading the extension registers the ``torch.ops.sparsestart._native_*`` kernels; this module gives
them fake impls (for torch.compile and opcheck), widens float16/bfloat16 operands to float32 around
the kernels, and registers the "cpu" backend (priority 10: above the reference, below the GPU
backends, which never take CPU tensors automatically). The public ops and their checks are in
library.py; the GPU backends in gpu.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import registry
from .library import _FLOAT_TYPES, _conv_sizes

__all__ = ["NATIVE_AVAILABLE", "pooled_empty"]


def _load_native() -> bool:
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.sparsestart._native_*)
    except ImportError as exc:  # pragma: no cover - depends on the build
        import warnings

        warnings.warn(
            f"sparsestart: the C++ extension sparsestart._C is not built ({exc}); using the slow pure-PyTorch "
            f"reference backend. Build it with: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


NATIVE_AVAILABLE = _load_native()


def pooled_empty(shape, like: Tensor):
    """An uninitialised CPU tensor of ``shape`` in ``like``'s dtype from the extension's buffer pool
    (csrc/cpu/pool.h), or None (not a CPU float32/float64 tensor, or no extension): for temporaries of
    several MB that a loop forms again and again (RigL's dense-gradient chunk and entry magnitudes), which
    glibc's default malloc would hand back fresh, to be page-faulted in, every time."""
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64) or not NATIVE_AVAILABLE:
        return None
    from .. import _C

    return _C.pooled_empty(list(shape), like)


_HALF = (torch.float16, torch.bfloat16)


def _cpu_reasons(op: str, tensors: list[Tensor]) -> list[str]:
    reasons = []
    if any(t.device.type != "cpu" for t in tensors):
        reasons.append(f"needs CPU tensors, got {sorted({t.device.type for t in tensors})}")
    dtype = tensors[0].dtype
    if dtype not in _FLOAT_TYPES:
        reasons.append(f"supports float32 and float64 (float16 and bfloat16 through float32), got {dtype}")
    return reasons


# The C++ CPU kernels compute in float32 and float64. float16/bfloat16 operands (autocast on CPU)
# are widened to float32, multiplied and summed there, and the output is rounded once to the
# operands' dtype: the numerics of the GPU kernels (fp32 accumulation), at the cost of one
# conversion pass over the operands, which is small next to the product at any density the
# kernels are meant for. (The reference backend would also be exact enough, but materialises
# every product and is many times slower.)
def _widened(native, first: int):
    """``native`` (a native kernel) on float32 copies of any float16/bfloat16 tensor arguments, its
    output cast back; ``first`` is the position of the argument whose dtype decides."""
    def run(*args):
        dtype = args[first].dtype
        if dtype not in _HALF:
            return native(*args)
        wide = [a.float() if isinstance(a, Tensor) and a.dtype in _HALF else a for a in args]
        return native(*wide).to(dtype)

    return run


if NATIVE_AVAILABLE:

    @torch.library.register_fake("sparsestart::_native_spmm")
    def _(values, ptr, idx, slot, x, rows, transpose_blocks):
        return x.new_empty(rows, x.shape[1])

    if hasattr(torch.ops.sparsestart, "_native_spmm_bias"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_spmm_bias")
        def _(values, ptr, idx, slot, x, rows, bias):
            return x.new_empty(rows, x.shape[1])

    if hasattr(torch.ops.sparsestart, "_native_spmm_ordered"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_spmm_ordered")
        def _(values, ptr, idx, slot, order, x, rows, transpose_blocks):
            return x.new_empty(rows, x.shape[1])

    @torch.library.register_fake("sparsestart::_native_sddmm")
    def _(ptr, idx, slot, a, b, capacity, block_size):
        return a.new_empty((capacity,) if block_size == 1 else (capacity, block_size, block_size))

    @torch.library.register_fake("sparsestart::_native_conv2d")
    def _(values, ptr, idx, slot, x, kernel_size, padding, dilation, bias=None):
        ho, wo = _conv_sizes(x.shape[2], x.shape[3], kernel_size, padding, dilation)
        return x.new_empty(x.shape[0], ptr.shape[0] - 1, ho, wo)

    @torch.library.register_fake("sparsestart::_native_conv2d_input_grad")
    def _(values, ptr, idx, slot, dy, kernel_size, padding, dilation):
        h = dy.shape[2] + dilation[0] * (kernel_size[0] - 1) - 2 * padding[0]
        w = dy.shape[3] + dilation[1] * (kernel_size[1] - 1) - 2 * padding[1]
        return dy.new_empty(dy.shape[0], (ptr.shape[0] - 1) // (kernel_size[0] * kernel_size[1]), h, w)

    @torch.library.register_fake("sparsestart::_native_conv2d_weight_grad")
    def _(ptr, idx, slot, dy, x, capacity, kernel_size, padding, dilation):
        return dy.new_empty(capacity)

    @torch.library.register_fake("sparsestart::_native_merge_index")
    def _(ptr, idx, slot, keep, new_major, new_minor, new_slot, total):
        return ptr.new_empty(ptr.shape), idx.new_empty(total), slot.new_empty(total)

    @torch.library.register_fake("sparsestart::_native_absent_at_least")
    def _(scores, present, base, threshold):
        n = torch.library.get_ctx().new_dynamic_size()
        return present.new_empty(n), scores.new_empty(n)

    @torch.library.register_fake("sparsestart::_native_sorted_isin")
    def _(values, set):
        return values.new_empty(values.shape, dtype=torch.bool)

    if hasattr(torch.ops.sparsestart, "_native_sorted_distinct"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_sorted_distinct")
        def _(values, n):
            return values.new_empty(torch.library.get_ctx().new_dynamic_size())

        @torch.library.register_fake("sparsestart::_native_absent_at_ranks")
        def _(present, ranks):
            return ranks.new_empty(ranks.numel())

    if hasattr(torch.ops.sparsestart, "_native_kept_keys"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_kept_keys")
        def _(ptr, idx, keep, minor_extent):
            return ptr.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)

    if hasattr(torch.ops.sparsestart, "_native_rewire"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_rewire")
        def _(rowptr, col, slot, colptr, row, slot_t, drop, grow):
            ctx = torch.library.get_ctx()
            total, n_freed, n_new = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
            return [rowptr.new_empty(rowptr.shape), col.new_empty(total), slot.new_empty(total),
                    colptr.new_empty(colptr.shape), row.new_empty(total), slot_t.new_empty(total),
                    slot.new_empty(col.numel() - total), drop.new_empty(n_freed), drop.new_empty(n_new)]

    if hasattr(torch.ops.sparsestart, "_native_top_k"):  # absent from builds before it existed

        @torch.library.register_fake("sparsestart::_native_top_k")
        def _(scores, k, largest):
            return scores.new_empty(min(max(k, 0), scores.numel()), dtype=torch.long)


def _native(name: str):
    return lambda *a: getattr(torch.ops.sparsestart, name)(*a)


registry.register_backend(
    registry.Backend(
        "cpu",
        priority=10,
        spmm=_widened(_native("_native_spmm"), 0),
        sddmm=_widened(_native("_native_sddmm"), 3),
        not_supported_reasons=_cpu_reasons,
        is_available=lambda: NATIVE_AVAILABLE,
        unavailable_reason="the C++ extension sparsestart._C is not built",
        kernels={"conv2d": _widened(_native("_native_conv2d"), 0),
                 # absent from builds before it existed: spmm then adds the bias after the product
                 **({"spmm_bias": _widened(_native("_native_spmm_bias"), 0)}
                    if NATIVE_AVAILABLE and hasattr(torch.ops.sparsestart, "_native_spmm_bias") else {}),
                 "conv2d_input_grad": _widened(_native("_native_conv2d_input_grad"), 0),
                 "conv2d_weight_grad": _widened(_native("_native_conv2d_weight_grad"), 3)},
    )
)
