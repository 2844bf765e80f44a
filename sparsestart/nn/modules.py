"""SparseLinear and SparseConv2d: drop-in layers that store only their nonzeros.

Each layer owns exactly two parameters, ``values`` (the slot-indexed nonzeros,
[C] for CSR or [C, b, b] for BSR) and ``bias``; the index (rowptr, col, slot,
colptr, row, slot_t) lives in buffers. ``sparse_weight`` returns a
:class:`~sparsestart.formats.SparseMatrix` over these very tensors, so a
structure update made through it (drop/grow) is seen by the layer at once.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..formats import BSR, CSR, SparseMatrix
from ..formats.compressed import per_version
from ..init.sampling import check_density, er_indices

__all__ = ["SparseLayer", "SparseLinear", "SparseConv2d"]

_INDEX_NAMES = ("rowptr", "col", "slot", "colptr", "row", "slot_t")

#: SparseConv2d.conv_algorithm values. "direct": the direct sparse convolution (stride 1, CSR);
#: "unfold": im2col + spmm (any stride, CSR or BSR); "dense": the stored weights scattered into a
#: transient dense kernel for torch's convolution, for nearly dense layers; "auto" chooses per call:
#: dense when density >= DENSE_COMPUTE_DENSITY and fan-in >= DENSE_COMPUTE_MIN_FAN_IN, else direct
#: when possible, unless an output plane spans < DIRECT_MIN_PLANE padded elements at density >=
#: UNFOLD_MIN_DENSITY, else unfold. Thresholds from the VGG-11 layers (batch 64, forward+backward,
#: 2 threads; `python -m bench --suites convalgo` measures every algorithm on every layer against
#: nn.Conv2d, table in docs/benchmarks.md; run of 2026-11-29): at ERK 0.1 the 64->128 conv (density
#: 0.495) takes 27.0 ms direct and 17.6 ms dense, at 0.244 both take 17.7 ms, the 3->64 input conv
#: (fan-in 27) is faster direct even at density 1 (6.9 vs 7.4 ms); the 512->512 convs on 2x2 maps
#: (planes of 2 x 4) take 13.6 ms direct (samples grouped, csrc/cpu/conv.cpp) and 9.6 ms unfolded at
#: density 0.08, but 2.9 ms direct and 6.9 ms unfolded at 0.008.
CONV_ALGORITHMS = ("auto", "direct", "unfold", "dense")
DENSE_COMPUTE_DENSITY = 0.4
DENSE_COMPUTE_MIN_FAN_IN = 64
DIRECT_MIN_PLANE = 16
UNFOLD_MIN_DENSITY = 0.03
_FORMATS = ("csr", "bsr")


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives x's matmuls, or None when autocast is off on x's device type or
    leaves x alone (float64, or already in the autocast dtype)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if x.dtype in (dtype, torch.float64) or not x.is_floating_point() else dtype


def _real_number(v, name: str):
    """``v`` as a Python float when it is a real number of another kind (a numpy scalar, a 0-d real
    tensor), else ``v`` itself for check_density to judge; TypeError for what is not a real number."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a real number in (0, 1], got {v!r}")
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be a real number in (0, 1], got a tensor of shape {tuple(v.shape)} "
                            f"and dtype {v.dtype}")
        if v.is_meta:
            raise TypeError(f"{name} must be a real number in (0, 1], got a meta tensor (it has no value)")
        return float(v.item())
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, numbers.Real):  # numpy scalars, fractions, decimals
        return float(v)
    raise TypeError(f"{name} must be a real number in (0, 1], got {v!r}")


def _refuse_meta(device) -> None:
    """Construction samples the sparse structure, which needs real tensors: refuse the meta device
    (given, or the default device, e.g. inside ``with torch.device("meta")``) before any sampling."""
    dev = torch.get_default_device() if device is None else torch.device(device)
    if dev.type == "meta":
        raise NotImplementedError(
            "sparse layers cannot be built on the meta device: construction samples the sparse structure "
            "(which entries exist), and a meta tensor holds no index. Build the layer on 'cpu' (sampling "
            "costs O(nnz) memory, never the dense size) and move it with .to(device)")


def _generator(seed: Optional[int], device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(int(seed))


class SparseLayer(nn.Module):
    """Shared machinery: the compressed weight, its construction, inspection and (de)serialisation.

    Subclasses define ``weight_shape`` (the torch weight shape), ``fan_in`` and
    ``forward``; the compressed matrix is the weight viewed as (shape[0], prod(shape[1:])).
    """

    weight_shape: tuple[int, ...]

    # --------------------------------------------------------------- structure
    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    @property
    def format(self) -> str:
        return "csr" if self.values.dim() == 1 else "bsr"

    @property
    def block_size(self) -> int:
        return 1 if self.values.dim() == 1 else int(self.values.shape[1])

    @property
    def sparse_weight(self) -> SparseMatrix:
        cls = CSR if self.values.dim() == 1 else BSR
        return cls(self.values, *(getattr(self, n) for n in _INDEX_NAMES), self.matrix_shape)

    def _set_structure(self, matrix: SparseMatrix) -> None:
        self.values = nn.Parameter(matrix.values)
        for name, t in zip(_INDEX_NAMES, matrix.index_tensors()):
            self.register_buffer(name, t)

    @torch.no_grad()
    def set_capacity(self, capacity: int) -> None:
        """Rebuild the compressed weight with room for ``capacity`` stored entries (blocks for BSR),
        keeping every stored entry and its value (free slots are zero).

        This replaces the ``values`` parameter, so an optimizer built before the call keeps the old
        tensor: call it before creating the optimizer (``repair_flow`` uses it to make room for the
        edges it adds beyond a layer's budget).
        """
        mat = self.sparse_weight
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < mat.nnz:
            raise ValueError(f"capacity must be an int >= the layer's stored entries ({mat.nnz}), got {capacity!r}")
        rows, cols, slots = mat.coo()
        new = type(mat).from_indices(rows, cols, mat.shape, values=mat.values.detach()[slots],
                                     block_size=mat.block_size, capacity=capacity, dtype=mat.values.dtype,
                                     device=mat.values.device)
        requires_grad = self.values.requires_grad
        self._set_structure(new)
        self.values.requires_grad_(requires_grad)

    def _init_structure(self, density, format: str, block_size, capacity, exact: bool, seed,
                        init_fan_in: str, device, dtype) -> None:
        """Sample an ER structure of the given density and torch-default initial values."""
        _refuse_meta(device)
        density = check_density(_real_number(density, "density"))
        fmt, b = _check_format(format, block_size)
        M, K = self.matrix_shape
        cls = CSR if fmt == "csr" else BSR
        cls._check_shape((M, K), b)
        gen = _generator(seed, device)
        rows, cols = er_indices((M // b, K // b), density, exact=exact, generator=gen)
        matrix = cls._build(rows, cols, None, (M, K), b, capacity, dtype, torch.device(device or "cpu"), None)
        self._set_structure(matrix)
        self._init_values(init_fan_in, gen)

    @torch.no_grad()
    def _init_values(self, init_fan_in: str, generator) -> None:
        """As torch initialises the dense layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

        init_fan_in="kept" uses each output unit's number of stored inputs
        instead of the dense fan-in, so the output variance does not shrink with
        the density.
        """
        if init_fan_in not in ("dense", "kept"):
            raise ValueError(f"init_fan_in must be 'dense' or 'kept', got {init_fan_in!r}")
        m = self.sparse_weight
        nnz, b = m.nnz, m.block_size
        live = torch.empty(self.values[:nnz].shape, dtype=self.values.dtype).uniform_(-1, 1, generator=generator)
        if init_fan_in == "dense":
            bound = torch.full((nnz,), 1.0 / math.sqrt(self.fan_in) if self.fan_in else 0.0, dtype=torch.float64)
        else:
            rows, _, _ = m.coo()
            kept = (m.rowptr[1:] - m.rowptr[:-1]).double() * b  # stored inputs of each output unit
            bound = 1.0 / kept.clamp(min=1).sqrt()
            bound = bound[rows]
        shape = (nnz,) if b == 1 else (nnz, 1, 1)
        self.values.data.zero_()
        # live comes from the (CPU) generator; "kept" bounds are computed where the index lives.
        bound = bound.view(shape).to(device=live.device, dtype=live.dtype)
        self.values.data[m.slot[:nnz].long()] = (live * bound).to(self.values.device)

    def _init_bias(self, out_features: int, bias: bool, device, dtype, generator) -> None:
        if bias:
            bound = 1.0 / math.sqrt(self.fan_in) if self.fan_in else 0.0
            b = torch.empty(out_features, dtype=dtype or torch.get_default_dtype()).uniform_(-bound, bound, generator=generator)
            self.bias = nn.Parameter(b.to(device or "cpu"))
        else:
            self.register_parameter("bias", None)

    def _index(self) -> tuple[torch.Tensor, ...]:
        """(rowptr, col, slot, colptr, row, slot_t), read from the buffers directly: six
        nn.Module.__getattr__ calls cost more than the op on a small layer."""
        b = self._buffers
        return b["rowptr"], b["col"], b["slot"], b["colptr"], b["row"], b["slot_t"]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse weight (as [M, K]) times a feature-major [K, N] operand."""
        return torch.ops.sparsestart.spmm(self.values, *self._index(), x)

    def _add_bias(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """y + bias in y's dtype under autocast: there y is bfloat16/float16 while the bias stays a
        float32 parameter, and, as with nn.Linear/nn.Conv2d under autocast, the output keeps the
        low-precision dtype (the bias gradient arrives in float32 through the cast)."""
        if bias.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
            bias = bias.to(y.dtype)
        return y + bias

    # --------------------------------------------------------------- inspection
    @property
    def nnz(self) -> int:
        """Stored weights (elements, counting every entry of a stored block)."""
        return self.sparse_weight.nnz_elements

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    def _choice_density(self) -> float:
        """:attr:`density` for choices made on every call, read once per structure version.

        Reading nnz reads ``rowptr[-1]``: on a GPU that is a host synchronisation, and
        SparseConv2d's algorithm choice ran it in every forward (the first H200 run's VGG
        steps spent as much host as device time). A stale value could only change the choice
        of algorithm, never a result: every algorithm computes the same convolution.
        """
        return per_version(self.rowptr, "layer_density", lambda _: self.density)

    def mask(self) -> torch.Tensor:
        """Dense bool mask in the shape of the torch weight."""
        return self.sparse_weight.mask().reshape(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The effective weight as a dense tensor of the torch weight shape (differentiable)."""
        return self.sparse_weight.to_dense().reshape(self.weight_shape)

    @torch.no_grad()
    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (the torch twin of this layer) with the masked weight and the bias copied in."""
        dense.weight.copy_(self.dense_weight())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def validate(self) -> None:
        self.sparse_weight.validate()
        if self.bias is not None and self.bias.shape != (self.weight_shape[0],):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected ({self.weight_shape[0]},)")

    def _sparsity_repr(self) -> str:
        fmt = self.format if self.format == "csr" else f"bsr, block_size={self.block_size}"
        return f"format={fmt}, nnz={self.nnz}, density={self.density:.4g}"

    # ---------------------------------------------------------- serialisation
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        incoming = {n: state_dict[prefix + n] for n in ("values",) + _INDEX_NAMES if prefix + n in state_dict}
        if any(n in incoming for n in _INDEX_NAMES):
            # Any index key (a full state_dict or, with strict=False, any subset) changes the structure
            # the kernels will trust: check the structure this load would leave, the loaded tensors
            # over the kept ones, before anything of this layer changes (the ops do not bounds-check).
            error = self._check_loaded_structure(incoming, local_metadata.get("assign_to_params_buffers", False))
            if error is not None:
                what = ("the saved sparse structure" if len(incoming) == 1 + len(_INDEX_NAMES) else
                        f"the sparse structure after loading {sorted(incoming)} over this layer's other tensors")
                error_msgs.append(f"{prefix[:-1] or type(self).__name__}: {what} is invalid: {error}; "
                                  f"nothing of this layer was changed")
                return
            # A saved structure may have another capacity or index dtype: adopt it. The values
            # Parameter is resized in place (through .data), not replaced, so an optimizer built before
            # the load keeps updating this layer's weights (a new Parameter would leave it stepping a
            # detached tensor: training would silently do nothing). Loading the optimizer's own
            # state_dict afterwards (the usual checkpoint order) brings state of the new shape; state
            # of the old shape left in it makes the next step fail on a size mismatch, not go wrong.
            vals = incoming.get("values")
            if vals is not None and vals.shape != self.values.shape:
                self.values.data = self.values.data.new_empty(vals.shape)
                self.values.grad = None  # a gradient of the old structure
            for n in _INDEX_NAMES:
                cur, new = getattr(self, n), incoming.get(n)
                if new is not None and (cur.shape != new.shape or cur.dtype != new.dtype):
                    self._buffers[n] = torch.empty(new.shape, dtype=new.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_loaded_structure(self, incoming: dict, assign: bool) -> Optional[str]:
        """Why the structure made of ``incoming`` (values and index tensors from a state_dict) over this
        layer's other tensors is invalid, or None when it is valid."""
        for n, t in incoming.items():
            if not isinstance(t, torch.Tensor):
                return f"{n} is a {type(t).__name__}, not a tensor"
        vals = incoming.get("values", self.values)
        if vals.dim() != self.values.dim() or vals.shape[1:] != self.values.shape[1:]:
            return (f"values: shape {tuple(vals.shape)} does not match this layer's format "
                    f"({self.format}, values {tuple(self.values.shape)})")
        # Without assign=True the loaded tensors are copied onto this layer's device: check them there.
        dev = None if assign else self.values.device
        merged = {n: incoming[n] if n in incoming else getattr(self, n) for n in ("values",) + _INDEX_NAMES}
        if dev is not None:
            merged = {n: t.to(dev) for n, t in merged.items()}
        cls = CSR if vals.dim() == 1 else BSR
        try:
            cls(merged["values"], *(merged[n] for n in _INDEX_NAMES), self.matrix_shape).validate()
        except (ValueError, TypeError, RuntimeError, IndexError) as exc:
            return str(exc)
        return None


def _check_format(format: str, block_size) -> tuple[str, int]:
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if format == "csr":
        if block_size not in (None, 1):
            raise ValueError(f"block_size applies to format='bsr' only, got block_size={block_size!r} with 'csr'")
        return "csr", 1
    if block_size is None:
        raise ValueError("format='bsr' needs a block_size (e.g. 16, 32 or 64)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 for format='bsr', got {block_size!r}")
    return "bsr", block_size


def _weight_to_matrix(module: SparseLayer, weight: torch.Tensor, mask: Optional[torch.Tensor], density,
                      format: str, block_size, capacity, exact: bool, seed) -> SparseMatrix:
    """The compressed matrix holding ``weight`` at the positions of ``mask`` (or of an ER sample)."""
    _refuse_meta(weight.device)
    fmt, b = _check_format(format, block_size)
    M, K = module.matrix_shape
    cls = CSR if fmt == "csr" else BSR
    w2 = weight.detach().reshape(M, K)
    if mask is not None:
        if density is not None:
            raise ValueError("give either mask or density, not both")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the weight has {tuple(weight.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        return cls.from_dense(w2, mask.reshape(M, K).to(w2.device), block_size=b, capacity=capacity)
    if density is None:
        return cls.from_dense(w2, None if b == 1 else _nonzero_blocks(w2, b), block_size=b, capacity=capacity)
    density = check_density(_real_number(density, "density"))
    cls._check_shape((M, K), b)
    rows, cols = er_indices((M // b, K // b), density, exact=exact, generator=_generator(seed, w2.device))
    bm = torch.zeros(M // b, K // b, dtype=torch.bool, device=w2.device)
    bm[rows.to(w2.device), cols.to(w2.device)] = True
    return cls.from_dense(w2, bm, block_size=b, capacity=capacity)


def _nonzero_blocks(w2: torch.Tensor, b: int) -> torch.Tensor:
    M, K = w2.shape
    return (w2 != 0).reshape(M // b, b, K // b, b).any(dim=(1, 3))


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
    """

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
        # Feature-major in, feature-major out: one transpose each way. The input is made
        # contiguous here, before the op, so autograd saves the feature-major copy and the
        # backward's sddmm does not transpose it a second time (a no-op when x comes from a
        # previous sparse layer: its output is already a transposed view of a feature-major tensor).
        xt = x.reshape(-1, self.in_features).t()
        dtype = _autocast_dtype(xt)
        # Under autocast the op would cast x itself; casting here makes it one copy with the transpose.
        xt = xt.contiguous() if dtype is None else xt.to(dtype, memory_format=torch.contiguous_format)
        y = self._matmul(xt).t()
        bias = self.bias
        if bias is not None:
            y = self._add_bias(y, bias)
        return y.reshape(*lead, self.out_features)

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
        self._set_structure(_weight_to_matrix(self, module.weight, mask, density, format, block_size, capacity,
                                              exact, seed))
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return self

    def to_dense(self) -> nn.Linear:
        """A torch.nn.Linear whose weight is the masked dense weight."""
        return self._filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                      device=self.values.device, dtype=self.values.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._sparsity_repr())


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
        # "auto" picks per call (see CONV_ALGORITHMS); "direct", "unfold" or "dense" force one.
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
        algorithm = self._algorithm(x, pad)
        if algorithm in ("direct", "dense") and self.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
            conv_padding, pad = [pad[2], pad[0]], (0, 0, 0, 0)  # the kernel pads symmetrically itself
        else:
            conv_padding = [0, 0]
        if any(pad):
            x = F.pad(x, pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        n, _, h, w = x.shape
        ho, wo = self._output_size(h, w, conv_padding)
        if ho <= 0 or wo <= 0:
            kh, kw = self.kernel_size
            raise ValueError(f"SparseConv2d: input of spatial size {(h, w)} (after padding) is smaller than the "
                             f"dilated kernel {(self.dilation[0] * (kh - 1) + 1, self.dilation[1] * (kw - 1) + 1)}")
        if algorithm == "direct":
            # Stride 1 and CSR: direct sparse convolution, no unfolded input in memory.
            y = torch.ops.sparsestart.conv2d(self.values, *self._index(), x,
                                             list(self.kernel_size), conv_padding, list(self.dilation))
        elif algorithm == "dense":
            # The stored weights scattered into a transient dense kernel (gradients flow back to the
            # stored values only); storage, gradients and optimizer state stay sparse.
            y = F.conv2d(x, self.dense_weight(), None, self.stride, conv_padding, self.dilation)
        else:
            y = self._unfolded_conv(x, n, ho, wo)
        if self.bias is not None:
            y = self._add_bias(y, self.bias.view(1, -1, 1, 1))
        return y.squeeze(0) if unbatched else y

    def _output_size(self, h: int, w: int, padding) -> tuple[int, int]:
        (kh, kw), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        return ((h + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1, (w + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1)

    def _algorithm(self, x: torch.Tensor, pad) -> str:
        """The algorithm for this call: ``conv_algorithm`` unless "auto" (see CONV_ALGORITHMS)."""
        choice = self.conv_algorithm
        if choice not in CONV_ALGORITHMS:
            raise ValueError(f"SparseConv2d: conv_algorithm must be one of {CONV_ALGORITHMS}, got {choice!r}")
        direct_ok = self.stride == (1, 1) and self.values.dim() == 1
        if choice == "direct" and not direct_ok:
            raise ValueError("SparseConv2d: conv_algorithm='direct' needs stride 1 and format 'csr'; "
                             f"this layer has stride {self.stride} and format {self.format!r}")
        if choice != "auto":
            return choice
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

    def _unfolded_conv(self, x: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
        """Strided or BSR convolution: unfold (im2col) to [Cin*kh*kw, n*ho*wo], then spmm."""
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)  # [n, C*kh*kw, L]
        xt = cols.transpose(0, 1).reshape(cols.shape[1], n * ho * wo)
        y = self._matmul(xt).view(self.out_channels, n, ho * wo).transpose(0, 1)
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
        self._set_structure(_weight_to_matrix(self, module.weight, mask, density, format, block_size, capacity,
                                              exact, seed))
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
