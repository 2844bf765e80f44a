"""The files of a run directory as the trainer writes them: who may write (the lock, a checkpoint written by
another process), the per-epoch metrics files and TensorBoard scalars, and a full disk reported in one line.

Layout (see :mod:`sparsestart.train.trainer`): ``checkpoint.pt``, ``best.pt``, ``metrics.jsonl``,
``metrics.csv``, ``summary.json``, ``tensorboard/`` and, while a process writes, ``.sparsestart.lock``.
Only the distributed rank 0 holds a :class:`RunDirectory` open for writing; the saves themselves are atomic
(:mod:`sparsestart.train.checkpoint`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import CheckpointError, atomic_save, atomic_write_text, remove_stale_temp_files
from .paths import DiskFullError, RunLock, disk_full_cause

__all__ = ["CHECKPOINT", "BEST", "jsonable", "RunDirectory"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


def jsonable(v):
    """``v`` with tensors, tuples and non-finite floats turned into what JSON holds (a tensor of more than 64
    numbers as a short description)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 64 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


class RunDirectory:
    """``out`` as one trainer writes it; ``what`` (``--out DIR`` / ``--resume DIR``) names it in messages.

    ``disk_mark`` is the checkpoint file as this process read it (:meth:`checkpoint_mark`) and
    ``saved_epoch`` the epoch it holds (None: no checkpoint yet); both follow every :meth:`save_checkpoint`.
    """

    def __init__(self, out, what: str, *, disk_mark=None, saved_epoch: Optional[int] = None,
                 log: Callable[[str], None] = print):
        self.out, self.what, self.log = Path(out), what, log
        self.disk_mark, self.saved_epoch = disk_mark, saved_epoch
        self.lock = RunLock(self.out)
        self.writer = None  # the TensorBoard SummaryWriter, opened by open_tensorboard

    # ------------------------------------------------------------------ who may write
    def checkpoint_mark(self):
        """(inode, size, mtime) of the checkpoint file, None when there is none: an atomic save replaces the
        inode, so a checkpoint written by another process shows as a different mark."""
        try:
            st = os.stat(self.out / CHECKPOINT)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        """Refuse (releasing the lock) when the checkpoint on disk is no longer the one this process read."""
        if self.checkpoint_mark() != self.disk_mark:
            self.lock.release()
            raise CheckpointError(f"{self.what}: {self.out / CHECKPOINT} was written by another process after this "
                                  f"one read the run; nothing was written; start again with --resume {self.out}")

    def claim(self, fresh: bool) -> None:
        """Take the lock for the first time; ``fresh``: refuse when a checkpoint appeared since the new run was
        checked (another process started a run in ``out`` meanwhile)."""
        self.lock.acquire(self.what)
        if fresh and (self.out / CHECKPOINT).exists():
            self.lock.release()
            raise ValueError(f"--out {self.out} already holds a run ({CHECKPOINT}); continue it with "
                             f"--resume {self.out}, or choose another --out")
        self.check_unchanged()

    @contextlib.contextmanager
    def writing(self):
        """Hold the lock while the block writes (taken again when a previous block released it) and release it
        afterwards, so that the run can be resumed in this process once the block returns. A full disk
        surfaces as a :class:`~sparsestart.train.paths.DiskFullError` that says what is saved and how to go on."""
        if not self.lock.held:
            self.lock.acquire(self.what)
            self.check_unchanged()
        try:
            with self._disk_full_says_what_is_saved():
                yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def _disk_full_says_what_is_saved(self):
        """A full disk in the block as one :class:`~sparsestart.train.paths.DiskFullError` that says which epoch
        is saved and how to go on."""
        try:
            yield
        except Exception as exc:
            full = disk_full_cause(exc)
            if full is None:
                raise
            saved = f"the last completed epoch ({self.saved_epoch}) is saved at {self.out / CHECKPOINT}; free " \
                    f"some space and continue with: sparsestart train --resume {self.out}" \
                if self.saved_epoch else "no epoch was saved yet; free some space and start the run again"
            path = getattr(full, "filename", None) or getattr(exc, "filename", None) or self.out
            raise DiskFullError(f"no space left on device while saving {path}; {saved}", path) from exc

    # ------------------------------------------------------------------ opening
    def open(self, history: list, resumed: bool, tensorboard: bool) -> None:
        """Before the first epoch: remove temporary files of an interrupted save, drop the metrics rows of
        epochs after the checkpoint (a crash between the two writes) and open TensorBoard's writer."""
        stale = remove_stale_temp_files(self.out)
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) left by an interrupted save: "
                     f"{', '.join(p.name for p in stale)}")
        if resumed:
            with self._disk_full_says_what_is_saved():  # a resume on a full disk fails here, before any epoch
                self.rewrite_metrics(history)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    # ------------------------------------------------------------------ per epoch
    def rewrite_metrics(self, history: list) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(jsonable(r)) + "\n" for r in history))
        self._write_csv(history)

    def _write_csv(self, history: list) -> None:
        if not history:
            atomic_write_text(self.out / "metrics.csv", "")
            return
        buf = io.StringIO()
        keys = list(history[0])
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in history:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())

    def append_metrics(self, row: dict, history: list) -> None:
        """``row`` (the last of ``history``) appended to metrics.jsonl; metrics.csv rewritten from ``history``."""
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
        self._write_csv(history)

    def log_tensorboard(self, row: dict, layer_density: dict, steps: int, seconds: float) -> None:
        """One point per epoch (x = epoch): every number of the metrics row under its metrics.jsonl name
        (losses, accuracies, lr at the epoch's start, density, ...), ``density/<layer>`` of each sparse layer
        and ``train_step_seconds``, the mean wall time of the epoch's training steps."""
        if self.writer is None:
            return
        epoch = row["epoch"]
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                self.writer.add_scalar(k, v, epoch)
        for name, density in layer_density.items():
            self.writer.add_scalar(f"density/{name}", density, epoch)
        if steps:
            self.writer.add_scalar("train_step_seconds", seconds / steps, epoch)
        self.writer.flush()

    def save_best(self, state: dict) -> None:
        atomic_save(state, self.out / BEST)

    def save_checkpoint(self, state: dict, epoch: int) -> None:
        atomic_save(state, self.out / CHECKPOINT)
        self.saved_epoch, self.disk_mark = epoch, self.checkpoint_mark()

    # ------------------------------------------------------------------ the end
    def write_summary(self, summary: dict) -> Path:
        path = self.out / "summary.json"
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        if self.writer is not None:
            self.writer.close()
        return path
