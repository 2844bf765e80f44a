"""GPU backends of the registry: "cuda" (CUDA C++, csrc/cuda) and "triton" (kernels/).

Default choice on CUDA tensors (by priority): cuda (30) for CSR, triton (20)
for BSR and for CSR when the extension was built without CUDA, then the
reference (0). Both can be forced like any backend (``SPARSESTART_BACKEND`` or
``sparsestart.ops.use_backend``).

Triton on CPU tensors. With ``TRITON_INTERPRET=1`` in the environment before
anything imports triton, the Triton kernels run in Triton's interpreter on CPU
tensors. The triton backend accepts CPU tensors only then, and only when it is
forced (``SPARSESTART_BACKEND=triton`` or ``use_backend("triton")``): the
interpreter is a verification tool and must never win the automatic choice
over the C++ CPU kernels.

torch.compile. The kernels are not registered as ops of their own
(``torch.library.triton_op``): the public ops ``sparsestart::spmm/spmm_t/sddmm``
are custom ops with fake impls, opaque to the compiler, and the registry picks
the backend at run time inside them. That choice depends on the environment,
on ``use_backend`` and on the format, which a compiled graph could not follow;
and inductor could not fuse anything across an index-dependent sparse kernel
anyway.

Nothing here imports triton until a triton kernel is about to run (the
availability check uses ``importlib.util.find_spec`` and the installed version's
metadata). The kernels live in the top-level ``kernels/`` folder, installed as
``sparsestart.kernels``; from a plain checkout (PYTHONPATH, ``build_ext --inplace``)
:func:`_kernels_package` loads that folder under the same name.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..formats.compressed import per_version

from . import cpu, reference, registry

__all__ = ["triton_available", "triton_unavailable_reason", "cuda_extension_available", "TRITON_PRIORITY",
           "CUDA_PRIORITY", "TRITON_MIN_VERSION"]

CUDA_PRIORITY = 30
TRITON_PRIORITY = 20

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_SIZES = (16, 32, 64)


def _dtype_name(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_block_size = registry.block_size

# ------------------------------------------------------------------------ triton
#: The oldest triton the kernels run on (kernels/launch.py uses ``triton.knobs`` when present, 3.4+,
#: and falls back to the TRITON_INTERPRET environment variable before).
TRITON_MIN_VERSION = (3, 0)
_KERNELS = "sparsestart.kernels"


def _triton_version() -> Optional[str]:
    """Triton's version string without importing triton (its import decides the interpreter mode),
    or None when it cannot be read."""
    import importlib.metadata

    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        try:
            with open(spec.origin, encoding="utf-8") as f:
                match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", f.read(), re.M)
            return match.group(1) if match else None
        except OSError:
            return None
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _kernels_package():
    """The package ``sparsestart.kernels`` (the top-level ``kernels/`` folder of the repository).

    ``pip install`` (editable or not) maps it through setup.py's ``package_dir``. A plain
    checkout on PYTHONPATH, or ``python setup.py build_ext --inplace``, has no such mapping:
    then ``kernels/__init__.py`` next to the ``sparsestart`` package is loaded under the name
    ``sparsestart.kernels`` (its submodules are found through the package's ``__path__``).
    Importing the package imports nothing else (``kernels.launch`` imports triton).
    """
    module = sys.modules.get(_KERNELS)
    if module is not None:
        return module
    try:
        return _import_installed_kernels()
    except ModuleNotFoundError as exc:
        if exc.name != _KERNELS:
            raise
    return _load_kernels_from_checkout()


def _import_installed_kernels():
    """``import sparsestart.kernels`` as installed (ModuleNotFoundError from a plain checkout)."""
    return importlib.import_module(_KERNELS)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _checkout_kernels_dir() -> Path:
    import sparsestart

    return Path(sparsestart.__file__).resolve().parent.parent / "kernels"


def _load_kernels_from_checkout():
    folder = _checkout_kernels_dir()
    init = folder / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(
            f"No module named {_KERNELS!r}: sparsestart was not installed with its Triton kernels and there is "
            f"no {init} next to the package (install with: pip install --no-build-isolation -e .)", name=_KERNELS)
    spec = importlib.util.spec_from_file_location(_KERNELS, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_KERNELS, None)
        raise
    import sparsestart

    sparsestart.kernels = module
    return module


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> str:
    """Why the triton backend cannot run here ("" when it can): triton missing, too old, or the
    kernels package not importable. Imports neither triton nor the kernels' launcher."""
    if not _triton_installed():
        return "triton is not installed (pip install triton)"
    version = _triton_version()
    if version is not None:
        parsed = _version_tuple(version)
        if parsed and parsed < TRITON_MIN_VERSION:
            want = ".".join(map(str, TRITON_MIN_VERSION))
            return f"triton {version} is too old: the kernels need triton >= {want} (pip install -U triton)"
    try:
        _kernels_package()
    except ImportError as exc:
        return f"the Triton kernels (sparsestart.kernels) cannot be imported: {exc}"
    return ""


def triton_available() -> bool:
    """Whether the triton backend can run: triton importable and new enough (>= TRITON_MIN_VERSION;
    an unreadable version is not held against it) and ``sparsestart.kernels`` importable.
    Cached; does not import triton (see triton_unavailable_reason)."""
    return triton_unavailable_reason() == ""


def _kernels():
    _kernels_package()
    from sparsestart.kernels import launch  # imports triton

    return launch


def _triton_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (imports triton)."""
    return _kernels().INTERPRETED


def _triton_reasons(op: str, tensors: list[Tensor]) -> list[str]:
    reasons = []
    devices = {t.device.type for t in tensors}
    if devices - {"cuda", "cpu"}:
        reasons.append(f"needs CUDA tensors (or CPU tensors under the Triton interpreter), got {sorted(devices)}")
    if "cpu" in devices:
        if os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("CPU tensors run only in the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                           "imported and force this backend (SPARSESTART_BACKEND=triton)")
        elif registry.forced_backend() != "triton":
            reasons.append("CPU tensors under TRITON_INTERPRET=1 run on this backend only when it is forced "
                           "(SPARSESTART_BACKEND=triton or sparsestart.ops.use_backend('triton'))")
        elif not _triton_interpreted():
            reasons.append("triton was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for "
                           "the GPU; set TRITON_INTERPRET=1 before anything imports triton")
    dtype = tensors[0].dtype
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"supports {_dtype_name(_TRITON_DTYPES)}, got {dtype}")
    b = _block_size(op, tensors)
    if b is not None and b != 1 and b not in _BLOCK_SIZES:
        reasons.append(f"BSR block size {b} is not one of {_BLOCK_SIZES}")
    if "cuda" in devices and not reasons:
        index = tensors[0].device.index
        major, minor = _capability(torch.cuda.current_device() if index is None else index)
        if major < 7:
            reasons.append(f"needs compute capability >= 7.0 for tl.dot, device has {major}.{minor}")
        elif dtype == torch.bfloat16 and major < 8:
            reasons.append(f"bfloat16 needs compute capability >= 8.0, device has {major}.{minor}")
    return reasons


def _triton_spmm(values, ptr, idx, slot, x, rows, transpose_blocks):
    return _kernels().spmm(values, ptr, idx, slot, x, rows, transpose_blocks)


def _triton_sddmm(ptr, idx, slot, a, b, capacity, block_size):
    return _kernels().sddmm(ptr, idx, slot, a, b, capacity, block_size)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# -------------------------------------------------------------------------- cuda
@functools.lru_cache(maxsize=None)
def cuda_extension_available() -> bool:
    """Whether sparsestart._C registered CUDA kernels for the native ops (built with CUDA)."""
    if not cpu.NATIVE_AVAILABLE:
        return False
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has("sparsestart::_native_spmm", "CUDA") and has("sparsestart::_native_sddmm", "CUDA")


def _cuda_unavailable_reason() -> str:
    if not cpu.NATIVE_AVAILABLE:
        return "the C++ extension sparsestart._C is not built"
    return ("the C++ extension sparsestart._C was built without CUDA (that needs a CUDA build of torch and nvcc "
            "at install time; see docs/gpu.md)")


def _cuda_reasons(op: str, tensors: list[Tensor]) -> list[str]:
    reasons = []
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"}:
        reasons.append(f"needs CUDA tensors, got {sorted(devices)}")
    dtype = tensors[0].dtype
    if dtype not in _CUDA_DTYPES:
        reasons.append(f"supports {_dtype_name(_CUDA_DTYPES)}, got {dtype}")
    b = _block_size(op, tensors)
    if b is not None and b != 1:
        reasons.append(f"runs CSR only, got BSR with block size {b} (BSR runs on the triton backend)")
    return reasons


@functools.lru_cache(maxsize=None)
def _ordered_spmm_available() -> bool:
    """Whether the extension has the CUDA SpMM that takes a precomputed row order (older builds do not)."""
    return cpu.NATIVE_AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sparsestart::_native_spmm_ordered", "CUDA")


def row_order(ptr: Tensor) -> Tensor:
    """Rows by decreasing number of entries, ties by row (the CUDA SpMM's row swizzle), int32."""
    lengths = ptr[1:] - ptr[:-1]
    return torch.sort(lengths, stable=True, descending=True).indices.to(torch.int32)


def cached_row_order(ptr: Tensor) -> Tensor:
    """:func:`row_order` of ``ptr``, computed once per structure change (review F13): one sort per
    update instead of one per product. A stale order (see :func:`~sparsestart.formats.compressed.per_version`)
    would still be a permutation of the rows, all the kernel needs for a correct result."""
    return per_version(ptr, "row_order", row_order)


def _cuda_spmm(values, ptr, idx, slot, x, rows, transpose_blocks):
    if _ordered_spmm_available() and not torch.compiler.is_compiling():
        return torch.ops.sparsestart._native_spmm_ordered(values, ptr, idx, slot, cached_row_order(ptr), x, rows,
                                                          transpose_blocks)
    return torch.ops.sparsestart._native_spmm(values, ptr, idx, slot, x, rows, transpose_blocks)


def _cuda_sddmm(ptr, idx, slot, a, b, capacity, block_size):
    return torch.ops.sparsestart._native_sddmm(ptr, idx, slot, a, b, capacity, block_size)


# ---------------------------------------------------------------- convolutions
# Neither GPU backend has a direct sparse convolution yet: SparseConv2d's stride-1 CSR
# layers run as unfold + this backend's spmm/sddmm (reference.unfold_conv_kernels)
# rather than falling back to the pure-PyTorch reference on CUDA.


registry.register_backend(
    registry.Backend(
        "cuda",
        priority=CUDA_PRIORITY,
        spmm=_cuda_spmm,
        sddmm=_cuda_sddmm,
        not_supported_reasons=_cuda_reasons,
        is_available=cuda_extension_available,
        unavailable_reason=_cuda_unavailable_reason(),
        kernels=reference.unfold_conv_kernels(_cuda_spmm, _cuda_sddmm),
    )
)

registry.register_backend(
    registry.Backend(
        "triton",
        priority=TRITON_PRIORITY,
        spmm=_triton_spmm,
        sddmm=_triton_sddmm,
        not_supported_reasons=_triton_reasons,
        is_available=triton_available,
        unavailable_reason=triton_unavailable_reason,
        kernels=reference.unfold_conv_kernels(_triton_spmm, _triton_sddmm),
    )
)
