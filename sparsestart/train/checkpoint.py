"""Atomic checkpoint files and the random-number-generator state of a run.

A checkpoint is written to a temporary file in the destination's directory,
flushed and fsync'ed, then moved over the old file with ``os.replace`` (atomic
on POSIX), and the directory is fsync'ed. A crash at any point leaves either
the previous checkpoint or the new one, never a partial file. Loading never
modifies the file.

Checkpoints are loaded with ``torch.load(weights_only=True)``: they contain only
tensors and plain Python containers (RNG states are converted accordingly), so
opening one cannot execute code.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state",
           "FORMAT", "VERSION"]

FORMAT = "sparsestart-train-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, corrupt, or not matching the run); the file was left untouched."""


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


def _atomic_write(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same directory, fsync, os.replace)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by the trainer; :class:`CheckpointError` with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors ...
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the file was left untouched")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsestart training checkpoint; the file was left untouched")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}, this sparsestart reads "
                              f"version {VERSION}; the file was left untouched")
    return ckpt


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """torch, numpy and python ``random`` global states, as tensors and plain containers."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
