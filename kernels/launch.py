"""Host side of the Triton kernels: jit + autotune, and launchers with the native kernel semantics.

``spmm(values, ptr, idx, slot, x, rows, transpose_blocks)`` and
``sddmm(ptr, idx, slot, a, b, capacity, block_size)`` take exactly the
arguments of ``sparsestart::_native_spmm`` / ``_native_sddmm`` (layouts in
csrc/ops.cpp) and dispatch on the format: BSR (values [C, b, b], b in 16/32/64)
to kernels/bsr.py, CSR (values [C]) to kernels/csr.py.

Interpreter. Triton decides once, when ``triton`` is first imported, whether
its standard library (tl.cdiv, tl.sum, ...) is compiled or interpreted
(TRITON_INTERPRET=1). The kernels here are jitted in the same mode
(:data:`INTERPRETED`), so under the interpreter they run on CPU tensors; then
each kernel has a single small config instead of an autotune list.

Autotuning. Each kernel has an autotune list (below). ``SPARSESTART_TRITON_AUTOTUNE=0`` in
the environment (read at import) replaces every list by one sound default config, which
cuts the first-call compile time from minutes to seconds (scripts/gpu_check.sh uses it
for the correctness tests; benchmarks leave it on).

Importing this module imports triton (>= 3.0; ``triton.knobs`` is used when present, 3.4+).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from . import bsr, csr

try:  # triton >= 3.4
    from triton import knobs
except ImportError:  # older triton reads TRITON_INTERPRET from the environment when jitting
    knobs = None

__all__ = ["INTERPRETED", "BLOCK_SIZES", "DTYPES", "spmm", "sddmm"]

# Whether triton's own jit functions were created by the interpreter (TRITON_INTERPRET=1 at its import).
INTERPRETED: bool = not isinstance(tl.standard.cdiv, triton.runtime.jit.JITFunction)

BLOCK_SIZES = (16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TL_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
           torch.float64: tl.float64}


@contextlib.contextmanager
def _interpret_env(interpret: bool):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _jit(fn, do_not_specialize=()):
    # Jit in the mode of triton's standard library, whatever TRITON_INTERPRET says now.
    if knobs is not None:
        with knobs.runtime.scope():
            knobs.runtime.interpret = INTERPRETED
            return triton.jit(fn, do_not_specialize=list(do_not_specialize))
    with _interpret_env(INTERPRETED):
        return triton.jit(fn, do_not_specialize=list(do_not_specialize))


# Read once at import: whether the autotune lists are searched or replaced by their default config.
AUTOTUNE: bool = os.environ.get("SPARSESTART_TRITON_AUTOTUNE", "1") != "0"


def _autotune(kernel, configs, key, prune=None, default=None):
    """Autotune over ``configs[1:]``; the interpreter runs ``configs[0]``, AUTOTUNE=False ``default``."""
    if INTERPRETED:
        configs = configs[:1]
    elif not AUTOTUNE:
        configs = [default if default is not None else configs[1]]
    else:
        configs = configs[1:]
    kwargs = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None and len(configs) > 1 else {}
    return triton.autotune(configs=configs, key=key, **kwargs)(kernel)


def _cfg(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------- autotune lists
# The first entry of each list is the single config used under the interpreter
# (small tiles: the interpreter runs every program in numpy); the rest is the GPU's list.
# num_stages 4 is left out: these loops pipeline one x tile per entry, and 4 stages
# compiled to the same kernel as 3 (review F8).
# Keys: N_BUCKET / R_BUCKET are N and the number of (block) rows rounded up to
# a power of two, so a ragged last batch does not trigger a new tuning run;
# the autotuner adds the dtypes of the tensor arguments itself.
_BSR_SPMM_CONFIGS = [_cfg(4, 2, BLOCK_N=32)] + [
    _cfg(w, s, BLOCK_N=bn) for bn in (32, 64, 128) for (w, s) in ((4, 2), (4, 3), (8, 3))
]
_BSR_SDDMM_CONFIGS = [_cfg(4, 2, BLOCK_N=32)] + [
    _cfg(w, s, BLOCK_N=bn) for bn in (32, 64, 128) for (w, s) in ((2, 2), (4, 2), (4, 3), (8, 3))
]
_CSR_SPMM_CONFIGS = [_cfg(4, 2, BLOCK_E=16, BLOCK_N=32)] + [
    _cfg(w, s, BLOCK_E=be, BLOCK_N=bn) for be in (16, 32) for bn in (32, 64, 128) for (w, s) in ((2, 2), (4, 3))
]
_CSR_SDDMM_CONFIGS = [_cfg(4, 2, BLOCK_E=16, BLOCK_N=32)] + [
    _cfg(w, s, BLOCK_E=be, BLOCK_N=bn) for be in (8, 16, 32) for bn in (64, 128, 256) for (w, s) in ((4, 2), (8, 3))
]


def _prune_bsr(configs, named_args, **kwargs):
    """Drop configs whose tile is too small for 8 warps (a B x BLOCK_N fp32 tile below 64 x 64)."""
    b = named_args.get("B", kwargs.get("B", 64))
    kept = [c for c in configs if c.num_warps <= 4 or b * c.kwargs["BLOCK_N"] >= 4096]
    return kept or configs[:1]


# Shared memory a config may ask for (H100 allows 227 KB per block, A100 163 KB).
_SMEM_LIMIT = 160 * 1024


def _prune_bsr_sddmm(configs, named_args, **kwargs):
    """SDDMM's tiles are two B x BLOCK_N operand panels and a B x B accumulator (not spmm's B x BLOCK_N).

    Drops (review F9 / F-AOT): configs whose operand panels need more than 128 bytes of
    registers per thread (fp32 B=64, BLOCK_N=128 on 4 warps spilled at 255 registers),
    whose pipelined panels exceed the shared memory (fp64 B=64 at 256 KB), and 1-2 warp
    configs on B=64 tiles.
    """
    b = named_args.get("B", kwargs.get("B", 64))
    a = named_args.get("a")
    elsize = a.element_size() if isinstance(a, torch.Tensor) else 4
    kept = []
    for c in configs:
        bn, w = c.kwargs["BLOCK_N"], c.num_warps
        panel = b * bn * elsize
        if panel / (32 * w) > 128 or 2 * panel * max(c.num_stages, 1) > _SMEM_LIMIT or (b == 64 and w < 4):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


_bsr_spmm = _autotune(_jit(bsr.bsr_spmm_kernel, ("N_BUCKET", "R_BUCKET")), _BSR_SPMM_CONFIGS,
                      key=["N_BUCKET", "R_BUCKET", "B", "TRANS", "PREC"], prune=_prune_bsr,
                      default=_cfg(4, 3, BLOCK_N=64))
_bsr_sddmm = _autotune(_jit(bsr.bsr_sddmm_kernel, ("R", "N_BUCKET", "LOG2_R", "N_PER_SPLIT")), _BSR_SDDMM_CONFIGS,
                       key=["N_BUCKET", "LOG2_R", "B", "PREC"], prune=_prune_bsr_sddmm,
                       default=_cfg(4, 2, BLOCK_N=32))
_csr_spmm = _autotune(_jit(csr.csr_spmm_kernel, ("N_BUCKET", "R_BUCKET")), _CSR_SPMM_CONFIGS,
                      key=["N_BUCKET", "R_BUCKET"], default=_cfg(4, 3, BLOCK_E=32, BLOCK_N=64))
_csr_sddmm = _autotune(_jit(csr.csr_sddmm_kernel, ("R", "N_BUCKET", "LOG2_R")), _CSR_SDDMM_CONFIGS,
                       key=["N_BUCKET", "LOG2_R"],
                       default=_cfg(4, 2, BLOCK_E=16, BLOCK_N=128))


# ------------------------------------------------------------------ launchers
def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def fp32_uses_tf32() -> bool:
    """Whether torch lets fp32 matmuls use TF32 now (dense cuBLAS and these kernels follow it together).

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32" / "none");
    once a user sets it, the legacy getter ``torch.get_float32_matmul_precision()`` raises
    (review F18), so the new setting is read first and the legacy one only when it is "none"
    or absent.
    """
    new = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    if new in ("ieee", "tf32"):
        return new == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        return False


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's fp32 matmul precision (as cuBLAS does in torch)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if fp32_uses_tf32() else "ieee"
    return "tf32"  # ignored for 16-bit operands


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (review F4: cuda:1 tensors, current device 0)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _check_common(op: str, dense: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor) -> None:
    if dense.dtype not in DTYPES:
        raise TypeError(f"sparsestart.kernels.{op}: dtype must be one of {DTYPES}, got {dense.dtype}")
    if not (ptr.dtype == idx.dtype == slot.dtype) or ptr.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparsestart.kernels.{op}: ptr, idx and slot must share int32 or int64, got "
                        f"{ptr.dtype}, {idx.dtype}, {slot.dtype}")


def _check_block(op: str, b: int) -> None:
    if b != 1 and b not in BLOCK_SIZES:
        raise ValueError(f"sparsestart.kernels.{op}: block size must be 1 (CSR) or one of {BLOCK_SIZES}, got {b}")


def spmm(values: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, x: torch.Tensor,
         rows: int, transpose_blocks: bool) -> torch.Tensor:
    """out[rows, N] = W @ x over the compressed index (ptr, idx, slot); BSR blocks transposed if asked."""
    _check_common("spmm", x, ptr, idx, slot)
    if values.dtype != x.dtype:
        raise TypeError(f"sparsestart.kernels.spmm: values dtype {values.dtype} differs from x dtype {x.dtype}")
    b = 1 if values.dim() == 1 else int(values.shape[1])
    _check_block("spmm", b)
    R = ptr.numel() - 1
    if rows != R * b:
        raise ValueError(f"sparsestart.kernels.spmm: rows={rows} but ptr describes {R} (block) rows of size {b}")
    values, x = values.contiguous(), x.contiguous()
    ptr, idx, slot = ptr.contiguous(), idx.contiguous(), slot.contiguous()
    N = x.shape[1]
    out = x.new_empty(rows, N)
    if rows == 0 or N == 0:
        return out

    def grid(meta):
        return (R * triton.cdiv(N, meta["BLOCK_N"]),)

    with _device_guard(x):
        if b == 1:
            _csr_spmm[grid](values, ptr, idx, slot, x, out, N, _bucket(N), _bucket(R), ACC=_TL_ACC[x.dtype])
        else:
            _bsr_spmm[grid](values, ptr, idx, slot, x, out, N, _bucket(N), _bucket(R), B=b,
                            TRANS=bool(transpose_blocks), PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype),
                            ACC=_TL_ACC[x.dtype])
    return out


# SDDMM programs wanted per multiprocessor before N is split (a few waves keep every SM busy).
_SDDMM_PROGRAMS_PER_SM = 4
# Columns each split reduces at least (shorter splits would spend more on the partial sums).
_SDDMM_MIN_SPLIT_N = 1024


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no split unless a test asks for one
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sddmm_splits(capacity: int, N: int, device: torch.device) -> int:
    """How many parts the BSR SDDMM splits N into: 1 unless the entries alone leave the GPU idle
    (few blocks, long N: convolution weight gradients, review F15)."""
    want = _SDDMM_PROGRAMS_PER_SM * _multiprocessors(device)
    if capacity >= want or N < 2 * _SDDMM_MIN_SPLIT_N:
        return 1
    return max(1, min(-(-want // max(capacity, 1)), N // _SDDMM_MIN_SPLIT_N))


def sddmm(ptr: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          capacity: int, block_size: int) -> torch.Tensor:
    """out[slot[e]] = a[row of e] . b[idx[e]] (BSR: the block of dot products); free slots zero."""
    _check_common("sddmm", a, ptr, idx, slot)
    if a.dtype != b.dtype:
        raise TypeError(f"sparsestart.kernels.sddmm: a dtype {a.dtype} differs from b dtype {b.dtype}")
    _check_block("sddmm", block_size)
    R = ptr.numel() - 1
    if a.shape[0] != R * block_size:
        raise ValueError(f"sparsestart.kernels.sddmm: a has {a.shape[0]} rows but ptr describes {R} (block) rows "
                         f"of size {block_size}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sparsestart.kernels.sddmm: a has N={a.shape[1]} but b has N={b.shape[1]}")
    a, b = a.contiguous(), b.contiguous()
    ptr, idx, slot = ptr.contiguous(), idx.contiguous(), slot.contiguous()
    N = a.shape[1]
    shape = (capacity,) if block_size == 1 else (capacity, block_size, block_size)
    out = a.new_zeros(shape)
    if R == 0 or capacity == 0 or N == 0:
        return out
    with _device_guard(a):
        if block_size == 1:
            def grid(meta):  # entry chunks over the capacity: no host sync on nnz
                return (triton.cdiv(capacity, meta["BLOCK_E"]),)

            _csr_sddmm[grid](ptr, idx, slot, a, b, out, R, N, _bucket(N), max(R - 1, 1).bit_length(),
                             ACC=_TL_ACC[a.dtype])
        else:
            splits = sddmm_splits(capacity, N, a.device)
            n_per_split = triton.cdiv(N, splits)
            # Split over N: fp32 partial sums per split, added in split order (deterministic).
            target = out if splits == 1 else a.new_zeros((splits,) + shape, dtype=torch.float32
                                                          if a.dtype != torch.float64 else a.dtype)
            _bsr_sddmm[(capacity, splits)](ptr, idx, slot, a, b, target, R, N, _bucket(N),
                                           max(R - 1, 1).bit_length(), n_per_split, B=block_size,
                                           PREC=_precision(a.dtype), UPCAST=_upcast(a.dtype), ACC=_TL_ACC[a.dtype])
            if splits > 1:
                out = target.sum(0).to(a.dtype)
    return out
