"""SparseLinear: a drop-in torch.nn.Linear that stores only its nonzeros."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.library import _dispatcher_needed
from .build import _generator, _weight_to_matrix
from .layer import SparseLayer

__all__ = ["SparseLinear", "LINEAR_ALGORITHMS"]

#: SparseLinear.linear_algorithm values. "sparse": the sparse product (spmm, feature-major);
#: "dense": the stored weights scattered into a transient dense weight for F.linear (the gradient
#: still reaches the stored values only), for saturated layers such as the classifiers ERK leaves at
#: density 1. "auto" (the default) measures both on the first call for each input shape, density
#: bucket, thread count ... and keeps the faster (sparsestart.nn.autotune); with tuning off, and
#: under torch.compile for a call not measured eagerly, it uses the rule "heuristic" names, which is
#: "sparse" always (what SparseLinear did before the dense path existed: no threshold has been
#: measured for it yet). "sparse" and "dense" force one (nothing is timed).
LINEAR_ALGORITHMS = ("auto", "heuristic", "sparse", "dense")


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives x's matmuls, or None when autocast is off on x's device type or
    leaves x alone (float64, or already in the autocast dtype)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if x.dtype in (dtype, torch.float64) or not x.is_floating_point() else dtype


class _SampleMajor(torch.autograd.Function):
    """y_fm [M, N] (contiguous, feature-major) as y [*lead, M] (prod(lead) = N) over the same memory
    (strides: lead's contiguous strides, then N), as a tensor of its own rather than a view.

    Why: with ``y_fm.t()`` the layer's output is a view, and an in-place op on it -- the
    ``nn.ReLU(inplace=True)`` of every torchvision-style model -- makes autograd rebase the view
    (CopySlices): its backward clones and strides the whole gradient. An MLP 784-4096-4096-10
    training step at ERK 0.01 took 19.3 ms with in-place ReLUs against 11.1 ms without. A tensor
    set to y_fm's storage is no view, so the in-place op is an ordinary one. Safe because nothing
    else holds y_fm (the product's backward saves its inputs, never its output): a write to y that
    y_fm's version counter does not see cannot reach a saved tensor.
    """

    @staticmethod
    def forward(ctx, y_fm: torch.Tensor, lead: tuple) -> torch.Tensor:
        m, n = y_fm.shape
        strides = [n]  # the feature dimension; before it lead's contiguous strides
        step = 1
        for size in reversed(lead):
            strides.insert(0, step)
            step *= size
        return y_fm.new_empty(0).set_(y_fm.untyped_storage(), y_fm.storage_offset(), (*lead, m), strides)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.reshape(-1, grad.shape[-1]).t(), None


def _sample_major(y_fm: torch.Tensor, lead: tuple) -> torch.Tensor:
    """y_fm [M, N] as [*lead, M] without copying: through _SampleMajor when autograd records the call
    in eager mode, else (no gradient, torch.compile, tracing, functorch transforms, subclasses) the
    transposed view, where an in-place op costs nothing extra or is handled by the tracer."""
    if (torch.is_grad_enabled() and y_fm.requires_grad and y_fm.is_contiguous() and y_fm.dim() == 2
            and type(y_fm) is torch.Tensor and not _dispatcher_needed([y_fm])):
        return _SampleMajor.apply(y_fm, tuple(lead))
    y = y_fm.t()
    return y if len(lead) == 1 else y.reshape(*lead, y_fm.shape[0])


class SparseLinear(SparseLayer):
    """y = x W^T + b with a sparse W of shape (out_features, in_features).

    Arguments as :class:`torch.nn.Linear`, plus:
      density     fraction of weights kept, in (0, 1]; an ER structure with exactly
                  round(density * numel) entries (blocks for BSR) is sampled
      format      "csr" (unstructured) or "bsr" (square blocks of ``block_size``)
      capacity    number of value slots (>= nnz) to leave room for regrowth
      exact       False: keep each weight independently with probability density
      seed        seed of the structure and initial values (None: torch's global RNG)
      init_fan_in "dense" (torch's init) or "kept" (scale by each unit's kept fan-in)

    The attribute ``linear_algorithm`` chooses how it is computed (see LINEAR_ALGORITHMS): "auto"
    (default: measured per input shape by :mod:`sparsestart.nn.autotune`), "heuristic" (always
    "sparse"), or "sparse", "dense" forced.
    """

    #: See LINEAR_ALGORITHMS (a class attribute too, so that layers pickled before it existed have it).
    linear_algorithm = "auto"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float,
                 format: str = "csr", block_size: Optional[int] = None, capacity: Optional[int] = None,
                 exact: bool = True, seed: Optional[int] = None, init_fan_in: str = "dense", device=None,
                 dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_structure(density, format, block_size, capacity, exact, seed, init_fan_in, device, dtype)
        self._init_bias(out_features, bias, device, dtype, _generator(None if seed is None else seed + 1, device))

    @property
    def fan_in(self) -> int:
        return self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: input's last dimension must be in_features={self.in_features}, "
                             f"got input of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The bias goes into the product: the sparse kernels start each output row's sums from it, the
        # dense GEMM adds it in its epilogue (no pass of its own over the output).
        # The output in the input's leading dimensions straight from the product (no reshape after
        # it: a view, on which an in-place op costs what _SampleMajor avoids).
        return self._linear(self._algorithm(x2), self.values, x2, self.bias, lead)

    def _linear(self, algorithm: str, values: torch.Tensor, x2: torch.Tensor,
                bias: Optional[torch.Tensor] = None, lead: Optional[tuple] = None) -> torch.Tensor:
        """x2 [N, in_features] times the weight made of ``values`` (+ ``bias``) by ``algorithm``, as
        [*lead, out_features] (lead: the input's leading dimensions, prod(lead) = N; default (N,))."""
        lead = tuple(x2.shape[:1]) if lead is None else tuple(lead)
        if algorithm == "dense":
            x_in = x2 if len(lead) == 1 else x2.reshape(*lead, x2.shape[1])
            return F.linear(x_in, self._dense_weight_of(values), bias)
        # Feature-major in, feature-major out: one transpose each way. The input is made
        # contiguous here, before the op, so autograd saves the feature-major copy and the
        # backward's sddmm does not transpose it a second time (a no-op when x comes from a
        # previous sparse layer: its output is already a transposed view of a feature-major tensor).
        xt = x2.t()
        dtype = _autocast_dtype(xt)
        # Under autocast the op would cast x itself; casting here makes it one copy with the transpose.
        xt = xt.contiguous() if dtype is None else xt.to(dtype, memory_format=torch.contiguous_format)
        return _sample_major(self._matmul(xt, values, bias), lead)

    def _algorithm(self, x2: torch.Tensor) -> str:
        """The algorithm for this call on the flattened input x2: ``linear_algorithm`` unless "auto" or
        "heuristic" (see LINEAR_ALGORITHMS)."""
        choice = self.linear_algorithm
        if choice not in LINEAR_ALGORITHMS:
            raise ValueError(f"SparseLinear: linear_algorithm must be one of {LINEAR_ALGORITHMS}, got {choice!r}")
        if choice not in ("auto", "heuristic"):
            return choice
        if choice == "heuristic":
            return "sparse"
        return self._tuned_algorithm("linear", x2, "sparse", ("sparse", "dense"), self._linear,
                                     weight=self.weight_shape, input=tuple(x2.shape))

    @classmethod
    def from_dense(cls, module: nn.Linear, mask: Optional[torch.Tensor] = None, density: Optional[float] = None, *,
                   format: str = "csr", block_size: Optional[int] = None, capacity: Optional[int] = None,
                   exact: bool = True, seed: Optional[int] = None) -> "SparseLinear":
        """Keep ``module``'s weights at ``mask`` (bool, weight-shaped), or at an ER sample of ``density``,
        or, with neither, at its nonzero weights. The bias is copied."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
        self = cls.__new__(cls)
        SparseLayer.__init__(self)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.weight_shape = tuple(module.weight.shape)
        self._set_structure(_weight_to_matrix(self.matrix_shape, module.weight, mask, density, format, block_size,
                                              capacity, exact, seed))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return self

    def to_dense(self) -> nn.Linear:
        """A torch.nn.Linear whose weight is the masked dense weight."""
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                      device=self.values.device, dtype=self.values.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._sparsity_repr())
