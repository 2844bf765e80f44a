"""SparseLayer: what SparseLinear and SparseConv2d share.

The compressed weight (a ``values`` parameter over index buffers), its construction and
initialisation, inspection, the density the per-call choices read, and loading a
state_dict (which validates the structure it would leave before changing anything).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops  # noqa: F401  registers torch.ops.sparsestart
from ..ops.library import call_spmm
from ..formats import BSR, CSR, SparseMatrix
from ..formats.compressed import one_thread, per_version
from ..init.sampling import check_density, er_csr
from . import autotune
from .build import _check_format, _generator, _real_number, _refuse_meta

__all__ = ["SparseLayer"]

_INDEX_NAMES = ("rowptr", "col", "slot", "colptr", "row", "slot_t")


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
        self._measure_density()

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
        # The compressed rows straight from the sampler: no int64 (rows, cols) copy of the sample.
        # One thread: the chunked steps make many small calls (see one_thread).
        with one_thread():
            rowptr, col = er_csr((M // b, K // b), density, exact=exact, generator=gen)
            matrix = cls._from_csr(rowptr, col, (M, K), b, capacity, dtype, torch.device(device or "cpu"))
            del rowptr, col
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
        dtype = self.values.dtype
        self.values.data.zero_()
        if init_fan_in == "dense":
            # The bound as the float64 value rounded to the values' dtype, as a tensor, so the product
            # is the same elementwise one for every entry.
            bound = torch.tensor(1.0 / math.sqrt(self.fan_in) if self.fan_in else 0.0, dtype=torch.float64).to(dtype)
        else:
            kept = (m.rowptr[1:] - m.rowptr[:-1]).double() * b  # stored inputs of each output unit
            bound = (1.0 / kept.clamp(min=1).sqrt()).to(device="cpu", dtype=dtype)
            rowptr = m.rowptr.to(device="cpu", dtype=torch.long)
        # Drawn where the (CPU) generator lives, in chunks: the generator fills a tensor one
        # value after another, so the chunks draw exactly the values one [nnz] draw would, with
        # O(chunk) temporaries; each chunk lands in its entries' slots.
        tail = () if b == 1 else (b, b)
        step = max(1, (1 << 18) // (b * b))
        for e0 in range(0, nnz, step):
            e1 = min(nnz, e0 + step)
            live = torch.empty((e1 - e0,) + tail, dtype=dtype).uniform_(-1, 1, generator=generator)
            if init_fan_in == "dense":
                live *= bound
            else:
                rows = torch.searchsorted(rowptr, torch.arange(e0, e1), right=True) - 1
                live *= bound[rows].view((-1,) + (1,) * len(tail))
            self.values.data.index_copy_(0, m.slot[e0:e1].long(), live.to(self.values.device))

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

    def _matmul(self, x: torch.Tensor, values: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sparse weight (as [M, K]) times a feature-major [K, N] operand (+ ``bias`` per output row);
        ``values`` in place of the layer's own (the autotuner runs the algorithms on a detached copy)."""
        values = self.values if values is None else values
        if bias is None:
            return call_spmm(values, *self._index(), x)
        if bias.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            bias = bias.to(x.dtype)  # as _add_bias: under autocast the output keeps the low precision
        return call_spmm(values, *self._index(), x, bias)

    def _tuned_algorithm(self, op: str, x: torch.Tensor, rule: str, valid: tuple, compute, **key_fields) -> str:
        """The algorithm "auto" takes for this call (see :mod:`sparsestart.nn.autotune`): ``rule`` (the
        threshold rule) when tuning is off; else the cached choice for the call's key, measuring the
        ``valid`` algorithms first when the key is new and timing is possible now (eager; under
        torch.compile an uncached key takes ``rule``); "dense" is no candidate for a layer above
        autotune.DENSE_MAX_NUMEL weights. ``compute(algorithm, values, x)`` computes the
        layer without bias; ``key_fields`` are the layer kind's own key fields (geometry, input shape)."""
        if not autotune.enabled():
            return rule
        if math.prod(self.weight_shape) > autotune.DENSE_MAX_NUMEL:
            valid = tuple(a for a in valid if a != "dense")
            if len(valid) == 1:
                return valid[0]
        values = self.values
        device_type = x.device.type
        grad = autotune.grad_mode(values, x)
        key = autotune.make_key(
            op, dtype=x.dtype, device=device_type,
            autocast=torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None,
            format="csr" if values.dim() == 1 else f"bsr{values.shape[1]}",
            density_bucket=autotune.density_bucket(self._choice_density()), grad=grad, **key_fields)
        # The cached choice first: every call after a key's first needs nothing else (building the
        # candidates' runners and asking can_time cost more than a small layer's op).
        cached = autotune.lookup(key)
        if cached in valid:
            return cached
        if not autotune.can_time(x, values):
            return rule
        runs = {a: autotune.candidate_runner(lambda v, xi, a=a: compute(a, v, xi), values, x, grad) for a in valid}
        return autotune.choose(key, runs, x.device)

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

        Under torch.compile the value read from the index would be data-dependent, and a
        branch on it cannot be traced (fullgraph fails): the choice then takes the density
        last measured eagerly, rounded to the middle of its autotune bucket
        (``_compiled_density``, a plain float attribute that the compiler guards on). A new
        measurement (construction, set_capacity, load_state_dict, unpickling, an eager
        forward after a structure update) that moves the density to another bucket
        recompiles with the new choice; one within the bucket (gradual pruning's small
        steps) does not, where the exact density would recompile at every step until
        dynamo's recompile limit sent the model back to eager. The rounding can only move
        the threshold rule's choice near a threshold. A drop/grow made through
        sparse_weight between compiled calls only is not measured: the compiled graph keeps
        its algorithm, which still computes the right convolution.
        """
        if torch.compiler.is_compiling():
            return self._compiled_density
        return per_version(self.rowptr, "layer_density", self._measure_density)

    def _measure_density(self, _rowptr: Optional[torch.Tensor] = None) -> float:
        """Read :attr:`density` and keep it as ``_measured_density`` (and its bucket's middle as
        ``_compiled_density``) for compiled calls."""
        if self.rowptr.is_meta:  # a layer moved to the meta device has no structure to read
            return self._measured_density
        density = self.density
        self._measured_density = density
        self._compiled_density = autotune.bucket_density(density)
        return density

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_compiled_density" not in self.__dict__ and not self.rowptr.is_meta:
            self._measure_density()  # pickled by a version without it

    def mask(self) -> torch.Tensor:
        """Dense bool mask in the shape of the torch weight."""
        return self.sparse_weight.mask().reshape(self.weight_shape)

    def dense_weight(self) -> torch.Tensor:
        """The effective weight as a dense tensor of the torch weight shape (differentiable)."""
        return self._dense_weight_of(self.values)

    def _dense_weight_of(self, values: torch.Tensor) -> torch.Tensor:
        """The layer's structure filled with ``values`` as a dense weight of the torch weight shape. The
        "dense" algorithms of both layers compute through it: the scatter is differentiable, so the
        gradient reaches the stored values only (storage, gradients and optimizer state stay sparse)."""
        cls = CSR if values.dim() == 1 else BSR
        return cls(values, *self._index(), self.matrix_shape).to_dense().reshape(self.weight_shape)

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
        self._measure_density()

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
