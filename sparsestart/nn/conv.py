"""SparseConv2d: a drop-in torch.nn.Conv2d (groups=1) that stores only its nonzeros, and the choice
of the algorithm that computes it."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.library import call_conv2d
from .build import _generator, _weight_to_matrix
from .layer import SparseLayer

__all__ = ["SparseConv2d", "CONV_ALGORITHMS"]

#: SparseConv2d.conv_algorithm values. "direct": the direct sparse convolution (stride 1, CSR);
#: "unfold": im2col + spmm (any stride, CSR or BSR); "dense": the stored weights scattered into a
#: transient dense kernel for torch's convolution, for nearly dense layers. "auto" (the default)
#: measures the valid ones on the first call for each input shape, density bucket, thread count ...
#: and keeps the fastest (sparsestart.nn.autotune); with tuning off (SPARSESTART_AUTOTUNE=0,
#: autotune.set_enabled(False)), and under torch.compile for a call not measured eagerly, it uses the
#: threshold rule that "heuristic" names: dense when density >= DENSE_COMPUTE_DENSITY and fan-in >=
#: DENSE_COMPUTE_MIN_FAN_IN, else direct when possible, unless an output plane spans < DIRECT_MIN_PLANE
#: padded elements at density >= UNFOLD_MIN_DENSITY, else unfold. "direct", "unfold" and "dense" force
#: one (nothing is timed). Thresholds from the VGG-11 layers (batch 64, forward+backward,
#: 2 threads; `python -m bench --suites convalgo` measures every algorithm on every layer against
#: nn.Conv2d, table in docs/benchmarks.md; run of 2026-11-29): at ERK 0.1 the 64->128 conv (density
#: 0.495) takes 27.0 ms direct and 17.6 ms dense, at 0.244 both take 17.7 ms, the 3->64 input conv
#: (fan-in 27) is faster direct even at density 1 (6.9 vs 7.4 ms); the 512->512 convs on 2x2 maps
#: (planes of 2 x 4) take 13.6 ms direct (samples grouped, csrc/cpu/conv.cpp) and 9.6 ms unfolded at
#: density 0.08, but 2.9 ms direct and 6.9 ms unfolded at 0.008.
CONV_ALGORITHMS = ("auto", "heuristic", "direct", "unfold", "dense")
DENSE_COMPUTE_DENSITY = 0.4
DENSE_COMPUTE_MIN_FAN_IN = 64
DIRECT_MIN_PLANE = 16
UNFOLD_MIN_DENSITY = 0.03


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(isinstance(i, bool) or not isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


class SparseConv2d(SparseLayer):
    """2-D convolution with a sparse weight (out_channels, in_channels, kh, kw).

    Arguments as :class:`torch.nn.Conv2d` (groups must be 1) plus the sparsity
    arguments of :class:`SparseLinear`. The weight is stored as the matrix
    (out_channels, in_channels * kh * kw); the input is unfolded (im2col) into the
    feature-major layout [in_channels * kh * kw, batch * positions].

    The attribute ``conv_algorithm`` chooses how it is computed (see CONV_ALGORITHMS): "auto"
    (default: measured per input shape by :mod:`sparsestart.nn.autotune`), "heuristic" (the
    threshold rule), or "direct", "unfold", "dense" forced.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding: Union[int, str, Sequence[int]] = 0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, density: float,
                 format: str = "csr", block_size: Optional[int] = None, capacity: Optional[int] = None,
                 exact: bool = True, seed: Optional[int] = None, init_fan_in: str = "dense", device=None, dtype=None):
        super().__init__()
        self._configure(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_structure(density, format, block_size, capacity, exact, seed, init_fan_in, device, dtype)
        self._init_bias(out_channels, bias, device, dtype, _generator(None if seed is None else seed + 1, device))

    def _configure(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode):
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if groups != 1:
            raise NotImplementedError(f"SparseConv2d supports groups=1 only, got groups={groups}; "
                                      f"exclude grouped/depthwise convolutions from sparsify")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be non-negative (as in torch.nn.Conv2d), got {padding!r}")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError(f"kernel_size, stride and dilation must be positive, got {self.kernel_size}, "
                             f"{self.stride}, {self.dilation}")
        self.groups, self.padding_mode = groups, padding_mode
        self.weight_shape = (out_channels, in_channels, *self.kernel_size)
        # "auto" measures per input shape, "heuristic" applies the thresholds (see CONV_ALGORITHMS);
        # "direct", "unfold" or "dense" force one.
        self.conv_algorithm = "auto"

    @property
    def fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as F.pad takes it."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d: input must be [N, {self.in_channels}, H, W] (or unbatched), "
                             f"got shape {tuple(x.shape)}")
        pad = self._explicit_padding()
        h, w = x.shape[2] + pad[2] + pad[3], x.shape[3] + pad[0] + pad[1]
        ho, wo = self._output_size(h, w, (0, 0))
        if ho <= 0 or wo <= 0:  # before the algorithm choice: the autotuner would run the candidates on it
            kh, kw = self.kernel_size
            raise ValueError(f"SparseConv2d: input of spatial size {(h, w)} (after padding) is smaller than the "
                             f"dilated kernel {(self.dilation[0] * (kh - 1) + 1, self.dilation[1] * (kw - 1) + 1)}")
        y = self._conv(self._algorithm(x, pad), self.values, x, self.bias)
        return y.squeeze(0) if unbatched else y

    def _conv(self, algorithm: str, values: torch.Tensor, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The convolution of the batched input ``x`` with ``values`` in this layer's structure, plus
        ``bias`` if given, computed by ``algorithm`` (the forward uses the layer's values and bias, the
        autotuner detached copies of the values and no bias). The direct and dense kernels add the bias
        as they write the output: a separate ``y + bias`` costs a pass over y and, under glibc's default
        malloc, a fresh page-faulted buffer of y's size (measured ~1-3 ms per call on a 16 MB output)."""
        pad = self._explicit_padding()
        if algorithm in ("direct", "dense") and self.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
            conv_padding, pad = [pad[2], pad[0]], (0, 0, 0, 0)  # the kernel pads symmetrically itself
        else:
            conv_padding = [0, 0]
        if any(pad):
            x = F.pad(x, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        n, _, h, w = x.shape
        ho, wo = self._output_size(h, w, conv_padding)
        if algorithm == "direct":
            # Stride 1 and CSR: direct sparse convolution, no unfolded input in memory.
            return call_conv2d(values, *self._index(), x, list(self.kernel_size), conv_padding, list(self.dilation),
                               bias)
        if algorithm == "dense":
            # Nearly dense layers: torch's dense convolution on the transient dense kernel.
            return F.conv2d(x, self._dense_weight_of(values), bias, self.stride, conv_padding, self.dilation)
        y = self._unfolded_conv(values, x, n, ho, wo)
        return y if bias is None else self._add_bias(y, bias.view(1, -1, 1, 1))

    def _output_size(self, h: int, w: int, padding) -> tuple[int, int]:
        (kh, kw), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        return ((h + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1, (w + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1)

    def _algorithm(self, x: torch.Tensor, pad) -> str:
        """The algorithm for this call: ``conv_algorithm`` unless "auto" or "heuristic" (see CONV_ALGORITHMS)."""
        choice = self.conv_algorithm
        if choice not in CONV_ALGORITHMS:
            raise ValueError(f"SparseConv2d: conv_algorithm must be one of {CONV_ALGORITHMS}, got {choice!r}")
        direct_ok = self.stride == (1, 1) and self.values.dim() == 1
        if choice == "direct" and not direct_ok:
            raise ValueError("SparseConv2d: conv_algorithm='direct' needs stride 1 and format 'csr'; "
                             f"this layer has stride {self.stride} and format {self.format!r}")
        if choice not in ("auto", "heuristic"):
            return choice
        rule = self._heuristic(x, pad, direct_ok)
        if choice == "heuristic":
            return rule
        valid = ("direct", "unfold", "dense") if direct_ok else ("unfold", "dense")
        return self._tuned_algorithm("conv2d", x, rule, valid, self._conv, weight=self.weight_shape,
                                     stride=self.stride, padding=tuple(pad), dilation=self.dilation,
                                     padding_mode=self.padding_mode, input=tuple(x.shape))

    def _heuristic(self, x: torch.Tensor, pad, direct_ok: bool) -> str:
        """The threshold rule of conv_algorithm="heuristic" (see CONV_ALGORITHMS)."""
        density = self._choice_density()
        if density >= DENSE_COMPUTE_DENSITY and self.fan_in >= DENSE_COMPUTE_MIN_FAN_IN:
            return "dense"
        if direct_ok:
            # The direct kernel runs along flattened padded rows (Ho x padded width per output
            # plane), so a plane shorter than one vector wastes most lanes for every stored weight;
            # im2col + spmm vectorises over batch x positions instead but pays a fixed unfolding
            # cost, which only pays off above a few percent density.
            ho, _ = self._output_size(x.shape[2] + pad[2] + pad[3], x.shape[3], (0, 0))
            if ho * (x.shape[3] + pad[0] + pad[1]) >= DIRECT_MIN_PLANE or density < UNFOLD_MIN_DENSITY:
                return "direct"
        return "unfold"

    def _unfolded_conv(self, values: torch.Tensor, x: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
        """Strided or BSR convolution: unfold (im2col) to [Cin*kh*kw, n*ho*wo], then spmm."""
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # [n, C*kh*kw, L]
        xt = cols.transpose(0, 1).reshape(cols.shape[1], n * ho * wo)
        y = self._matmul(xt, values).view(self.out_channels, n, ho * wo).transpose(0, 1)
        if torch.compiler.is_compiling():
            # Compiled, the output is made contiguous: the batch-inner layout of the view below made the
            # compiled backward of a following BatchNorm2d fail (its traced output strides followed the
            # input's, the kernel's at run time did not, and the view that undoes this reshape in backward
            # was traced as valid: "view size is not compatible", ResNet-20 under torch.compile).
            return y.reshape(n, self.out_channels, ho, wo).contiguous()
        return y.reshape(n, self.out_channels, ho, wo)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask: Optional[torch.Tensor] = None, density: Optional[float] = None, *,
                   format: str = "csr", block_size: Optional[int] = None, capacity: Optional[int] = None,
                   exact: bool = True, seed: Optional[int] = None) -> "SparseConv2d":
        """As :meth:`SparseLinear.from_dense`, for a torch.nn.Conv2d (groups=1)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be a torch.nn.Conv2d, got {type(module).__name__}")
        self = cls.__new__(cls)
        SparseLayer.__init__(self)
        self._configure(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                        module.dilation, module.groups, module.padding_mode)
        self._set_structure(_weight_to_matrix(self.matrix_shape, module.weight, mask, density, format, block_size,
                                              capacity, exact, seed))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return self

    def to_dense(self) -> nn.Conv2d:
        """A torch.nn.Conv2d whose weight is the masked dense weight."""
        return self._filled(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                      self.padding, self.dilation, self.groups, self.bias is not None,
                                      self.padding_mode, device=self.values.device, dtype=self.values.dtype))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", bias={self.bias is not None}, " + self._sparsity_repr()
