"""Atomic checkpoint files and the random-number-generator state of a run.

A checkpoint is written to a temporary file in the destination's directory,
flushed and fsync'ed, then moved over the old file with ``os.replace`` (atomic
on POSIX), and the directory is fsync'ed. A crash at any point leaves either
the previous checkpoint or the new one, never a partial file; the temporary
file of a killed save is removed when the run next starts
(:func:`remove_stale_temp_files`). Loading never modifies the file.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they contain only
tensors and plain Python containers (RNG states are converted accordingly), so
opening one cannot execute code.

Integrity: torch's zip container keeps no checksum of the tensor data, so a
flipped bit in the stored values loads silently. :func:`atomic_save` therefore
stores a SHA-256 of the content (key ``"checksum"``: every tensor's dtype, shape
and bytes, every other value, in order) and :func:`load_checkpoint` recomputes it
and refuses a mismatch, naming the file and leaving it untouched. A checkpoint
saved before checksums existed (version 1) loads with a warning
(:class:`UnverifiedCheckpointWarning`); a version 2 file without one is refused.
The content, not the file bytes, is hashed so that the checksum can live inside
the file it protects; SHA-256 because it runs at about 1 GB/s or more with the
SHA instructions of current x86 and ARM CPUs (a 784-4096-4096-10 MLP at density
0.1 with its SGD momentum, 48 MB of tensors: 50-80 ms more per save and per
load, measured on a shared 2-core machine; once per epoch and per resume).

A full disk during a save raises :class:`~sparsestart.train.paths.DiskFullError`
naming the file; the previous file is intact and the temporary file removed.

Device independence: :func:`atomic_save` writes every tensor as a CPU tensor,
:func:`load_checkpoint` maps whatever a file holds onto ``map_location`` (the
CPU by default), and the trainer then loads the state into a model already on
its device; :func:`move_optimizer_state_` puts the optimizer state next to its
parameters. A run trained on a GPU resumes on the CPU and back.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .paths import DiskFullError, disk_full_cause

__all__ = ["CheckpointError", "UnverifiedCheckpointWarning", "atomic_save", "atomic_write_text", "load_checkpoint",
           "content_checksum", "rng_state", "set_rng_state", "to_cpu", "move_optimizer_state_",
           "remove_stale_temp_files", "RUN_FILES", "FORMAT", "VERSION", "CHECKSUM_KEY"]

FORMAT = "sparsestart-train-checkpoint"
#: Version 2 files always carry a checksum; version 1 files (before checksums) are still read, with a warning.
#: The version is what tells an older file from one whose checksum entry was damaged: a flipped byte in the key
#: "checksum" must not pass the file off as an older, unverifiable one.
VERSION = 2
_READABLE = (1, VERSION)


#: The key of a checkpoint dict that holds the checksum of all its other entries.
CHECKSUM_KEY = "checksum"
_CHECKSUM_ALGORITHM = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, corrupt, or not matching the run); the file was left untouched."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without a checksum (saved by an older sparsestart) was loaded: its content is not verified."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    return f".{name}."


_TEMP_SUFFIX = ".tmp"
#: What tempfile.mkstemp puts between prefix and suffix: 8 characters of this alphabet.
_TEMP_RANDOM = r"[a-z0-9_]{8}"
#: The files a run directory holds that are written through a temporary file (:func:`_atomic_write`).
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json", "evaluation-final.json",
             "evaluation-best.json")


def _atomic_write(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=_TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        if disk_full_cause(exc) is not None:  # a full inode table
            raise DiskFullError(f"no space left on device while saving {path}", path) from exc
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, Exception) and disk_full_cause(exc) is not None:
            # torch.save reports a failed write as "[enforce fail at inline_container.cc] unexpected pos ..."
            raise DiskFullError(f"no space left on device while saving {path}", path) from exc
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(directory, names=RUN_FILES) -> list[Path]:
    """Delete the temporary files that an interrupted atomic write of ``directory/NAME`` left behind.

    A process killed during a save (kill -9, power cut) cannot remove its temporary file
    ``.NAME.XXXXXXXX.tmp``; a run calls this when it starts, before it writes anything. Only files that match
    that pattern exactly, for the ``names`` given, are removed; anything else is left alone. Returns the paths
    removed (a file that cannot be removed is skipped: it costs disk space only)."""
    directory = Path(directory)
    pattern = re.compile("|".join(rf"{re.escape(_temp_prefix(n))}{_TEMP_RANDOM}{re.escape(_TEMP_SUFFIX)}"
                                  for n in names))
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for p in entries:
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p)
    return removed


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in nested dicts, lists and tuples moved to the CPU (CPU tensors are kept as they are)."""
    if torch.is_tensor(obj):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: to_cpu(v) for k, v in obj.items()}
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())  # an OrderedDict state_dict keeps its _metadata
        out.__dict__.update(getattr(obj, "__dict__", {}))
        return out
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def _hash_into(h, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h``: a type tag, then the content; containers in order (a dict's order is
    kept by torch.save and torch.load). Tensors by dtype, shape and raw bytes; other leaves by repr (exact for
    floats; ints, bools, strings and None as written)."""
    if torch.is_tensor(obj):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k, v in obj.items():
            _hash_into(h, k)
            _hash_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for v in obj:
            _hash_into(h, v)
    else:
        text = repr(obj).encode("utf-8", "surrogatepass")
        h.update(f"P{type(obj).__name__}".encode() + struct.pack("<q", len(text)) + text)


def content_checksum(ckpt: dict) -> str:
    """``"sha256:<hex>"`` of every entry of ``ckpt`` but :data:`CHECKSUM_KEY` (see the module docstring)."""
    h = hashlib.new(_CHECKSUM_ALGORITHM)
    _hash_into(h, {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY})
    return f"{_CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same directory, fsync, os.replace).

    Tensors are saved as CPU tensors (:func:`to_cpu`): the file loads on a machine without the device. A dict
    gets (a fresh) :data:`CHECKSUM_KEY` entry, which :func:`load_checkpoint` verifies. A full disk raises
    :class:`~sparsestart.train.paths.DiskFullError`; the previous file at ``path`` is then intact."""
    obj = to_cpu(obj)
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM_KEY}, CHECKSUM_KEY: content_checksum(obj)}
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _verify_checksum(ckpt: dict, path: Path) -> None:
    stored = ckpt.get(CHECKSUM_KEY)
    if stored is None:
        return  # an older file: load_checkpoint warns once it knows the file is a checkpoint it reads
    if not isinstance(stored, str) or not stored.startswith(f"{_CHECKSUM_ALGORITHM}:"):
        raise CheckpointError(f"{path}: unreadable checksum entry {str(stored)[:80]!r}; the file is corrupt or was "
                              f"not written by sparsestart; the file was left untouched")
    if any(torch.is_tensor(t) and t.device.type == "meta" for t in _tensors(ckpt)):
        return  # loaded without values (map_location="meta", shapes only): there is nothing to verify
    computed = content_checksum(ckpt)
    if computed != stored:
        raise CheckpointError(f"{path} is corrupt: its content does not match the checksum stored when it was saved "
                              f"(stored {stored[:19]}..., computed {computed[:19]}...); a byte of the file changed "
                              f"on disk or in a copy. The file was left untouched; use another copy of the run")


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by the trainer, its tensors on ``map_location`` (default the CPU, whatever
    device they were saved from); :class:`CheckpointError` with the reason otherwise (a checksum mismatch
    among them). A version 1 file (before checksums) loads with an :class:`UnverifiedCheckpointWarning`;
    loaded onto the meta device it cannot be verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors ...
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the file was left untouched")
    if isinstance(ckpt, dict):
        _verify_checksum(ckpt, path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsestart training checkpoint; the file was left untouched")
    if ckpt.get("version") not in _READABLE:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}, this sparsestart reads "
                              f"versions {', '.join(map(str, _READABLE))}; the file was left untouched")
    if CHECKSUM_KEY not in ckpt and ckpt["version"] != 1:
        raise CheckpointError(f"{path} is corrupt: a version {ckpt['version']} checkpoint always carries a checksum "
                              f"and this one has none (a damaged entry name?); the file was left untouched")
    if CHECKSUM_KEY not in ckpt:
        warnings.warn(f"{path} has no checksum (saved by an older sparsestart): its content cannot be verified; "
                      f"the next save of the run adds one", UnverifiedCheckpointWarning, stacklevel=2)
    return ckpt


# ---------------------------------------------------------------------------------------------- optimizer state
def _is_capturable_or_fused(group: dict) -> bool:
    return bool(group.get("capturable", False) or group.get("fused", False))


@torch.no_grad()
def move_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """Move every tensor of the optimizer's per-parameter state onto its parameter's device, in place.

    Floating-point state takes the parameter's dtype (the master weights are fp32,
    so is their state), as ``Optimizer.load_state_dict`` does. The ``step``
    counters stay where torch keeps them (a CPU scalar unless the group is
    capturable or fused), so a plain optimizer takes no device sync per step.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    if _is_capturable_or_fused(group):
                        state[key] = value.to(device=p.device, dtype=_step_dtype(value))
                    continue
                if value.is_floating_point() and p.is_floating_point():
                    state[key] = value.to(device=p.device, dtype=p.dtype)
                else:
                    state[key] = value.to(device=p.device)


def _step_dtype(value: torch.Tensor) -> torch.dtype:
    return value.dtype if value.is_floating_point() else torch.float32


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state(device=None) -> dict:
    """torch, numpy and python ``random`` global states, as tensors and plain containers; for a CUDA
    ``device`` also that device's generator state (key "cuda")."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": json.dumps(random.getstate()),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device=None) -> None:
    """Restore :func:`rng_state`; the CUDA generator of a CUDA ``device`` too when the state has one (a state
    saved on a GPU restores on the CPU without it, and one saved on the CPU leaves the CUDA generator alone)."""
    import numpy as np

    if device is not None and torch.device(device).type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.device(device))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
