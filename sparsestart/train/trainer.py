"""The training loop: build data, model, optimizer, schedule and sparse method; train, log, checkpoint, evaluate.

Run directory layout (``--out DIR``)::

    checkpoint.pt   full state after the last completed epoch (atomic, every epoch)
    best.pt         model (+ method state) of the epoch with the best validation accuracy among the sparsest epochs
    metrics.jsonl   one JSON object per epoch
    metrics.csv     the same rows as CSV
    summary.json    written when the run finishes (config, metrics, layers, FLOPs, memory, time)
    tensorboard/    with --tensorboard
    .sparsestart.lock  while a process writes the run: a second one is refused (paths.RunLock)

On CPU a run resumed from ``checkpoint.pt`` produces the same metrics, bit for
bit, as an uninterrupted run: the checkpoint holds the model (values and
structure), optimizer, LR schedule, method state, the data iterator's generator,
the torch / numpy / python (and CUDA) RNG states and the autotuner's algorithm
choices (:mod:`sparsestart.nn.autotune`), and every epoch is a pure function of
them (a layer input first seen after the checkpoint is measured afresh, and may
choose another algorithm than the uninterrupted run did). The same holds on one GPU where the kernels are deterministic.

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
import json
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import runtime
from ..nn import autotune
from . import distributed
from .batches import BatchIterator
from .checkpoint import FORMAT, VERSION, load_checkpoint, rng_state
from .config import TrainConfig, resolve, validate
from .data import load_dataset
from .device import precision_flags
from .metrics import _Pixels, basic_metrics, forward_flops, predict_logits
from .paths import check_output_dir
from .resume import check_same_dataset, resumed_config
from .run import LRFactor, RunState, build_net, build_run, compiled_step  # noqa: F401  (LRFactor, build_net: public here too)
from .rundir import CHECKPOINT, RunDirectory
from .summary import dense_gradient_updates, final_evaluation, layer_densities, layer_stats, run_summary, shifted_set
from .verdict import verdict as verdict_lines

# One idea per module: building a run (model, optimizer, schedule, method, checkpoint loading) lives in run.py,
# the configuration of a resumed run in resume.py, the run directory's files (lock, metrics, TensorBoard, saves)
# in rundir.py, the final evaluation and summary.json in summary.py, the closing verdict in verdict.py,
# re-evaluating a saved run in evaluate.py. This module holds the epoch loop.
__all__ = ["Trainer", "RunState", "build_net", "build_run", "shifted_set", "LRFactor", "train"]


@contextlib.contextmanager
def _on_device(device: torch.device):
    """Make a CUDA run's device the current one (kernels launch there; a no-op on the CPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------- trainer
def is_new_best(best: dict, nnz: int, val_accuracy: float) -> bool:
    """Whether an epoch with ``nnz`` weights and this validation accuracy replaces ``best`` as best.pt.

    The best model is the best validation epoch among those with the fewest weights so far: a method that
    prunes (IMP, STR, gradual, edge-popup) would otherwise keep a denser early epoch as best.pt, a model of
    another size than the run's result. Runs at constant nnz (static, RigL, SET, dense) compare accuracy only.
    ``best`` without "nnz" (no epoch yet, or a checkpoint saved before this rule) compares accuracy only.
    """
    best_nnz = best.get("nnz")
    if best_nnz is None:
        return val_accuracy > best["val_accuracy"]
    return nnz < best_nnz or (nnz == best_nnz and val_accuracy > best["val_accuracy"])


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
        option = "--resume" if resume else "--out"
        self.files = RunDirectory(self.out, f"{option} {self.out}", log=self.log)
        ckpt = None
        if resume:
            self.files.disk_mark = self.files.checkpoint_mark()  # the checkpoint as this trainer read it
            ckpt = load_checkpoint(self.out / CHECKPOINT)
            self.cfg = resumed_config(self.out, ckpt, dict(overrides or {}))
            self.files.saved_epoch = int(ckpt["epoch"])  # for the messages about a full disk
        else:
            self.cfg = self._new_config(cfg, explicit)
        # Before the data and the model: a run directory that cannot be written fails now, not after an epoch.
        check_output_dir(self.out, option)
        # Identifies the run in every file it saves (checkpoint.pt, best.pt, summary.json): ``evaluate --which best``
        # compares it to tell this run's best.pt from one copied in from another run. A random id rather than a
        # hash of the configuration: two runs of one configuration (on a GPU, where runs are not bit-identical, or
        # with another sparsestart version) are different runs with different best models.
        self.run_id = str((ckpt or {}).get("run_id") or uuid.uuid4().hex)
        self._apply_process_settings()
        cfg = self.cfg
        data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                            train_limit=cfg.train_limit, test_limit=cfg.test_limit, augment=cfg.augment)
        if ckpt is not None:
            check_same_dataset(self.out, ckpt, data)
        self.run = build_run(cfg, data, ckpt)
        self._restore_progress(ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        main = distributed.is_main()  # only rank 0 writes into the run directory
        if main:
            self.files.claim(fresh=ckpt is None)
        try:
            if main:
                self.files.open(self.history, resumed=ckpt is not None, tensorboard=cfg.tensorboard)
            # Several ranks: the DDP wrapper, data shards, synchronised structure decisions (distributed.py).
            self.parallel = distributed.DistributedRun(self.run, self._state)
            #: What a training step calls: the model (or its DDP wrapper), torch.compile'd with --compile.
            self.step_model = compiled_step(self.parallel.model, bool(cfg.compile))
        except BaseException:
            self.files.lock.release()
            raise

    def _new_config(self, cfg: Optional[TrainConfig], explicit: frozenset) -> TrainConfig:
        """``cfg`` resolved and validated for a new run in an ``out`` that holds none yet."""
        cfg = resolve(TrainConfig() if cfg is None else cfg)
        validate(cfg, explicit)
        if (self.out / CHECKPOINT).exists():
            raise ValueError(f"--out {self.out} already holds a run ({CHECKPOINT}); continue it with "
                             f"--resume {self.out}, or choose another --out")
        return cfg

    def _apply_process_settings(self) -> None:
        """The settings that act on the whole process (threads, allocator); TensorBoard checked before work."""
        cfg = self.cfg
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if cfg.retain_memory:
            runtime.retain_freed_memory()

    def _restore_progress(self, ckpt: Optional[dict]) -> None:
        """Counters and history of the run so far: the checkpoint's, or those of a run not started."""
        if ckpt is None:
            self.epoch = self.step = self.train_flops = self.samples_seen = 0
            self.history, self.best = [], {"epoch": None, "val_accuracy": -1.0}
            self.elapsed_before = self.train_seconds = 0.0
            return
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history, self.best = list(ckpt["history"]), dict(ckpt["best"])
        self.train_flops, self.samples_seen = int(ckpt["train_flops"]), int(ckpt["samples_seen"])
        self.elapsed_before, self.train_seconds = float(ckpt["elapsed"]), float(ckpt["train_seconds"])

    @property
    def writer(self):
        """TensorBoard's SummaryWriter (rank 0 with ``cfg.tensorboard``), else None."""
        return self.files.writer

    def _writing(self):
        """Rank 0 holds the run directory's lock while the block writes into it (:meth:`RunDirectory.writing`)."""
        return self.files.writing() if self.parallel.is_main else contextlib.nullcontext()

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.session_start)

    def _state(self) -> dict:
        """Everything checkpoint.pt holds: resuming from it continues the run bit for bit (on the CPU)."""
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
            # The measured algorithm choices ("auto"): a resumed run computes with the same algorithms, so
            # with the same rounding, as the run it continues (build_run restores them).
            "autotune": autotune.state_dict(),
        }

    def _best_state(self) -> dict:
        """What best.pt holds: the model (and method state) of this epoch."""
        r = self.run
        return {"format": FORMAT, "version": VERSION, "kind": "best", "run_id": self.run_id,
                "config": self.cfg.to_dict(), "dataset": r.data.describe(), "epoch": self.epoch,
                "model": r.model.state_dict(), "algorithm": r.algorithm.state_dict()}

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
                    logits = self.step_model(x)
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
                    layer_density=layer_densities(r.net))

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
        dense_updates_before = dense_gradient_updates(r.algorithm)
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
            updates = dense_gradient_updates(r.algorithm)
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
                self._record_epoch(row, stats, improved)
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
        nnz, numel = layer_stats(r.net)
        row = {"epoch": self.epoch, "step": self.step, "lr": lr,
               "train_loss": stats["train_loss"], "train_accuracy": stats["train_accuracy"],
               **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
               "nnz": nnz, "density": nnz / numel if numel else 1.0,
               "samples_seen": self.samples_seen, "train_flops": self.train_flops,
               "epoch_seconds": time.perf_counter() - t0, "elapsed_seconds": None}
        self.history.append(row)
        improved = is_new_best(self.best, nnz, val["accuracy"])
        if improved:
            self.best = {"epoch": self.epoch, "val_accuracy": val["accuracy"], "nnz": nnz}
        return row, improved

    def _record_epoch(self, row: dict, stats: dict, improved: bool) -> None:
        """Rank 0 after an epoch: its metrics row and TensorBoard points, best.pt when it improved, then the
        checkpoint (last: a crash before it leaves rows that the resume drops), and a line on the console."""
        self.files.append_metrics(row, self.history)
        self.files.log_tensorboard(row, stats["layer_density"], stats["steps"], stats["seconds"])
        if improved:
            self.files.save_best(self._best_state())
        self.files.save_checkpoint(self._state(), self.epoch)
        self.log(f"epoch {self.epoch}/{self.run.total_epochs}: train loss {row['train_loss']:.4f} acc "
                 f"{row['train_accuracy']:.4f} | val acc {row['val_accuracy']:.4f} | test acc "
                 f"{row['test_accuracy']:.4f} | density {row['density']:.4f} | {row['epoch_seconds']:.1f} s")

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Final evaluation and summary.json (``fit`` calls it when the last epoch is done)."""
        with self._writing(), precision_flags(self.cfg.precision), _on_device(self.run.device):
            return self._finish()

    def _finish(self) -> dict:
        t0 = time.perf_counter()
        last = self.history[-1] if self.history else {}
        final = final_evaluation(self.run, self.cfg, self.epoch, last, self.log)
        best_row = next((h for h in self.history if h["epoch"] == self.best["epoch"]), {})
        summary = run_summary(self.run, self.cfg, run_id=self.run_id, epochs=self.epoch, final=final,
                              best_epoch=self.best["epoch"], best_row=best_row, train_flops=self.train_flops,
                              samples_seen=self.samples_seen, train_seconds=self.train_seconds,
                              final_eval_seconds=time.perf_counter() - t0, wall_time_seconds=self._elapsed())
        path = self.files.write_summary(summary)
        t = final["test"]
        self.log(f"done: test accuracy {t.get('accuracy', float('nan')):.4f} (best val epoch {self.best['epoch']}: "
                 f"test {best_row.get('test_accuracy', float('nan')):.4f}), {self.train_seconds:.1f} s training, "
                 f"{summary['wall_time_seconds']:.1f} s total -> {path}")
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
