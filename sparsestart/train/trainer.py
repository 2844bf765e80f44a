"""The training loop: build data, model, optimizer, schedule and sparse method; train, log, checkpoint, evaluate.

Run directory layout (``--out DIR``)::

    checkpoint.pt   full state after the last completed epoch (atomic, every epoch)
    best.pt         model (+ method state) of the epoch with the best validation accuracy
    metrics.jsonl   one JSON object per epoch
    metrics.csv     the same rows as CSV
    summary.json    written when the run finishes (config, metrics, layers, FLOPs, memory, time)
    tensorboard/    with --tensorboard

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
import random
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import nn as snn
from .. import runtime
from . import distributed
from .checkpoint import (FORMAT, VERSION, CheckpointError, atomic_save, atomic_write_text, load_checkpoint,
                         move_optimizer_state_, remove_stale_temp_files, rng_state, set_rng_state)
from .config import RESUME_CHANGEABLE, TrainConfig, config_from_dict, resolve, resolve_device, validate
from .device import autocast, describe, precision_flags, torch_device
from .data import (Dataset, NormalizedModel, adapt_images, fashion_mnist_available, load_dataset, load_digits_images,
                   load_image_dir, BatchIterator)
from .methods import make_algorithm
from .metrics import _Pixels, basic_metrics, evaluate_model, forward_flops, predict_logits

__all__ = ["Trainer", "RunState", "build_net", "build_run", "shifted_set", "LRFactor", "train", "load_for_eval",
           "evaluate_run", "verdict"]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
_TIME_KEYS = ("epoch_seconds", "elapsed_seconds")


# ---------------------------------------------------------------------------------------------- building blocks
def build_net(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The zoo model for the dataset's image shape and classes (``model_options`` passed through)."""
    from ..models import get

    name = cfg.model.strip().lower().replace("-", "")
    c, h, w = data.shape
    opts = dict(cfg.model_options)
    try:
        if name == "mlp":
            hidden = list(opts.pop("hidden", [300, 100]))
            sizes = opts.pop("sizes", None) or [c * h * w, *hidden, data.num_classes]
            return get("mlp", sizes=sizes, **opts)
        if h != w:
            raise ValueError(f"images are {h}x{w}; the convolutional models take square images")
        return get(name, in_channels=c, num_classes=data.num_classes, input_size=h, **opts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--model {cfg.model} on {data.name} {c}x{h}x{w}: {exc}") from None


def _is_dense(cfg: TrainConfig) -> bool:
    return float(cfg.density) == 1.0


def _sparsify(net: nn.Module, cfg: TrainConfig, data: Dataset) -> None:
    """Make the masked layers sparse (deterministic given the configuration)."""
    if _is_dense(cfg):
        return
    snn.check_exclude(net, cfg.exclude, model_name=cfg.model)
    common = dict(format=cfg.format, block_size=cfg.block_size, seed=int(cfg.seed), exclude=list(cfg.exclude))
    opts = dict(cfg.distribution_options)
    if cfg.distribution in ("snip", "grasp") and opts.get("data") is None:
        g = torch.Generator().manual_seed(int(cfg.seed) + 17)
        n = min(len(data.train), max(int(cfg.batch_size), 10 * data.num_classes))
        idx = torch.randperm(len(data.train), generator=g)[:n]
        mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        std = torch.tensor(data.std).view(1, -1, 1, 1)
        on = data.train.images.device  # the net is sparsified on the CPU, wherever the data is held
        opts["data"] = ((data.train.pixels(idx.to(on)).cpu() - mean) / std, data.train.labels[idx.to(on)].cpu())
    if cfg.distribution == "synflow" and opts.get("input_shape") is None:
        opts["input_shape"] = tuple(data.shape)
    try:
        snn.sparsify(net, float(cfg.density), cfg.distribution, flow=cfg.flow, **common, **opts)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ValueError(f"cannot sparsify {cfg.model} with density={cfg.density}, distribution={cfg.distribution}, "
                         f"format={cfg.format}: {exc}") from None


class LRFactor:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    The schedule restarts every ``steps_per_level`` steps (IMP levels; one level
    otherwise): linear warm-up, then cosine to 0, step decay x0.1 at 50% and 75%,
    or constant.
    """

    def __init__(self, kind: str, steps_per_level: int, warmup_steps: int = 0, min_factor: float = 0.0):
        self.kind, self.steps_per_level, self.warmup_steps = kind, max(1, int(steps_per_level)), int(warmup_steps)
        # The cosine's floor as a fraction of the base rate (lr_min / lr).
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        s = step % self.steps_per_level
        if s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        t = (s - self.warmup_steps) / max(1, self.steps_per_level - self.warmup_steps)
        if self.kind == "cosine":
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=bool(cfg.nesterov))
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _phases(cfg: TrainConfig, algorithm) -> int:
    """Training phases of ``cfg.epochs`` epochs each: IMP trains levels + 1 of them (prune-and-rewind between)."""
    if cfg.method != "imp":
        return 1
    return int(getattr(algorithm, "levels", 0)) + 1


class RunState:
    """Everything a run consists of: data, model, optimizer, schedule, method, data generator."""

    def __init__(self, cfg: TrainConfig, data: Dataset, model: NormalizedModel, optimizer, scheduler, algorithm,
                 generator: torch.Generator, steps_per_epoch: int, device: Optional[torch.device] = None):
        self.cfg, self.data, self.model, self.optimizer = cfg, data, model, optimizer
        self.scheduler, self.algorithm, self.generator = scheduler, algorithm, generator
        self.steps_per_epoch = steps_per_epoch
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def autocast(self):
        """The autocast context of the forward pass and loss (bf16), or a context that does nothing."""
        return autocast(self.cfg.precision, self.device)

    @property
    def phases(self) -> int:
        return _phases(self.cfg, self.algorithm)

    @property
    def total_epochs(self) -> int:
        return int(self.cfg.epochs) * self.phases

    @property
    def net(self) -> nn.Module:
        return self.model.net


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, data: Dataset, checkpoint: Optional[dict] = None, device=None) -> RunState:
    """Build a run from scratch, or rebuild it and load ``checkpoint`` (model, optimizer, schedule, method, RNGs).

    Raises CheckpointError when the checkpoint does not fit the configuration.
    The run is rebuilt exactly as it started (same seed, same initial structure,
    so the method's constructor sees what it saw then), and the saved state is
    loaded on top. ``device`` (default: ``cfg.device``): the net is built and
    sparsified on the CPU, then it and the data move there before the optimizer
    and the method are created; the checkpoint's tensors (saved on the CPU) are
    loaded onto it.
    """
    device = torch_device(cfg.device) if device is None else torch.device(device)
    _seed_everything(int(cfg.seed))
    net = build_net(cfg, data)
    _sparsify(net, cfg, data)
    model = NormalizedModel(net, data.mean, data.std).to(device)
    data = data.to(device)
    optimizer = _make_optimizer(cfg, model)
    steps_per_epoch = -(-len(data.train) // int(cfg.batch_size))
    # For IMP, --epochs is per level and the schedule restarts every level; otherwise one phase.
    steps_per_phase = steps_per_epoch * int(cfg.epochs)
    warmup = round(float(cfg.warmup_epochs) * steps_per_epoch)
    lr_factor = LRFactor(cfg.schedule, steps_per_phase, warmup, float(cfg.lr_min) / float(cfg.lr))
    try:
        # lr_factor: STR derives its default s_init from the rate weight decay will really act at.
        algorithm = make_algorithm(cfg.method, net, optimizer, steps_per_phase, cfg.method_options,
                                   seed=int(cfg.seed), lr_factor=lr_factor)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--method {cfg.method}: {exc}") from None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # A CPU generator on every device: the same batches and augmentations wherever the run trains or resumes.
    generator = torch.Generator().manual_seed(int(cfg.seed) + 1)
    run = RunState(cfg, data, model, optimizer, scheduler, algorithm, generator, steps_per_epoch, device)
    if checkpoint is not None:
        _load_model(model, checkpoint["model"], optimizer)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            move_optimizer_state_(optimizer)  # onto each parameter's device (the checkpoint holds CPU tensors)
            scheduler.load_state_dict(checkpoint["scheduler"])
            algorithm.load_state_dict(checkpoint["algorithm"])
            generator.set_state(checkpoint["data_rng"])
            set_rng_state(checkpoint["rng"], device)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint does not match the run: {type(exc).__name__}: {exc}") from None
    return run


def _load_model(model: nn.Module, state: dict, optimizer=None) -> None:
    """load_state_dict (strict); sparse layers adopt the saved structure and capacity.

    A layer whose saved capacity differs resizes its ``values`` Parameter in place
    (SparseLayer._load_from_state_dict), so the optimizer keeps stepping it; should a
    load ever replace a Parameter object, the optimizer's groups are pointed at the new one.
    """
    before = dict(model.named_parameters())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise CheckpointError(f"the saved model does not match the model built from the run's configuration "
                              f"(--model/--dataset/--density/--format): {msg[:600]}") from None
    after = dict(model.named_parameters())
    swap = {id(p): after[n] for n, p in before.items() if n in after and after[n] is not p}
    if swap and optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]


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
        if resume:
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
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def _state(self) -> dict:
        r = self.run
        return {
            "format": FORMAT, "version": VERSION, "kind": "checkpoint",
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
        atomic_save({"format": FORMAT, "version": VERSION, "kind": "best", "config": self.cfg.to_dict(),
                     "dataset": r.data.describe(), "epoch": self.epoch, "model": r.model.state_dict(),
                     "algorithm": r.algorithm.state_dict()},
                    self.out / BEST)

    # ------------------------------------------------------------------ training
    def _train_epoch(self) -> dict:
        from tqdm import tqdm

        r, cfg, par = self.run, self.cfg, self.parallel
        r.model.train()
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
        return dict(train_loss=loss_sum / max(seen, 1), train_accuracy=correct / max(seen, 1), samples=seen)

    def fit(self, stop_after: Optional[int] = None) -> Optional[dict]:
        """Train the remaining epochs (at most ``stop_after`` of them); the summary dict when the run is done
        (distributed: on rank 0, None on the other ranks). The TF32 switches of ``cfg.precision`` are set
        meanwhile and restored afterwards."""
        with precision_flags(self.cfg.precision), _on_device(self.run.device):
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
                if improved:
                    self._save_best()
                atomic_save(self._state(), self.out / CHECKPOINT)
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
        with precision_flags(self.cfg.precision), _on_device(self.run.device):
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
        for line in verdict(summary):
            self.log(line)
        return summary


def verdict(summary: dict) -> list[str]:
    """A few readable lines that end a run: test accuracy sparse vs dense, stored bytes, speed.

    The dense accuracy and training time come from the stored reference of the same job
    (:func:`~sparsestart.train.config.dense_reference`, a measured ``--density 1.0`` run) when the run is
    the short demonstration; otherwise the lines say how to get them. Sizes and multiply-adds are the run's own."""
    from .config import dense_reference

    cfg = config_from_dict(summary["config"])
    acc = summary["final"]["test"].get("accuracy", float("nan"))
    mem, fl = summary["memory"], summary["flops"]
    sparse_b, dense_b = mem["model_bytes"], mem["model_dense_bytes"]
    fwd, dense_fwd = fl["forward_per_sample"], fl["dense_forward_per_sample"]
    if float(cfg.density) == 1.0:
        return [f"verdict: dense baseline, test accuracy {acc:.4f}, {dense_b:,} bytes of parameters and buffers, "
                f"{summary['train_seconds']:.1f} s training; compare a sparse run with --density 0.1"]
    ref = dense_reference(cfg)
    on_cpu = str(summary.get("device", "cpu")).startswith("cpu")
    lines = [f"verdict: {cfg.model} at density {summary['density']:.3f} ({cfg.distribution}, {cfg.method}) on "
             f"{summary['dataset'].get('name', cfg.dataset)}, against the same model dense:"]
    if ref is not None:
        diff = 100 * (acc - ref["test_accuracy"])
        lines.append(f"  accuracy  {acc:.4f} sparse vs {ref['test_accuracy']:.4f} dense ({diff:+.1f} points; dense "
                     f"from a stored reference run, `{ref['command']}`, {ref['measured']})")
        if ref.get("note"):
            lines.append(f"            ({ref['note']})")
    else:
        lines.append(f"  accuracy  {acc:.4f} sparse; no stored dense reference for these settings: run the same "
                     f"command with --density 1.0 to compare")
    lines.append(f"  size      {sparse_b:,} bytes stored sparse vs {dense_b:,} dense "
                 f"({dense_b / sparse_b if sparse_b else float('nan'):.2f}x smaller; a nonzero costs 4 value + "
                 f"16 index bytes, so storage wins below density 0.2)")
    speed = f"  speed     {dense_fwd / fwd if fwd else float('nan'):.1f}x fewer multiply-adds per sample " \
            f"({fwd:,} vs {dense_fwd:,})"
    if ref is not None and on_cpu and ref.get("train_seconds"):
        t = summary["train_seconds"]
        speed += (f"; training {t:.1f} s sparse vs {ref['train_seconds']:.1f} s dense ({ref['train_seconds'] / t:.2f}x, "
                  f"dense timed on the reference machine, this run on {summary.get('threads', '?')} thread(s))")
    else:
        speed += f"; training {summary['train_seconds']:.1f} s"
    lines.append(speed)
    return lines


#: The saved settings that ``sparsestart evaluate`` may override.
_EVALUATE_OVERRIDES = ("data_dir", "ood_dir", "test_limit", "fgsm_eps", "eval_batch_size", "threads")


def load_for_eval(run_dir, which: str = "final", **overrides):
    """(config, dataset, model, checkpoint) of a finished or interrupted run, ready to evaluate.

    ``which``: "final" (checkpoint.pt, the last completed epoch) or "best"
    (best.pt, the epoch of the best validation accuracy). ``overrides`` may set
    data_dir, ood_dir, test_limit, fgsm_eps, eval_batch_size, threads, device
    (default auto: CUDA when available, wherever the run trained) and precision
    (default: the run's). The model and the data are on that device.
    """
    from .device import check_precision

    run_dir = Path(run_dir)
    if which not in ("final", "best"):
        raise ValueError(f"which must be 'final' or 'best', got {which!r}")
    device = resolve_device(overrides.pop("device", None) or "auto")
    ckpt = load_checkpoint(run_dir / (CHECKPOINT if which == "final" else BEST))
    cfg = config_from_dict(ckpt["config"], where=str(run_dir))
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.device = device
    cfg.precision = check_precision(cfg.precision)
    # --fgsm-eps -1 would report an anti-adversarial step as robustness; --test-limit 0 and --eval-batch-size 0
    # would fail deep inside the evaluation: checked as for a new run, before any data is read.
    saved_in = run_dir / (CHECKPOINT if which == "final" else BEST)
    _validate_given(cfg, overrides, f"the configuration saved in {saved_in}", _EVALUATE_OVERRIDES)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                        train_limit=cfg.train_limit, test_limit=cfg.test_limit, augment=cfg.augment)
    saved = ckpt.get("dataset", {})
    if saved and (list(saved.get("shape", [])) != list(data.shape) or saved.get("num_classes") != data.num_classes):
        raise CheckpointError(f"{run_dir}: the model was trained on {saved.get('name')} {saved.get('shape')} with "
                              f"{saved.get('num_classes')} classes; the data found now is {data.name} "
                              f"{list(data.shape)} with {data.num_classes}")
    _seed_everything(int(cfg.seed))
    net = build_net(cfg, data)
    _sparsify(net, cfg, data)
    dev = torch_device(cfg.device)
    model = NormalizedModel(net, data.mean, data.std).to(dev)
    data = data.to(dev)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    steps = -(-len(data.train) // int(cfg.batch_size)) * int(cfg.epochs)
    algorithm = make_algorithm(cfg.method, net, optimizer, steps, cfg.method_options, seed=int(cfg.seed))
    _load_model(model, ckpt["model"], optimizer)
    try:
        algorithm.load_state_dict(ckpt["algorithm"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{run_dir}: the saved method state does not fit: {exc}") from None
    model.eval()
    return cfg, data, model, ckpt


def evaluate_run(run_dir, which: str = "final", *, log: Callable[[str], None] = print, **overrides) -> dict:
    """Re-evaluate a saved run (accuracy, NLL, ECE, OoD AUROC, FGSM) on its test split.

    ``overrides``: see :func:`load_for_eval` (``device``, ``precision`` among them)."""
    cfg, data, model, ckpt = load_for_eval(run_dir, which, **overrides)
    t0 = time.perf_counter()
    try:
        shifted = shifted_set(cfg, data)
    except (FileNotFoundError, ValueError) as exc:
        shifted = (None, f"shifted set unavailable: {exc}")
    dev = next(iter(model.buffers())).device  # the Normalize buffers: there even for a model without parameters
    amp = (lambda: autocast(cfg.precision, dev))
    with precision_flags(cfg.precision), _on_device(dev):
        res = evaluate_model(model, data.test, mean=data.mean, std=data.std, shifted=shifted, fgsm_eps=cfg.fgsm_eps,
                             batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=lambda m: log(f"  evaluating {m}"),
                             autocast=amp)
        val = basic_metrics(predict_logits(model, _Pixels(data.val), cfg.eval_batch_size, autocast=amp),
                            data.val.labels)
    return _jsonable({"run": str(run_dir), "which": which, "epoch": ckpt["epoch"], "dataset": data.describe(),
                      "val": val, "test": res, **describe(dev, cfg.precision), "seconds": time.perf_counter() - t0})


def train(out_dir, cfg: Optional[TrainConfig] = None, *, stop_after: Optional[int] = None, **overrides) -> Optional[dict]:
    """Python entry point: ``train("runs/x", dataset="digits", epochs=1)``; returns the summary dict."""
    if cfg is None:
        cfg = TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown option {k!r}")
        setattr(cfg, k, v)
    return Trainer(cfg, out_dir, explicit=frozenset(overrides)).fit(stop_after=stop_after)
