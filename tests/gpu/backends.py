"""Which GPU backends the GPU tests run, decided in one place (review F2/F7).

On a CUDA machine every GPU backend is expected: a missing one (``sparsestart._C`` not
rebuilt there with nvcc, an nvcc/torch CUDA major mismatch, triton missing or too old) must
fail the suite, not shrink it. ``SPARSESTART_ALLOW_MISSING_GPU_BACKENDS=cuda,triton`` (or
``all``) names the backends a machine is allowed to lack; their cases are then skipped with
the reason.
"""
from __future__ import annotations

import os

import torch

import sparsestart.ops.gpu as gpu

ALLOW_ENV = "SPARSESTART_ALLOW_MISSING_GPU_BACKENDS"
# The device the device-generic test files (test_gpu_modules, test_gpu_algorithms) run on:
# "cuda" (skipped without one), or "cpu" for a dry run of their code on a machine without a GPU
# (reference backend only; it has found a real bug of the GPU path, see docs/gpu.md).
DEVICE_ENV = "SPARSESTART_GPU_TEST_DEVICE"
TEST_DEVICE = os.environ.get(DEVICE_ENV, "cuda")
SKIP_WITHOUT_DEVICE = dict(condition=TEST_DEVICE == "cuda" and not torch.cuda.is_available(),
                           reason=f"needs a CUDA device ({DEVICE_ENV}=cpu runs it on the CPU)")


def allowed_missing(env: str | None = None) -> set[str]:
    env = os.environ.get(ALLOW_ENV, "") if env is None else env
    names = {n.strip() for n in env.split(",") if n.strip()}
    return {"cuda", "triton"} if "all" in names else names


def missing_reasons(cuda_ext: bool, triton_ok: bool, triton_reason: str = "") -> dict[str, str]:
    """The GPU backends that cannot run here, with the reason."""
    missing = {}
    if not cuda_ext:
        missing["cuda"] = ("sparsestart._C has no CUDA kernels: rebuild on this machine with "
                           "SPARSESTART_CUDA=1 pip install --no-build-isolation --no-deps -e .")
    if not triton_ok:
        missing["triton"] = f"the triton backend is unavailable: {triton_reason or 'see sparsestart.ops.gpu'}"
    return missing


def gpu_backends(cuda_available: bool, missing: dict[str, str], allowed: set[str]) -> tuple[list[str], dict]:
    """(backends to parametrize over, {backend: reason} for those that must fail).

    Without CUDA nothing runs (the suite is skipped). With CUDA, every backend is listed
    except the missing ones the environment allows; a missing backend that is not allowed
    stays in the list and is reported as an error by :func:`require`.
    """
    if not cuda_available:
        return ["reference"], {}
    names = ["reference"] + [b for b in ("cuda", "triton") if b not in missing or b not in allowed]
    return names, {b: r for b, r in missing.items() if b not in allowed}


def _triton_reason() -> str:
    reason = getattr(gpu, "triton_unavailable_reason", None)
    return reason() if callable(reason) else ""


MISSING = missing_reasons(gpu.cuda_extension_available(), gpu.triton_available(), _triton_reason())
BACKENDS, MUST_FAIL = gpu_backends(torch.cuda.is_available(), MISSING, allowed_missing())


def require(backend: str) -> None:
    """Fail (not skip) a case whose backend should exist on this CUDA machine but does not."""
    if backend in MUST_FAIL:
        raise AssertionError(f"GPU backend {backend!r} is missing: {MUST_FAIL[backend]} "
                             f"(set {ALLOW_ENV}={backend} to allow it)")
