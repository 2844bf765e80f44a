"""What this installation of sparsestart has: ``sparsestart.info()`` and ``sparsestart info``.

One place for a bug report (README, "Reporting a bug"): versions, how the C++ extension was built
(from the compiler's own macros, via ``sparsestart._C.build_info()`` in csrc/ops.cpp), which SIMD
level its CPU kernels run, OpenMP and threads, CUDA kernels and their architectures, Triton and its
kernels, each backend's availability with the reason when not, the allocator policy and the datasets
found.

Collecting it imports triton and ``sparsestart.kernels.launch`` (to tell whether the kernels really
import). Triton fixes its interpreter mode (``TRITON_INTERPRET``) when first imported, so a process
that wants the interpreter sets that variable before calling :func:`info`.

The public entry is the function ``sparsestart.info`` (``sparsestart/__init__.py`` binds that name to
it, over this module's); the module itself is ``sys.modules["sparsestart.info"]``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from typing import Any, Optional

__all__ = ["info", "format_info", "register"]

# _OPENMP is the date (yyyymm) of the specification a compiler implements.
_OPENMP_VERSIONS = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0", 201511: "4.5",
                    201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0"}

# What the CPU needs for each level of csrc/cpu/simd.h.
_SIMD_NEEDS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma"), "scalar": ()}


def _extension() -> dict[str, Any]:
    """The C++ extension: whether it loads, where from, and its build facts."""
    try:
        ext = importlib.import_module("sparsestart._C")
    except ImportError as exc:
        return {"loaded": False, "error": f"{type(exc).__name__}: {exc}",
                "hint": "build it with: pip install --no-build-isolation -e ."}
    out: dict[str, Any] = {"loaded": True, "path": getattr(ext, "__file__", None)}
    if not hasattr(ext, "build_info"):
        out["error"] = "this build has no build_info() (built from sources older than `sparsestart info`); rebuild it"
        return out
    facts = dict(ext.build_info())
    out.update(facts)
    out["flags"] = facts["flags"].split(",") if facts["flags"] else None
    omp = facts.get("openmp")
    out["openmp_version"] = _OPENMP_VERSIONS.get(omp, str(omp)) if omp is not None else None
    out["simd_used"], out["simd_note"] = _simd_used(facts)
    archs = facts["cuda"]["archs"]
    if archs:
        out["cuda"] = {**facts["cuda"], "archs": [_arch_name(a) for a in archs.split(",")]}
    return out


def _arch_name(arch: str) -> str:
    """nvcc's __CUDA_ARCH_LIST__ entry ("900") as an architecture name ("sm_90")."""
    return f"sm_{int(arch) // 10}" if arch.strip().isdigit() else arch.strip()


def _simd_used(facts: dict) -> tuple[Optional[str], Optional[str]]:
    """The SIMD level the CPU kernels run at here, and a note when it is not the obvious one.

    The kernels have no runtime dispatch: they run the level compiled in, or, on a CPU without it,
    stop with SIGILL at the first call."""
    compiled = facts["simd"]
    cpu = facts.get("cpu_supports")
    if cpu is None:  # not x86: only the scalar level exists
        return compiled, None
    missing = [f for f in _SIMD_NEEDS.get(compiled, ()) if not cpu.get(f)]
    if missing:
        return None, (f"compiled for {compiled} but this CPU lacks {', '.join(missing)}: the native CPU kernels "
                      f"would stop with SIGILL; rebuild on this machine, or with SPARSESTART_PORTABLE=1")
    best = next(level for level, needs in _SIMD_NEEDS.items() if all(cpu.get(f) for f in needs))
    if best != compiled:
        return compiled, (f"this CPU could run {best}; the build used {compiled} "
                          f"(SPARSESTART_PORTABLE=1 or a cross build?); rebuild here for speed")
    return compiled, None


def _torch() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if out["cuda_available"]:
        out["devices"] = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                          for i in range(torch.cuda.device_count())]
    return out


def _triton() -> dict[str, Any]:
    from .ops import gpu

    version = gpu._triton_version()
    reason = gpu.triton_unavailable_reason()
    out: dict[str, Any] = {"installed": gpu._triton_installed(), "version": version, "kernels_import": False,
                           "error": reason or None}
    if reason:
        return out
    try:
        launch = importlib.import_module("sparsestart.kernels.launch")  # imports triton and jits the kernels
    except Exception as exc:  # noqa: BLE001 - any failure here is what the report is for
        out["error"] = f"sparsestart.kernels.launch does not import: {type(exc).__name__}: {exc}"
        return out
    out["kernels_import"] = True
    out["kernels_path"] = os.path.dirname(launch.__file__)
    out["interpreter"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return out


def _backends() -> dict[str, Any]:
    from .ops import registry

    out = {}
    for name, backend in sorted(registry.backends().items(), key=lambda kv: -kv[1].priority):
        available = bool(backend.is_available())
        out[name] = {"priority": backend.priority, "available": available,
                     "reason": None if available else backend.why_unavailable()}
    try:
        out_forced = registry.forced_backend()
    except ValueError as exc:
        out_forced = f"invalid: {exc}"
    return {"forced": out_forced, "backends": out}


def _allocator() -> dict[str, Any]:
    from . import runtime

    return {**runtime.malloc_settings(), "glibc": runtime._libc() is not None,
            "note": "`sparsestart train` and `python -m bench` apply sparsestart.runtime.retain_freed_memory() "
                    "unless --default-malloc; importing sparsestart does not"}


def _datasets() -> dict[str, Any]:
    import importlib.util

    from .train import data

    out: dict[str, Any] = {"SPARSESTART_DATA": os.environ.get(data.ENV_VAR),
                           "SPARSESTART_SYSTEM_DATA": os.environ.get(data.SYSTEM_DATA_ENV)}
    found, looked = data._locate_fashion_mnist(None)
    out["fashion-mnist"] = {"found": str(found) if found else None, "looked": [str(p) for p in looked]}
    for name in ("cifar10", "cifar100"):
        found, looked = data._locate_cifar(name, None)
        out[name] = {"found": str(found) if found else None, "looked": [str(p) for p in looked]}
    has_sklearn = importlib.util.find_spec("sklearn") is not None
    out["digits"] = {"found": "sklearn.datasets.load_digits (bundled)" if has_sklearn else None,
                     "looked": ["scikit-learn (pip install scikit-learn)"]}
    return out


def info() -> dict[str, Any]:
    """This installation's versions, build, kernels, backends, allocator policy and datasets, as a dict
    of plain values (``json.dumps`` takes it). ``sparsestart info`` prints it; see the module doc."""
    from . import __version__

    sections = {
        "sparsestart": lambda: {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": lambda: {"version": platform.python_version(), "executable": sys.executable},
        "platform": lambda: {"system": platform.platform(), "machine": platform.machine(),
                             "cpus": os.cpu_count()},
        "torch": _torch,
        "extension": _extension,
        "triton": _triton,
        "backends": _backends,
        "allocator": _allocator,
        "datasets": _datasets,
    }
    out: dict[str, Any] = {}
    for name, collect in sections.items():
        # One broken part must not hide the rest of the report.
        try:
            out[name] = collect()
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict) and item:
                lines.append(f"{pad}{key}:")
                lines += _lines(item, indent + 1)
            elif isinstance(item, list) and item and any(isinstance(v, (dict, list)) for v in item):
                lines.append(f"{pad}{key}:")
                lines += [f"{pad}  - {v}" for v in item]
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    return [f"{pad}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def format_info(report: dict[str, Any]) -> str:
    """``report`` (from :func:`info`) as indented ``key: value`` lines (None as "-", booleans as yes/no)."""
    return "\n".join(_lines(report, 0))


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions, build, kernels, backends and datasets of this installation "
                                    "(paste it into bug reports)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_info(report))
    return 0
