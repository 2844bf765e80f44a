"""Where a run computes (``--device``) and in which precision (``--precision``).

Devices
    ``auto``    CUDA when ``torch.cuda.is_available()``, else the CPU
    ``cpu``     the CPU
    ``cuda``    the current CUDA device (under torchrun: the rank's GPU, ``LOCAL_RANK``)
    ``cuda:N``  CUDA device N (``N < torch.cuda.device_count()``)

Precisions
    ``fp32``    IEEE fp32 everywhere: TF32 off for cuBLAS and cuDNN,
                ``torch.set_float32_matmul_precision("highest")``
    ``tf32``    TF32 on for cuBLAS and cuDNN (``"high"``); the Triton kernels read
                the same setting. Same as fp32 on the CPU.
    ``bf16``    ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the
                forward pass and the loss of training and evaluation; the weights,
                gradients and optimizer state stay fp32 (no loss scaling needed for
                bf16); what runs outside autocast is IEEE fp32, as with ``fp32``.

The TF32 switches are process-wide: :func:`precision_flags` sets them for the
duration of a run and restores the previous values afterwards. Only the legacy
switches present in every supported torch (``allow_tf32``,
``set_float32_matmul_precision``) are used; a state left by torch's newer
``fp32_precision`` API is read and restored through that API.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

import torch

__all__ = ["DEVICES", "PRECISIONS", "resolve_device", "torch_device", "check_precision", "precision_flags",
           "autocast", "gpu_name", "describe"]

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("fp32", "tf32", "bf16")
_CUDA_N = re.compile(r"cuda:(\d+)")


def _allowed() -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = f"cuda, cuda:0..cuda:{n - 1}" if n else "cuda and cuda:N need a CUDA device, none is available here"
    return f"auto, cpu, {cuda}"


def resolve_device(spec, option: str = "--device") -> str:
    """The canonical device string of ``spec``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``"auto"`` resolved).

    ValueError naming ``option``, the value and what is allowed when the string is
    unknown or names a CUDA device this process cannot use.
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"{option} {spec!r}: expected a device name; allowed: {_allowed()}")
    s = spec.strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return "cpu"
    m = _CUDA_N.fullmatch(s)
    if s == "cuda" or m:
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec}: CUDA is not available in this process (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); allowed: auto, cpu")
        if m:
            n, count = int(m.group(1)), torch.cuda.device_count()
            if n >= count:
                raise ValueError(f"{option} {spec}: this machine has {count} CUDA device(s); allowed: auto, cpu, "
                                 f"cuda, cuda:0..cuda:{count - 1}")
            return f"cuda:{n}"
        return "cuda"
    raise ValueError(f"{option} {spec!r}: unknown device; allowed: {_allowed()}")


def torch_device(spec) -> torch.device:
    """The torch.device of a device string (``"cuda"`` = the current CUDA device, with its index)."""
    s = resolve_device(spec)
    if s == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(s)


def check_precision(precision, option: str = "--precision") -> str:
    if not isinstance(precision, str) or precision.strip().lower() not in PRECISIONS:
        raise ValueError(f"{option} {precision!r}: unknown precision; allowed: {', '.join(PRECISIONS)}")
    return precision.strip().lower()


# ---------------------------------------------------------------------------------------------- TF32 switches
def _new_api() -> dict:
    """The values of torch's newer ``fp32_precision`` switches (torch >= 2.9), where they exist."""
    out = {}
    for path in ("backends", "backends.cuda.matmul", "backends.cudnn", "backends.cudnn.conv", "backends.cudnn.rnn",
                 "backends.mkldnn", "backends.mkldnn.matmul", "backends.mkldnn.conv", "backends.mkldnn.rnn"):
        obj = torch
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            out[path] = getattr(obj, "fp32_precision")
        except (AttributeError, RuntimeError):
            continue
    return out


def _set_new_api(values: dict) -> None:
    for path, value in values.items():
        obj = torch
        for part in path.split("."):
            obj = getattr(obj, part)
        try:
            setattr(obj, "fp32_precision", value)
        except (AttributeError, RuntimeError, ValueError):
            pass


def _read_flags() -> dict:
    try:
        legacy = (bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32),
                  torch.get_float32_matmul_precision())
    except RuntimeError:  # the legacy getters raise after a mix of the legacy and the new API (torch >= 2.9)
        legacy = None
    return {"legacy": legacy, "new": _new_api() if legacy is None else {}}


def _write_flags(state: dict) -> None:
    if state["legacy"] is not None:
        matmul, cudnn, precision = state["legacy"]
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)
    else:
        _set_new_api(state["new"])


def _apply(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


@contextlib.contextmanager
def precision_flags(precision: str) -> Iterator[None]:
    """Set the TF32 switches for ``precision`` (fp32/bf16: off, "highest"; tf32: on, "high"); restore on exit."""
    precision = check_precision(precision)
    saved = _read_flags()
    _apply(precision)
    try:
        yield
    finally:
        _write_flags(saved)


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device type, bfloat16)`` for bf16, else a context that does nothing."""
    if check_precision(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def gpu_name(device) -> Optional[str]:
    """``torch.cuda.get_device_name`` of a CUDA device; None for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def describe(device, precision: str) -> dict:
    """What summary.json records: the device (with index), the GPU's name (or None) and the precision."""
    device = torch.device(device)
    return {"device": str(device), "gpu_name": gpu_name(device), "precision": precision}
