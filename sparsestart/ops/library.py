"""The op contract: torch.library ops ``sparsestart::spmm``, ``spmm_t`` and ``sddmm``.

For a sparse weight W of shape (M, K) stored as CSR (values [C]) or BSR
(values [C, b, b]) with index (rowptr, col, slot, colptr, row, slot_t) as in
sparsestart/formats/compressed.py, and dense operands feature-major
[features, N] (N = batch or batch * positions):

    spmm(values, rowptr, col, slot, colptr, row, slot_t, x[K, N])   -> Y[M, N]  = W @ x
    spmm_t(values, rowptr, col, slot, colptr, row, slot_t, dy[M, N]) -> dX[K, N] = W^T @ dy
    sddmm(rowptr, col, slot, colptr, row, slot_t, dy[M, N], x[K, N], capacity, block_size)
                                                                      -> dV like values:
        dV[slot of (i, j)] = sum_n dy[i, n] * x[j, n] at stored (i, j), zero in free slots

The CSR format is told apart from BSR by ``values.dim()`` (1 vs 3); every op
takes the whole index so its autograd formula can call the other two (spmm's
input gradient walks the CSC view). Each op has a fake impl for torch.compile and
opcheck; the real impl checks the operands and hands the work to the native
kernel of the backend the registry chooses.

Index contents. The native kernels read ``x[col]``, ``values[slot]`` and the ranges
``rowptr[r]:rowptr[r+1]`` without bounds checks, so a bad index would read (or, for the
gradients, write) out of bounds. The real impl of every public op therefore validates the
index contents (:func:`sparsestart.formats.validation.validate_index`, the check behind
``SparseMatrix.validate()``: pointers from 0, non-decreasing, nnz <= capacity; slot and
slot_t permutations; col/row in range and strictly increasing per row/column; both views
holding the same entries) and raises ValueError naming the op, the tensor, the position,
the bad value and what is allowed. The verdict is cached on ``rowptr`` per structure
version: the key is the version counter and data pointer of all six index tensors (plus
their identity), so a layer whose structure the library maintains pays only a look-up of
those attributes per call (microseconds; bench/index_validation.py), while any in-place
write (``layer.col[3] = 7``, a structure update, ``load_state_dict``) or a different tensor
triggers a new O(nnz) validation, with one host synchronisation on a GPU, before the
kernel runs -- except the index writes of the format itself (``SparseMatrix.replace``, which
every structure update goes through, and the builders): they produce a valid index by
construction from checked coordinates and record the verdict for the versions they leave, so
a RigL/SET update does not pay a whole validation (hundreds of ms on a 4096 x 4096 layer at
density 0.1) on the next forward. Not checked: under torch.compile tracing, fake and meta tensors (they hold no
data; a compiled graph runs this real impl, so the check happens at run time), and an index
first seen during a CUDA graph capture (a host synchronisation is not allowed there: run
the step once eagerly before capturing, as CUDA graphs need anyway). Inference tensors have
no version counter: their index is validated on every call.

Known hole: a write that bypasses the version counter -- through ``.data`` (``layer.col.data[3]
= 7``), through a NumPy view, DLPack or another aliasing that does not share the counter --
leaves the cached verdict in place, and the kernels then trust a bad index. After writing
into an index that way, call ``layer.validate()`` (``SparseMatrix.validate()``) yourself, or
bump the counter (write through the tensor itself, e.g. ``layer.col[3] = 7``).
"""
from __future__ import annotations


import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..formats.validation import known_valid, remember_valid, validate_index
from . import reference, registry, transforms

__all__ = ["spmm", "spmm_t", "sddmm", "conv2d", "conv2d_input_grad", "conv2d_weight_grad"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------- operand checks
# These run on every call (they guard the native kernels against reading out of bounds), so
# the common case is one compound test; only a failing one walks the tensors for the message.
_INDEX_NAMES = ("rowptr", "col", "slot", "colptr", "row", "slot_t")


def _check_index(op: str, values: Tensor | None, index: tuple[Tensor, ...]) -> None:
    rowptr, col, slot, colptr, row, slot_t = index
    idt = rowptr.dtype
    if not ((idt is torch.int32 or idt is torch.int64) and col.dtype is idt and slot.dtype is idt
            and colptr.dtype is idt and row.dtype is idt and slot_t.dtype is idt
            and rowptr.dim() == 1 and col.dim() == 1 and slot.dim() == 1 and colptr.dim() == 1 and row.dim() == 1
            and slot_t.dim() == 1):
        _index_dtype_error(op, index)
    capacity = col.shape[0]
    if slot.shape[0] != capacity or row.shape[0] != capacity or slot_t.shape[0] != capacity:
        raise ValueError(f"sparsestart.{op}: col, slot, row and slot_t must have the capacity's length")
    if values is not None:
        vdim = values.dim()
        if not (vdim == 1 or (vdim == 3 and values.shape[1] == values.shape[2])):
            raise ValueError(f"sparsestart.{op}: values must be [C] (CSR) or [C, b, b] (BSR), got {tuple(values.shape)}")
        if values.shape[0] != capacity:
            raise ValueError(
                f"sparsestart.{op}: values has capacity {values.shape[0]} but the index has {capacity} slots"
            )
        if values.dtype not in _FLOAT_TYPES:
            raise TypeError(f"sparsestart.{op}: values must be a floating dtype, got {values.dtype}")


# Off only for bench/index_validation.py, which measures what the cached check costs per call.
_VALIDATE_INDEX = True


def _check_contents(op: str, index: tuple[Tensor, ...], capacity: int) -> None:
    """Validate the index contents the native kernels will trust, once per structure version (see
    the module docstring); run by the real impls only, after the shape and dtype checks."""
    if not _VALIDATE_INDEX or known_valid(index, capacity) or _unvalidatable(index[0]):
        return
    validate_index(index, capacity=capacity, where=f"sparsestart.{op}: ")
    remember_valid(index, capacity)


def _unvalidatable(t: Tensor) -> bool:
    """Whether ``t``'s data cannot be read here: traced, fake, meta, or in a CUDA graph capture."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, FakeTensor):
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _index_dtype_error(op: str, index: tuple[Tensor, ...]) -> None:
    idt = index[0].dtype
    for name, t in zip(_INDEX_NAMES, index):
        if t.dtype not in (torch.int32, torch.int64) or t.dtype != idt:
            raise TypeError(f"sparsestart.{op}: {name} must be int32 or int64 like rowptr ({idt}), got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"sparsestart.{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    raise AssertionError("unreachable")  # pragma: no cover


def _check_dense(op: str, name: str, t: Tensor, rows: int, like: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"sparsestart.{op}: {name} must be 2-D feature-major [features, N], got shape {tuple(t.shape)}")
    if t.shape[0] != rows:
        raise ValueError(f"sparsestart.{op}: {name} has {t.shape[0]} rows but the sparse weight needs {rows}")
    if t.dtype != like.dtype:
        raise TypeError(f"sparsestart.{op}: {name} has dtype {t.dtype} but the sparse weight has {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"sparsestart.{op}: {name} is on {t.device} but the sparse weight is on {like.device}")


def _dims(values_or_block, rowptr: Tensor, colptr: Tensor) -> tuple[int, int, int]:
    if isinstance(values_or_block, Tensor):
        b = 1 if values_or_block.dim() == 1 else values_or_block.shape[1]
    else:  # a block size (int or SymInt)
        b = values_or_block
    return (rowptr.shape[0] - 1) * b, (colptr.shape[0] - 1) * b, b


# ------------------------------------------------------------------- registration
# The undecorated impl of every op, for the eager fast path below (call_*).
_IMPLS: dict = {}


def _op(name: str):
    """``torch.library.custom_op("sparsestart::<name>")``, keeping the undecorated function in _IMPLS."""
    def register(fn):
        _IMPLS[name] = fn
        return torch.library.custom_op(f"sparsestart::{name}", mutates_args=())(fn)
    return register


# --------------------------------------------------------------------------- spmm
@_op("spmm")
def spmm(values: Tensor, rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor,
         slot_t: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """Y = W @ x (+ bias[M] per output row: the CPU kernels start each row's sums from it, the other
    backends add it to their product)."""
    index = (rowptr, col, slot, colptr, row, slot_t)
    M, K, _ = _check_spmm("spmm", values, index, x, transpose=False)
    _check_bias("spmm", "output row", bias, x, M)
    _check_contents("spmm", index, values.shape[0])
    return _native_spmm(values, rowptr, col, slot, x, M, False, bias)


@spmm.register_fake
def _(values, rowptr, col, slot, colptr, row, slot_t, x, bias=None):
    M, _, _ = _check_spmm("spmm", values, (rowptr, col, slot, colptr, row, slot_t), x, transpose=False)
    _check_bias("spmm", "output row", bias, x, M)
    return x.new_empty(M, x.shape[1])


def _check_bias(op: str, per: str, bias: Tensor | None, x: Tensor, n: int) -> None:
    """A bias must be 1-D with one entry per output row / channel (``per``), in x's dtype and on its device."""
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"sparsestart.{op}: bias must be 1-D with one entry per {per} ({n}), "
                         f"got shape {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"sparsestart.{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"sparsestart.{op}: bias is on {bias.device} but x is on {x.device}")


@_op("spmm_t")
def spmm_t(values: Tensor, rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor,
           slot_t: Tensor, dy: Tensor) -> Tensor:
    index = (rowptr, col, slot, colptr, row, slot_t)
    _, K, _ = _check_spmm("spmm_t", values, index, dy, transpose=True)
    _check_contents("spmm_t", index, values.shape[0])
    return _native_spmm(values, colptr, row, slot_t, dy, K, True)


@spmm_t.register_fake
def _(values, rowptr, col, slot, colptr, row, slot_t, dy):
    _, K, _ = _check_spmm("spmm_t", values, (rowptr, col, slot, colptr, row, slot_t), dy, transpose=True)
    return dy.new_empty(K, dy.shape[1])


def _check_spmm(op, values, index, dense, transpose):
    _check_index(op, values, index)
    M, K, b = _dims(values, index[0], index[3])
    _check_dense(op, "dy" if transpose else "x", dense, M if transpose else K, values)
    device = values.device
    for name, t in zip(_INDEX_NAMES, index):
        if t.device != device:
            raise ValueError(f"sparsestart.{op}: {name} is on {t.device} but values on {device}")
    return M, K, b


@_op("sddmm")
def sddmm(rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor, slot_t: Tensor,
          dy: Tensor, x: Tensor, capacity: int, block_size: int) -> Tensor:
    _check_sddmm(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, block_size)
    _check_contents("sddmm", (rowptr, col, slot, colptr, row, slot_t), capacity)
    return _native_sddmm(rowptr, col, slot, dy, x, capacity, block_size)


@sddmm.register_fake
def _(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, block_size):
    _check_sddmm(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, block_size)
    shape = (capacity,) if block_size == 1 else (capacity, block_size, block_size)
    return dy.new_empty(shape)


def _check_sddmm(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, block_size):
    index = (rowptr, col, slot, colptr, row, slot_t)
    _check_index("sddmm", None, index)
    if block_size < 1:
        raise ValueError(f"sparsestart.sddmm: block_size must be >= 1, got {block_size}")
    if capacity != slot.shape[0]:
        raise ValueError(f"sparsestart.sddmm: capacity={capacity} but the index has {slot.shape[0]} slots")
    M, K, _ = _dims(block_size, rowptr, colptr)
    if dy.dtype not in _FLOAT_TYPES:
        raise TypeError(f"sparsestart.sddmm: dy must be a floating dtype, got {dy.dtype}")
    _check_dense("sddmm", "dy", dy, M, dy)
    _check_dense("sddmm", "x", x, K, dy)
    if x.shape[1] != dy.shape[1]:
        raise ValueError(f"sparsestart.sddmm: dy has N={dy.shape[1]} columns but x has {x.shape[1]}")


# ----------------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])


def _spmm_backward(ctx, grad):
    values, rowptr, col, slot, colptr, row, slot_t, x = ctx.saved_tensors
    # Both kernels need a feature-major contiguous gradient: copy a transposed one once, not twice.
    grad = grad.contiguous()
    index = (rowptr, col, slot, colptr, row, slot_t)
    b = 1 if values.dim() == 1 else values.shape[1]
    dvalues = call_sddmm(*index, grad, x, values.shape[0], b) if ctx.needs_input_grad[0] else None
    dx = call_spmm_t(values, *index, grad) if ctx.needs_input_grad[7] else None
    # The bias is optional: a call through the eager fast path that left it out has 8 inputs, and gets
    # one gradient per input.
    n = len(ctx.needs_input_grad)
    dbias = grad.sum(1) if n > 8 and ctx.needs_input_grad[8] else None
    return (dvalues, None, None, None, None, None, None, dx, dbias)[:n]


def _spmm_t_backward(ctx, grad):
    values, rowptr, col, slot, colptr, row, slot_t, dy = ctx.saved_tensors
    grad = grad.contiguous()
    index = (rowptr, col, slot, colptr, row, slot_t)
    b = 1 if values.dim() == 1 else values.shape[1]
    # dX = W^T dy, so dL/dW_ij = sum_n dy[i, n] * grad[j, n] and dL/ddy = W grad.
    dvalues = call_sddmm(*index, dy, grad, values.shape[0], b) if ctx.needs_input_grad[0] else None
    ddy = call_spmm(values, *index, grad) if ctx.needs_input_grad[7] else None
    return dvalues, None, None, None, None, None, None, ddy


def _sddmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.block_size = inputs[9]


def _sddmm_backward(ctx, grad):
    rowptr, col, slot, colptr, row, slot_t, dy, x = ctx.saved_tensors
    index = (rowptr, col, slot, colptr, row, slot_t)
    ddy = call_spmm(grad, *index, x) if ctx.needs_input_grad[6] else None
    dx = call_spmm_t(grad, *index, dy) if ctx.needs_input_grad[7] else None
    return None, None, None, None, None, None, ddy, dx, None, None


spmm.register_autograd(_spmm_backward, setup_context=_setup)
spmm_t.register_autograd(_spmm_t_backward, setup_context=_setup)
sddmm.register_autograd(_sddmm_backward, setup_context=_sddmm_setup)


# ------------------------------------------------------------------------ conv2d
# Direct sparse convolution, stride 1, CSR weight (the Conv2d weight [Cout, Cin, KH, KW]
# viewed as [Cout, Cin*KH*KW]); x is NCHW. Non-unit strides and BSR weights use the
# unfold + spmm path of SparseConv2d instead.
def _check_conv(op, values, index, t, kernel_size, padding, dilation, t_name, channels_of_t):
    _check_index(op, values, index)
    if values is not None and values.dim() != 1:
        raise ValueError(f"sparsestart.{op}: direct convolution needs a CSR weight (values [C]), "
                         f"got values of shape {tuple(values.shape)}")
    if len(kernel_size) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(f"sparsestart.{op}: kernel_size, padding and dilation need two entries each, got "
                         f"{kernel_size}, {padding}, {dilation}")
    kk = kernel_size[0] * kernel_size[1]
    if kk < 1 or (index[3].shape[0] - 1) % kk:
        # The kernels split a column into (channel, kernel offset): a remainder would address a channel
        # past the input's (conv2d reads there, conv2d_input_grad writes there).
        raise ValueError(f"sparsestart.{op}: colptr has {index[3].shape[0]} entries; the weight's columns "
                         f"({index[3].shape[0] - 1}) must be in_channels * kh * kw for kernel_size {kernel_size}")
    if t.dim() != 4:
        raise ValueError(f"sparsestart.{op}: {t_name} must be 4-D NCHW, got shape {tuple(t.shape)}")
    if t.shape[1] != channels_of_t:
        raise ValueError(f"sparsestart.{op}: {t_name} has {t.shape[1]} channels but the sparse weight needs "
                         f"{channels_of_t}")
    if values is not None and t.dtype != values.dtype:
        raise TypeError(f"sparsestart.{op}: {t_name} has dtype {t.dtype} but the sparse weight has {values.dtype}")


def _conv_sizes(h, w, kernel_size, padding, dilation):
    ho = h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1)
    wo = w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1)
    return ho, wo


@_op("conv2d")
def conv2d(values: Tensor, rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor, slot_t: Tensor,
           x: Tensor, kernel_size: list[int], padding: list[int], dilation: list[int],
           bias: Tensor | None = None) -> Tensor:
    """y = conv(x, W) (+ bias[Cout] per output channel): the kernels add the bias as they write y,
    which saves a pass over y and, under glibc's default malloc, a fresh output buffer per call."""
    index = (rowptr, col, slot, colptr, row, slot_t)
    kk = kernel_size[0] * kernel_size[1]
    _check_conv("conv2d", values, index, x, kernel_size, padding, dilation, "x", (colptr.shape[0] - 1) // kk)
    _check_bias("conv2d", "output channel", bias, x, rowptr.shape[0] - 1)
    _check_contents("conv2d", index, values.shape[0])
    return _run("conv2d", [values, rowptr, x], values.contiguous(), rowptr, col, slot, x.contiguous(),
                kernel_size, padding, dilation, bias)


@conv2d.register_fake
def _(values, rowptr, col, slot, colptr, row, slot_t, x, kernel_size, padding, dilation, bias=None):
    kk = kernel_size[0] * kernel_size[1]
    _check_conv("conv2d", values, (rowptr, col, slot, colptr, row, slot_t), x, kernel_size, padding, dilation, "x",
                (colptr.shape[0] - 1) // kk)
    _check_bias("conv2d", "output channel", bias, x, rowptr.shape[0] - 1)
    ho, wo = _conv_sizes(x.shape[2], x.shape[3], kernel_size, padding, dilation)
    return x.new_empty(x.shape[0], rowptr.shape[0] - 1, ho, wo)


@_op("conv2d_input_grad")
def conv2d_input_grad(values: Tensor, rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor,
                      slot_t: Tensor, dy: Tensor, kernel_size: list[int], padding: list[int],
                      dilation: list[int]) -> Tensor:
    index = (rowptr, col, slot, colptr, row, slot_t)
    _check_conv("conv2d_input_grad", values, index, dy, kernel_size, padding, dilation, "dy", rowptr.shape[0] - 1)
    _check_contents("conv2d_input_grad", index, values.shape[0])
    return _run("conv2d_input_grad", [values, colptr, dy], values.contiguous(), colptr, row, slot_t,
                dy.contiguous(), kernel_size, padding, dilation)


@conv2d_input_grad.register_fake
def _(values, rowptr, col, slot, colptr, row, slot_t, dy, kernel_size, padding, dilation):
    _check_conv("conv2d_input_grad", values, (rowptr, col, slot, colptr, row, slot_t), dy, kernel_size, padding,
                dilation, "dy", rowptr.shape[0] - 1)
    h = dy.shape[2] + dilation[0] * (kernel_size[0] - 1) - 2 * padding[0]
    w = dy.shape[3] + dilation[1] * (kernel_size[1] - 1) - 2 * padding[1]
    return dy.new_empty(dy.shape[0], (colptr.shape[0] - 1) // (kernel_size[0] * kernel_size[1]), h, w)


@_op("conv2d_weight_grad")
def conv2d_weight_grad(rowptr: Tensor, col: Tensor, slot: Tensor, colptr: Tensor, row: Tensor, slot_t: Tensor,
                       dy: Tensor, x: Tensor, capacity: int, kernel_size: list[int], padding: list[int],
                       dilation: list[int]) -> Tensor:
    _check_conv_weight_grad(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, kernel_size, padding, dilation)
    _check_contents("conv2d_weight_grad", (rowptr, col, slot, colptr, row, slot_t), capacity)
    return _run("conv2d_weight_grad", [dy, rowptr, x], rowptr, col, slot, dy.contiguous(), x.contiguous(), capacity,
                kernel_size, padding, dilation)


@conv2d_weight_grad.register_fake
def _(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, kernel_size, padding, dilation):
    _check_conv_weight_grad(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, kernel_size, padding, dilation)
    return dy.new_empty(capacity)


def _check_conv_weight_grad(rowptr, col, slot, colptr, row, slot_t, dy, x, capacity, kernel_size, padding, dilation):
    index = (rowptr, col, slot, colptr, row, slot_t)
    kk = kernel_size[0] * kernel_size[1]
    _check_conv("conv2d_weight_grad", None, index, x, kernel_size, padding, dilation, "x", (colptr.shape[0] - 1) // kk)
    _check_conv("conv2d_weight_grad", None, index, dy, kernel_size, padding, dilation, "dy", rowptr.shape[0] - 1)
    if capacity != slot.shape[0]:
        raise ValueError(f"sparsestart.conv2d_weight_grad: capacity={capacity} but the index has {slot.shape[0]} slots")
    if dy.dtype != x.dtype:
        raise TypeError(f"sparsestart.conv2d_weight_grad: dy has dtype {dy.dtype} but x has {x.dtype}")
    if tuple(dy.shape[2:]) != _conv_sizes(x.shape[2], x.shape[3], kernel_size, padding, dilation) or \
            dy.shape[0] != x.shape[0]:
        raise ValueError(f"sparsestart.conv2d_weight_grad: dy of shape {tuple(dy.shape)} does not match x of shape "
                         f"{tuple(x.shape)} under kernel {kernel_size}, padding {padding}, dilation {dilation}")


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.geometry = inputs[8:11]


def _conv_backward(ctx, grad):
    values, rowptr, col, slot, colptr, row, slot_t, x = ctx.saved_tensors
    index = (rowptr, col, slot, colptr, row, slot_t)
    grad = grad.contiguous()
    dvalues = (call_conv2d_weight_grad(*index, grad, x, values.shape[0], *ctx.geometry)
               if ctx.needs_input_grad[0] else None)
    dx = call_conv2d_input_grad(values, *index, grad, *ctx.geometry) if ctx.needs_input_grad[7] else None
    # The bias is optional: a call through the eager fast path that left it out has 11 inputs, and
    # gets one gradient per input.
    n = len(ctx.needs_input_grad)
    dbias = grad.sum((0, 2, 3)) if n > 11 and ctx.needs_input_grad[11] else None
    return (dvalues, None, None, None, None, None, None, dx, None, None, None, dbias)[:n]


conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------------ eager fast path
# An eager call through torch.ops.sparsestart.* walks the dispatcher and torch.library's Python
# autograd wrapper (autograd_impl, fill_defaults, redispatch, a dynamo-disable frame) before it
# reaches the impl: ~70 us of host time per spmm forward+backward on the CPU, more than the kernel
# of a small layer, and on a GPU host time is what bounds a training step. call_<op> runs the same
# impl (every check included) directly -- wrapped in a torch.autograd.Function with the op's own
# setup_context and backward when a gradient is needed -- whenever nothing the dispatcher would add
# is active; otherwise it calls the op. Bypassing the dispatcher is only correct when none of these
# is in play: torch.compile / make_fx tracing, a dispatch mode (FakeTensorMode, FlopCounterMode,
# ...), a torch-function mode, a functorch transform (vmap, grad, ...), jit tracing, tensor
# subclasses or meta tensors. Autocast (CPU, CUDA) is done here as the op's Autocast kernel does it
# (the same casts, the impl run with that autocast key excluded), because mixed-precision training
# is where host time matters most. The backward formulas call call_<op> as well, so a backward
# taken with create_graph=True stays differentiable.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
# Off only for bench/host_overhead.py, which measures what the fast path saves per call.
_FAST_PATH = True


def _dispatcher_needed(tensors) -> bool:
    """Whether a call on ``tensors`` must go through the op (see above)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or
            torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.jit.is_tracing()):
        return True
    for t in tensors:
        if type(t) not in _PLAIN_TYPES or t.is_meta:  # meta tensors take the op's fake impl
            return True
    device_type = tensors[0].device.type
    return device_type not in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type)


# What the op's Autocast kernels exclude while they run it (see the autocast section below).
_AUTOCAST_KEYS = {d: torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + d.upper()))
                  for d in ("cpu", "cuda")}


def _caller(name: str, op, differentiable: tuple, setup=None, backward=None, bias_shape=None):
    """call_<name>: the eager fast path of op ``name``; ``differentiable`` are the positions of the tensor
    arguments that can carry gradients (the values/dense operands), ``setup``/``backward`` the op's
    autograd formulas (None for an op without autograd: a call needing gradients then takes the op,
    which raises as it always did), ``bias_shape`` the view of the bias (the last differentiable position) that
    broadcasts it over the output, for forward mode. Under a torch.func transform it takes
    :func:`sparsestart.ops.transforms.transform_function`."""
    impl = _IMPLS[name]
    function = None
    if backward is not None:
        def forward(ctx, *args):
            # ctx-style forward, not a separate setup_context: with one, Function.apply binds the
            # arguments through inspect.signature on every call (~50 us).
            output = impl(*args)
            setup(ctx, args, output)
            return output
        function = type(f"_{name.title().replace('_', '')}Function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def run(args, operands):
        if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
            return op(*args) if function is None else function.apply(*args)
        return impl(*args)

    def call(*args):
        # The differentiable tensors passed (an optional one, like conv2d's bias, may be None or absent).
        operands = [args[i] for i in differentiable if i < len(args) and args[i] is not None]
        first = operands[0]
        if not _FAST_PATH or _dispatcher_needed(operands):
            if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
                return transform_function.apply(*transforms.wrapped(args))  # a torch.func transform (eager)
            return op(*args)
        device_type = first.device.type
        if device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS[device_type]):
                cast = [_autocast_cast(a, device_type, dtype) for a in args]
                return run(cast, [cast[i] for i in differentiable if i < len(cast) and cast[i] is not None])
        return run(args, operands)
    call.__name__ = call.__qualname__ = f"call_{name}"
    call.__doc__ = f"torch.ops.sparsestart.{name}(*args), by the eager fast path when nothing needs the dispatcher."
    transform_function = transforms.transform_function(name, op, setup, backward, differentiable, bias_shape, call)
    return call


call_spmm = _caller("spmm", spmm, (0, 7, 8), _setup, _spmm_backward, bias_shape=(-1, 1))
call_spmm_t = _caller("spmm_t", spmm_t, (0, 7), _setup, _spmm_t_backward)
call_sddmm = _caller("sddmm", sddmm, (6, 7), _sddmm_setup, _sddmm_backward)
call_conv2d = _caller("conv2d", conv2d, (0, 7, 11), _conv_setup, _conv_backward, bias_shape=(1, -1, 1, 1))
call_conv2d_input_grad = _caller("conv2d_input_grad", conv2d_input_grad, (0, 7))
call_conv2d_weight_grad = _caller("conv2d_weight_grad", conv2d_weight_grad, (6, 7))


# ----------------------------------------------------------------------- autocast
# Under torch.autocast(device_type, dtype) the public ops run in the autocast dtype, as
# torch's matmuls and convolutions do: their floating operands on that device type (the fp32
# ``values`` Parameter and the activations; never float64) are cast to torch.get_autocast_dtype
# (bfloat16, or float16 on CUDA), and the op runs with autocast switched off for it. The
# kernels accumulate in float32, the output is in the autocast dtype, and the casts are
# recorded by autograd, so ``values.grad`` (computed in the autocast dtype by sddmm) arrives in
# float32: fp32 master weights and optimizer state, as with nn.Linear under autocast.
#
# Why a dispatcher kernel (AutocastCPU / AutocastCUDA) rather than torch.library.register_autocast
# or a cast inside SparseLinear: register_autocast fixes one dtype per device at registration
# (we need the dtype of the enclosing autocast region, fp16 or bf16), and a cast in the modules
# would leave the raw ops (ops.matmul, torch.ops.sparsestart.*) outside autocast. The kernel is
# what register_autocast itself installs (a Python kernel at the autocast key that casts and
# re-dispatches below it), only reading the dtype at call time; torch.compile traces through it
# like through torch's own autocast rules (tests/ops/test_autocast.py), and opcheck is unaffected
# (autocast keys are excluded outside autocast regions).
AUTOCAST_OPS = ("spmm", "spmm_t", "sddmm", "conv2d", "conv2d_input_grad", "conv2d_weight_grad")


def _autocast_cast(arg, device_type: str, dtype: torch.dtype):
    if isinstance(arg, Tensor) and arg.is_floating_point() and arg.dtype is not torch.float64 \
            and arg.device.type == device_type:
        return arg.to(dtype)
    return arg


def _autocast_kernel(op, device_type: str, dispatch_key):
    excluded = torch._C.DispatchKeySet(dispatch_key)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*[_autocast_cast(a, device_type, dtype) for a in args])

    return kernel


_autocast_lib = torch.library.Library("sparsestart", "IMPL")
for _device_type in ("cpu", "cuda"):
    _key = "Autocast" + _device_type.upper()
    for _name in AUTOCAST_OPS:
        _autocast_lib.impl(_name, _autocast_kernel(getattr(torch.ops.sparsestart, _name).default, _device_type,
                                                   getattr(torch._C.DispatchKey, _key)), _key, with_keyset=True)


# ----------------------------------------------------------------------- backends
def _run(op, probe, *args):
    """Run native kernel ``op`` on the backend the registry picks for the ``probe`` tensors
    (the values/dense operand first: their dtype and device decide)."""
    return registry.choose(op, probe).kernel(op)(*args)


def _native_spmm(values, ptr, idx, slot, x, rows, transpose_blocks, bias=None):
    x = x.contiguous()
    backend = registry.choose("spmm", [values, ptr, x])
    if bias is None:
        return backend.spmm(values.contiguous(), ptr, idx, slot, x, rows, transpose_blocks)
    fused = None if transpose_blocks else backend.kernels.get("spmm_bias")
    if fused is not None:  # the bias as the sums' starting value (CPU)
        return fused(values.contiguous(), ptr, idx, slot, x, rows, bias.contiguous())
    return backend.spmm(values.contiguous(), ptr, idx, slot, x, rows, transpose_blocks).add_(bias.view(-1, 1))


def _native_sddmm(ptr, idx, slot, a, b, capacity, block_size):
    a, b = a.contiguous(), b.contiguous()
    backend = registry.choose("sddmm", [a, ptr, b])
    return backend.sddmm(ptr, idx, slot, a, b, capacity, block_size)


registry.register_backend(
    registry.Backend("reference", priority=0, spmm=reference.native_spmm, sddmm=reference.native_sddmm,
                     kernels=reference.unfold_conv_kernels(reference.native_spmm, reference.native_sddmm))
)
