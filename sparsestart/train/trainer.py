"""The training loop: build data, model, optimizer, schedule and sparse method; train, log, checkpoint, evaluate.

Run directory layout (``--out DIR``)::

    checkpoint.pt   full state after the last completed epoch (atomic, every epoch)
    best.pt         model (+ method state) of the epoch with the best validation accuracy
    metrics.jsonl   one JSON object per epoch
    metrics.csv     the same rows as CSV
    summary.json    written when the run finishes (config, metrics, layers, FLOPs, memory, time)
    tensorboard/    with --tensorboard
    .sparsestart.lock  while a process writes the run: a second one is refused (paths.RunLock)

On CPU a run resumed from ``checkpoint.pt`` produces the same metrics, bit for
bit, as an uninterrupted run: the checkpoint holds the model (values and
structure), optimizer, LR schedule, method state, the data iterator's generator
and the torch / numpy / python (and CUDA) RNG states, and every epoch is a pure
function of them. The same holds on one GPU where the kernels are deterministic.

Device (``cfg.device``): the model is built and sparsified on the CPU (the same
initial weights and ER structure on every device), then moved to the device
together with the whole dataset; the algorithm and optimizer state are created
there. The data order and augmentation come from a CPU generator, so a run
draws the same batches on every device. Checkpoints hold CPU tensors: a run
trained on a GPU resumes on the CPU (``--resume DIR --device cpu``) and back.
Precision (``cfg.precision``): see :mod:`sparsestart.train.device`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import nn as snn
from .. import runtime
from . import distributed
from .checkpoint import (FORMAT, VERSION, CheckpointError, atomic_save, atomic_write_text, load_checkpoint,
                         remove_stale_temp_files, rng_state)
from .config import RESUME_CHANGEABLE, TrainConfig, config_from_dict, resolve, resolve_device, validate
from .data import (BatchIterator, Dataset, adapt_images, fashion_mnist_available, load_dataset, load_digits_images,
                   load_image_dir)
from .device import describe, precision_flags
from .paths import DiskFullError, RunLock, check_output_dir, disk_full_cause
from .run import LRFactor, RunState, build_net, build_run  # noqa: F401  (LRFactor, build_net: public here too)
from .verdict import verdict as verdict_lines
from .metrics import _Pixels, basic_metrics, evaluate_model, forward_flops, predict_logits

# Building a run (model, optimizer, schedule, method) lives in run.py, re-evaluating a saved run in
# evaluate.py, the closing verdict in verdict.py.
__all__ = ["Trainer", "RunState", "build_net", "build_run", "shifted_set", "LRFactor", "train"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
_TIME_KEYS = ("epoch_seconds", "elapsed_seconds")


def shifted_set(cfg: TrainConfig, data: Dataset):
    """(description, float images in [0, 1] shaped like the data) of the shifted OoD set, or (None, reason)."""
    if cfg.ood_dir:
        split, desc = load_image_dir(cfg.ood_dir)
        return desc, adapt_images(split.pixels(), data.shape)
    if data.name == "fashion-mnist":
        x, _ = load_digits_images(28)
        return "digits (scikit-learn, upsampled to 28x28)", adapt_images(x, data.shape)
    if data.name == "digits":
        if fashion_mnist_available(cfg.data_dir):
            fm = load_dataset("fashion-mnist", cfg.data_dir, test_limit=2000)
            return "fashion-mnist test (first 2000)", adapt_images(fm.test.pixels(), data.shape)
        if cfg.data_dir:
            return None, f"Fashion-MNIST is not in --data-dir {cfg.data_dir}"
        return None, "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
    return None, "no --ood-dir given for a real shifted set"


def _layer_stats(net: nn.Module) -> tuple[int, int]:
    """(stored weights, dense weights) of the sparse layers (of all Linear/Conv2d layers if none is sparse)."""
    sparse = [m for m in net.modules() if isinstance(m, snn.SparseLayer)]
    if sparse:
        return sum(m.nnz for m in sparse), sum(math.prod(m.weight_shape) for m in sparse)
    dense = [m.weight.numel() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(dense), sum(dense)


def _dense_gradient_updates(algorithm) -> int:
    """Steps so far at which the method computed a dense gradient (RigL-style gradient growth).

    RigL and gradual prune-and-regrow with gradient growth capture the dense
    gradient every ``update_every`` steps before ``end_step``.
    """
    if getattr(algorithm, "growth", None) != "gradient" or not getattr(algorithm, "drop_fraction", 0):
        return 0
    every, end = getattr(algorithm, "update_every", None), getattr(algorithm, "end_step", None)
    steps = getattr(algorithm, "step_count", None)
    if not all(isinstance(v, int) for v in (every, end, steps)) or every < 1:
        return 0
    return max(0, min(steps, end - 1)) // every


@contextlib.contextmanager
def _on_device(device: torch.device):
    """Make a CUDA run's device the current one (kernels launch there; a no-op on the CPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _backend_name(net: nn.Module, device: torch.device) -> str:
    """The sparse backend the run's SpMM runs on (what summary.json records)."""
    if device.type == "cpu":
        return "cpu (C++)" if getattr(__import__("sparsestart").ops, "NATIVE_AVAILABLE", False) \
            else "reference (pure PyTorch)"
    layer = next((m for m in net.modules() if isinstance(m, snn.SparseLayer)), None)
    if layer is None:
        return "none (dense model)"
    try:
        from ..ops import registry

        x = torch.zeros(layer.matrix_shape[1], 8, dtype=layer.values.dtype, device=layer.values.device)
        return registry.choose("spmm", [layer.values, layer.rowptr, x]).name  # the probe of ops.library
    except Exception as exc:  # a description only: never fail a finished run over it
        return f"unknown ({type(exc).__name__})"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() <= 64 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _validate_given(cfg: TrainConfig, given, where: str, changeable=()) -> None:
    """:func:`validate` a configuration assembled from a saved one and the options ``given`` now.

    A complaint about a given option reads as for a new run (``--threads: -3 is outside ...``); one about a
    saved value says where it comes from (``where``) and, for the keys in ``changeable``, how to override it
    (a run saved with --threads 64 on a big machine resumes on a laptop with --threads 4)."""
    try:
        validate(cfg)
    except ValueError as exc:
        msg = str(exc)
        m = re.match(r"--([a-z][a-z0-9-]*):", msg)
        key = m.group(1).replace("-", "_") if m else None
        if key is not None and dict(given).get(key) is not None:
            raise ValueError(msg) from None
        hint = f" (give --{key.replace('_', '-')} to override the saved value)" if key in changeable else ""
        raise ValueError(f"{where}: {msg}{hint}") from None


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One run in ``out_dir``: a fresh one, or (``resume=True``) the one whose checkpoint is there.

    ``cfg`` is ignored when resuming (the checkpoint's configuration is used)
    except for the keys of ``RESUME_CHANGEABLE`` (threads, tensorboard,
    progress, final_eval, data_dir, ood_dir, device) given in ``overrides``;
    other overrides (precision among them) must equal the saved values. A run
    resumes on the device it trained on unless ``device`` is overridden: that is
    how a run trained on a GPU continues on the CPU and back.
    """

    def __init__(self, cfg: Optional[TrainConfig], out_dir, *, resume: bool = False, overrides: Optional[dict] = None,
                 explicit: frozenset = frozenset(), log: Callable[[str], None] = print):
        distributed.check_launch()
        self.out = Path(out_dir)
        self.log = distributed.main_only(log)
        self.session_start = time.perf_counter()
        ckpt = None
        self._disk_mark = None  # what CHECKPOINT on disk was when this trainer read it (None: absent)
        if resume:
            self._disk_mark = self._checkpoint_mark()
            ckpt = load_checkpoint(self.out / CHECKPOINT)
            saved = config_from_dict(ckpt["config"], where=f"{self.out / CHECKPOINT}")
            diffs = []
            for k, v in (overrides or {}).items():
                if k in RESUME_CHANGEABLE:
                    setattr(saved, k, v)
                elif getattr(saved, k) != v:
                    diffs.append(f"{k}: saved {getattr(saved, k)!r}, given {v!r}")
            if diffs:
                raise CheckpointError(f"--resume {self.out}: the given options differ from the run being resumed "
                                      f"({'; '.join(diffs)}); drop them or start a new run with another --out")
            try:
                saved.device = resolve_device(saved.device)
            except ValueError as exc:
                hint = "" if "device" in (overrides or {}) else \
                    f" (the run trained on {saved.device}; continue it here with --resume {self.out} --device cpu)"
                raise ValueError(f"{exc}{hint}") from None
            # The runtime overrides (--threads -3) and the saved configuration (an edited checkpoint) are checked
            # as those of a new run are.
            _validate_given(saved, overrides or {}, f"the configuration saved in {self.out / CHECKPOINT}",
                            RESUME_CHANGEABLE)
            cfg = saved
        else:
            if cfg is None:
                cfg = TrainConfig()
            cfg = resolve(cfg)
            validate(cfg, explicit)
            if (self.out / CHECKPOINT).exists():
                raise ValueError(f"--out {self.out} already holds a run ({CHECKPOINT}); continue it with "
                                 f"--resume {self.out}, or choose another --out")
        self.cfg = cfg
        self._what = f"{'--resume' if resume else '--out'} {self.out}"
        # Before the data and the model: a run directory that cannot be written fails now, not after an epoch.
        check_output_dir(self.out, "--resume" if resume else "--out")
        # Identifies the run in every file it saves (checkpoint.pt, best.pt, summary.json): ``evaluate --which best``
        # compares it to tell this run's best.pt from one copied in from another run. A random id rather than a
        # hash of the configuration: two runs of one configuration (on a GPU, where runs are not bit-identical, or
        # with another sparsestart version) are different runs with different best models.
        self.run_id = str((ckpt or {}).get("run_id") or uuid.uuid4().hex)
        self._saved_epoch = int(ckpt["epoch"]) if ckpt else None  # of the checkpoint on disk, for error messages
        self.writer = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if cfg.retain_memory:
            runtime.retain_freed_memory()
        data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                            train_limit=cfg.train_limit, test_limit=cfg.test_limit, augment=cfg.augment)
        if ckpt is not None:
            saved_data = ckpt.get("dataset", {})
            now = data.describe()
            keys = ("name", "shape", "num_classes", "train", "val", "test", "mean", "std")
            if any(_jsonable(saved_data.get(k)) != _jsonable(now[k]) for k in keys):
                raise CheckpointError(f"--resume {self.out}: the dataset differs from the one the run started with "
                                      f"(saved {[saved_data.get(k) for k in keys]}, now {[now[k] for k in keys]})")
        self.run = build_run(cfg, data, ckpt)
        self.epoch = int(ckpt["epoch"]) if ckpt else 0
        self.step = int(ckpt["step"]) if ckpt else 0
        self.history = list(ckpt["history"]) if ckpt else []
        self.best = dict(ckpt["best"]) if ckpt else {"epoch": None, "val_accuracy": -1.0}
        self.train_flops = int(ckpt["train_flops"]) if ckpt else 0
        self.samples_seen = int(ckpt["samples_seen"]) if ckpt else 0
        self.elapsed_before = float(ckpt["elapsed"]) if ckpt else 0.0
        self.train_seconds = float(ckpt["train_seconds"]) if ckpt else 0.0
        self.out.mkdir(parents=True, exist_ok=True)
        main = distributed.is_main()  # only rank 0 writes into the run directory
        self._lock = RunLock(self.out)
        if main:
            self._lock.acquire(self._what)
            if ckpt is None and (self.out / CHECKPOINT).exists():  # written by another process since the check above
                self._lock.release()
                raise ValueError(f"--out {self.out} already holds a run ({CHECKPOINT}); continue it with "
                                 f"--resume {self.out}, or choose another --out")
            self._check_unchanged()
        try:
            self._start_writing(ckpt, main)
        except BaseException:
            self._lock.release()
            raise

    def _start_writing(self, ckpt, main: bool) -> None:
        cfg = self.cfg
        if main:
            stale = remove_stale_temp_files(self.out)
            if stale:
                self.log(f"removed {len(stale)} temporary file(s) left by an interrupted save: "
                         f"{', '.join(p.name for p in stale)}")
        if ckpt is not None and main:
            # Rows of epochs after the checkpoint (a crash between the two writes) are dropped.
            self._rewrite_metrics()
        if cfg.tensorboard and main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        # Several ranks: the DDP wrapper, data shards, synchronised structure decisions (distributed.py).
        self.parallel = distributed.DistributedRun(self.run, self._state)

    # ------------------------------------------------------------------ helpers
    def _checkpoint_mark(self):
        """(inode, size, mtime) of the checkpoint file, None when there is none: an atomic save replaces the
        inode, so a checkpoint written by another process shows as a different mark."""
        try:
            st = os.stat(self.out / CHECKPOINT)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _check_unchanged(self) -> None:
        if self._checkpoint_mark() != self._disk_mark:
            self._lock.release()
            raise CheckpointError(f"{self._what}: {self.out / CHECKPOINT} was written by another process after this "
                                  f"one read the run; nothing was written; start again with --resume {self.out}")

    @contextlib.contextmanager
    def _writing(self):
        """Hold the run directory's lock (rank 0) while the block writes into it; released afterwards, so that the
        run can be resumed in this process once it returns."""
        if not self.parallel.is_main:
            yield
            return
        if not self._lock.held:  # held from __init__ on the first call; a later call takes it again
            self._lock.acquire(self._what)
            self._check_unchanged()
        try:
            yield
        except Exception as exc:
            full = disk_full_cause(exc)
            if full is None:
                raise
            saved = f"the last completed epoch ({self._saved_epoch}) is saved at {self.out / CHECKPOINT}; free " \
                    f"some space and continue with: sparsestart train --resume {self.out}" \
                if self._saved_epoch else "no epoch was saved yet; free some space and start the run again"
            path = getattr(full, "filename", None) or getattr(exc, "filename", None) or self.out
            raise DiskFullError(f"no space left on device while saving {path}; {saved}", path) from exc
        finally:
            self._lock.release()

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.session_start)

    def _rewrite_metrics(self) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(_jsonable(r)) + "\n" for r in self.history))
        self._write_csv()

    def _write_csv(self) -> None:
        if not self.history:
            atomic_write_text(self.out / "metrics.csv", "")
            return
        buf = io.StringIO()
        keys = list(self.history[0])
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in self.history:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())

    def _append_metrics(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        self._write_csv()

    def _log_tensorboard(self, row: dict, stats: dict) -> None:
        """One point per epoch (x = epoch): every number of the metrics row under its metrics.jsonl name (losses,
        accuracies, lr at the epoch's start, density, ...), ``density/<layer>`` of each sparse layer and
        ``train_step_seconds``, the mean wall time of the epoch's training steps."""
        if self.writer is None:
            return
        epoch = row["epoch"]
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                self.writer.add_scalar(k, v, epoch)
        for name, density in stats["layer_density"].items():
            self.writer.add_scalar(f"density/{name}", density, epoch)
        if stats["steps"]:
            self.writer.add_scalar("train_step_seconds", stats["seconds"] / stats["steps"], epoch)
        self.writer.flush()

    def _state(self) -> dict:
        r = self.run
        return {
            "format": FORMAT, "version": VERSION, "kind": "checkpoint", "run_id": self.run_id,
            "config": self.cfg.to_dict(), "dataset": r.data.describe(),
            "epoch": self.epoch, "step": self.step,
            "model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(), "algorithm": r.algorithm.state_dict(),
            "data_rng": r.generator.get_state(), "rng": rng_state(r.device),
            "history": self.history, "best": self.best, "train_flops": self.train_flops,
            "samples_seen": self.samples_seen, "elapsed": self._elapsed(), "train_seconds": self.train_seconds,
        }

    def _save_best(self) -> None:
        r = self.run
        atomic_save({"format": FORMAT, "version": VERSION, "kind": "best", "run_id": self.run_id,
                     "config": self.cfg.to_dict(),
                     "dataset": r.data.describe(), "epoch": self.epoch, "model": r.model.state_dict(),
                     "algorithm": r.algorithm.state_dict()},
                    self.out / BEST)

    # ------------------------------------------------------------------ training
    def _train_epoch(self) -> dict:
        from tqdm import tqdm

        r, cfg, par = self.run, self.cfg, self.parallel
        r.model.train()
        t_start, step_start = time.perf_counter(), self.step  # for the step time TensorBoard shows
        it = BatchIterator(r.data.train, cfg.batch_size, r.generator, augment=r.data.augment)
        # Sums kept on the device (float64: the same arithmetic as Python floats), read once per epoch, so that a
        # GPU step never waits for the host; the progress bar reads them every 10 steps when it is shown.
        loss_sum = torch.zeros((), dtype=torch.float64, device=r.device)
        correct = torch.zeros((), dtype=torch.int64, device=r.device)
        seen = 0
        bar = tqdm(total=len(it), desc=f"epoch {self.epoch + 1}/{r.total_epochs}", unit="batch", leave=False,
                   dynamic_ncols=True, disable=None if cfg.progress and par.is_main else True)
        try:
            for x, y, n_batch in par.batches(it):  # this rank's shard of each global batch of n_batch
                with r.autocast():
                    logits = par.model(x)
                    loss = par.loss(logits, y, n_batch)
                r.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                par.after_backward()
                r.optimizer.step()
                r.algorithm.step()
                r.scheduler.step()
                self.step += 1
                n = y.numel()
                loss_sum += loss.detach().double() * n_batch / par.world
                correct += (logits.detach().argmax(1) == y).sum()
                seen += n
                bar.update(1)
                if not bar.disable and (self.step % 10 == 0 or seen == len(r.data.train)):
                    bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.4f}")
        finally:
            bar.close()
        loss_sum, correct, seen = par.end_epoch(float(loss_sum), int(correct), seen)  # over all ranks
        return dict(train_loss=loss_sum / max(seen, 1), train_accuracy=correct / max(seen, 1), samples=seen,
                    seconds=time.perf_counter() - t_start, steps=self.step - step_start,
                    # taken now: IMP prunes at the end of a level, after the evaluation that row["density"] is from
                    layer_density={name: m.nnz / math.prod(m.weight_shape) for name, m in r.net.named_modules()
                                   if isinstance(m, snn.SparseLayer)})

    def fit(self, stop_after: Optional[int] = None) -> Optional[dict]:
        """Train the remaining epochs (at most ``stop_after`` of them); the summary dict when the run is done
        (distributed: on rank 0, None on the other ranks). The TF32 switches of ``cfg.precision`` are set
        meanwhile and restored afterwards."""
        with self._writing(), precision_flags(self.cfg.precision), _on_device(self.run.device):
            return self._fit(stop_after)

    def _fit(self, stop_after: Optional[int]) -> Optional[dict]:
        r, cfg = self.run, self.cfg
        total = r.total_epochs
        main = self.parallel.is_main  # rank 0 alone evaluates and writes; all ranks hold the same state
        if self.epoch >= total:
            self.log(f"{self.out}: all {total} epochs are done")
            if not main:
                return None
            return self._finish() if not (self.out / "summary.json").exists() else \
                json.loads((self.out / "summary.json").read_text())
        done_now = 0
        dense_updates_before = _dense_gradient_updates(r.algorithm)
        while self.epoch < total:
            if stop_after is not None and done_now >= stop_after:
                self.log(f"stopped after {done_now} epoch(s); continue with: sparsestart train --resume {self.out}")
                return None
            t0 = time.perf_counter()
            fl = forward_flops(r.net, r.data.shape)
            lr = r.optimizer.param_groups[0]["lr"]
            stats = self._train_epoch()
            self.train_seconds += time.perf_counter() - t0
            self.samples_seen += stats["samples"]
            updates = _dense_gradient_updates(r.algorithm)
            self.train_flops += 3 * fl["sparse"] * stats["samples"] + \
                (updates - dense_updates_before) * cfg.batch_size * fl["dense"]
            dense_updates_before = updates
            self.epoch += 1
            row, improved = self._evaluate_epoch(stats, lr, t0) if main else (None, False)
            # IMP: the level ends after the evaluation of its trained weights.
            if r.phases > 1 and self.epoch % cfg.epochs == 0 and self.epoch < total:
                r.algorithm.prune_and_rewind()  # also resets the optimizer state (IMP's reset_optimizer)
            if main:
                row["elapsed_seconds"] = self._elapsed()
                self._append_metrics(row)
                self._log_tensorboard(row, stats)
                if improved:
                    self._save_best()
                atomic_save(self._state(), self.out / CHECKPOINT)
                self._saved_epoch, self._disk_mark = self.epoch, self._checkpoint_mark()
                self.log(f"epoch {self.epoch}/{total}: train loss {row['train_loss']:.4f} acc "
                         f"{row['train_accuracy']:.4f} | val acc {row['val_accuracy']:.4f} | test acc "
                         f"{row['test_accuracy']:.4f} | density {row['density']:.4f} | {row['epoch_seconds']:.1f} s")
            self.parallel.wait_for_main()  # the epoch ends on every rank with its checkpoint on disk
            done_now += 1
        return self._finish() if main else None

    def _evaluate_epoch(self, stats: dict, lr: float, t0: float) -> tuple[dict, bool]:
        """The metrics row of the epoch just trained (validation and test evaluated), and whether it is the best."""
        r, cfg = self.run, self.cfg
        val = basic_metrics(predict_logits(r.model, _Pixels(r.data.val), cfg.eval_batch_size, autocast=r.autocast),
                            r.data.val.labels)
        test = basic_metrics(predict_logits(r.model, _Pixels(r.data.test), cfg.eval_batch_size, autocast=r.autocast),
                             r.data.test.labels)
        nnz, numel = _layer_stats(r.net)
        row = {"epoch": self.epoch, "step": self.step, "lr": lr,
               "train_loss": stats["train_loss"], "train_accuracy": stats["train_accuracy"],
               **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
               "nnz": nnz, "density": nnz / numel if numel else 1.0,
               "samples_seen": self.samples_seen, "train_flops": self.train_flops,
               "epoch_seconds": time.perf_counter() - t0, "elapsed_seconds": None}
        self.history.append(row)
        improved = val["accuracy"] > self.best["val_accuracy"]
        if improved:
            self.best = {"epoch": self.epoch, "val_accuracy": val["accuracy"]}
        return row, improved

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Final evaluation and summary.json (``fit`` calls it when the last epoch is done)."""
        with self._writing(), precision_flags(self.cfg.precision), _on_device(self.run.device):
            return self._finish()

    def _finish(self) -> dict:
        r, cfg = self.run, self.cfg
        t0 = time.perf_counter()
        final = {"epoch": self.epoch}
        last = self.history[-1] if self.history else {}
        final["val"] = {k[4:]: v for k, v in last.items() if k.startswith("val_")}
        if cfg.final_eval:
            self.log("final evaluation: test, OoD (Gaussian, uniform, shifted), FGSM ...")
            try:
                shifted = shifted_set(cfg, r.data)
            except (FileNotFoundError, ValueError) as exc:
                shifted = (None, f"shifted set unavailable: {exc}")
            final["test"] = evaluate_model(r.model, r.data.test, mean=r.data.mean, std=r.data.std, shifted=shifted,
                                           fgsm_eps=cfg.fgsm_eps, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                           autocast=r.autocast)
        else:
            final["test"] = {k[5:]: v for k, v in last.items() if k.startswith("test_")}
        best_row = next((h for h in self.history if h["epoch"] == self.best["epoch"]), {})
        fl = forward_flops(r.net, r.data.shape)
        s = fl["summary"]
        tot = s.total
        model_bytes = sum(t.numel() * t.element_size() for t in r.net.parameters()) + \
            sum(t.numel() * t.element_size() for t in r.net.buffers())
        layers = [{k: row[k] for k in ("name", "type", "shape", "numel", "nnz", "density", "sparse_bytes",
                                       "dense_bytes", "index_bytes", "sparse_flops", "dense_flops")}
                  for row in s.rows]
        summary = {
            "run_id": self.run_id,
            "config": self.cfg.to_dict(),
            "dataset": r.data.describe(),
            "epochs": self.epoch,
            "final": final,
            "best_val": {"epoch": self.best["epoch"],
                         "val": {k[4:]: v for k, v in best_row.items() if k.startswith("val_")},
                         "test": {k[5:]: v for k, v in best_row.items() if k.startswith("test_")},
                         "model_file": BEST},
            "layers": layers,
            "density": (lambda a, b: a / b if b else 1.0)(*_layer_stats(r.net)),
            "flops": {"forward_per_sample": fl["sparse"], "dense_forward_per_sample": fl["dense"],
                      "training_total": self.train_flops, "samples_seen": self.samples_seen,
                      "dense_training_total": 3 * fl["dense"] * self.samples_seen,
                      "note": "multiply-adds of Linear/Conv2d layers counting stored nonzeros; training = "
                              "3 x forward per sample seen (+ dense gradients at RigL-style updates)"},
            "memory": {"layers_bytes": tot["sparse_bytes"], "layers_dense_bytes": tot["dense_bytes"],
                       "layers_index_bytes": tot["index_bytes"], "model_bytes": model_bytes,
                       "model_dense_bytes": model_bytes - tot["sparse_bytes"] + tot["dense_bytes"]},
            "method": {"name": cfg.method, "history": _jsonable(getattr(r.algorithm, "history", []))},
            "flow_report": _jsonable(getattr(getattr(r.net, "flow_report", None), "__dict__", None)),
            "train_seconds": self.train_seconds,
            "final_eval_seconds": time.perf_counter() - t0,
            "wall_time_seconds": self._elapsed(),
            **describe(r.device, cfg.precision),
            "threads": torch.get_num_threads(),
            "malloc": runtime.malloc_settings(),
            "backend": _backend_name(r.net, r.device),
        }
        summary = _jsonable(summary)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.writer is not None:
            self.writer.close()
        t = final["test"]
        self.log(f"done: test accuracy {t.get('accuracy', float('nan')):.4f} (best val epoch {self.best['epoch']}: "
                 f"test {best_row.get('test_accuracy', float('nan')):.4f}), {self.train_seconds:.1f} s training, "
                 f"{summary['wall_time_seconds']:.1f} s total -> {self.out / 'summary.json'}")
        for line in verdict_lines(summary):
            self.log(line)
        return summary


def train(out_dir, cfg: Optional[TrainConfig] = None, *, stop_after: Optional[int] = None, **overrides) -> Optional[dict]:
    """Python entry point: ``train("runs/x", dataset="digits", epochs=1)``; returns the summary dict."""
    if cfg is None:
        cfg = TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown option {k!r}")
        setattr(cfg, k, v)
    return Trainer(cfg, out_dir, explicit=frozenset(overrides)).fit(stop_after=stop_after)
