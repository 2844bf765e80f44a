"""The configuration of a training run: defaults, config files (YAML/TOML), validation.

Precedence: built-in defaults < config file (``--config``) < command-line options.
Keys in files use the long option names with ``_`` or ``-`` (``batch_size`` or
``batch-size``). ``dataset``, ``distribution`` and ``method`` may stay unset
("auto"): they resolve to Fashion-MNIST if installed (or if ``data_dir`` is
given: it must then hold Fashion-MNIST) else digits, ERK if available else
uniform, RigL if available else static. ``device`` "auto"
resolves to "cuda" when CUDA is available, else "cpu" (see
:mod:`sparsestart.train.device`); the resolved name is what a checkpoint keeps.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

__all__ = ["TrainConfig", "QUICK", "QUICK_FALLBACK", "DENSE_REFERENCES", "dense_reference", "RUNTIME_KEYS", "RESUME_CHANGEABLE", "load_config_file", "config_from_dict", "resolve", "validate",
           "parse_key_values", "resolve_device", "OPTIMIZERS", "SCHEDULES", "FORMATS", "PRECISIONS", "DEVICE_CHOICES", "distributions",
           "max_threads", "check_threads", "THREADS_PER_CORE"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
FORMATS = ("csr", "bsr")

#: Keys that may change between an interrupted run and its resumption without changing its results.
RUNTIME_KEYS = ("threads", "tensorboard", "progress", "final_eval", "retain_memory")
#: Keys --resume accepts with a new value: the runtime keys, where the (same) data lives, and the device (a run
#: trained on a GPU continues on the CPU and back; only the rounding of the kernels differs), and compile (the same:
#: a compiled step fuses the dense ops around the sparse layers, which rounds differently).
RESUME_CHANGEABLE = RUNTIME_KEYS + ("data_dir", "ood_dir", "device", "compile")
#: --device and --precision values (sparsestart.train.device).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class TrainConfig:
    # what to train
    model: str = "convnet_small"
    model_options: dict = field(default_factory=dict)
    dataset: Optional[str] = None  # None: fashion-mnist if installed, else digits
    data_dir: Optional[str] = None
    val_fraction: float = 0.1
    split_seed: int = 0
    train_limit: Optional[int] = None  # keep only the first N (shuffled) training images
    test_limit: Optional[int] = None  # evaluate on the first N test images
    augment: Optional[bool] = None  # None: CIFAR only
    # sparsity
    density: float = 0.1  # 1.0: the plain dense model (no sparse layers)
    distribution: Optional[str] = None  # None: erk if available, else uniform
    distribution_options: dict = field(default_factory=dict)
    format: str = "csr"
    block_size: Optional[int] = None
    exclude: list = field(default_factory=list)
    flow: Optional[str] = None
    method: Optional[str] = None  # None: rigl if available, else static
    method_options: dict = field(default_factory=dict)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_min: float = 0.0  # the cosine schedule's floor (the paper's IMP anneals to 0.01, not 0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    epochs: int = 2
    batch_size: int = 128
    eval_batch_size: int = 128
    seed: int = 0
    # hardware
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N; resolved by resolve()
    precision: str = "fp32"  # fp32 (IEEE), tf32 (TF32 matmuls/convolutions), bf16 (autocast, fp32 master weights)
    compile: bool = False  # torch.compile the training forward and backward (sparsestart.train.run.compiled_step)
    # evaluation
    fgsm_eps: float = 8 / 255
    ood_dir: Optional[str] = None
    final_eval: bool = True  # OoD + FGSM evaluation at the end
    # runtime (may differ on --resume)
    threads: Optional[int] = None
    tensorboard: bool = False
    progress: bool = True
    retain_memory: bool = True  # keep freed memory in the process (sparsestart.runtime); never changes results

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def experiment_dict(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}


#: What ``sparsestart train`` runs without arguments: a few minutes on a laptop CPU.
QUICK = dict(epochs=1, train_limit=16000, test_limit=2000, density=0.1, model="convnet_small")

#: What the short demonstration changes when it runs on scikit-learn's digits (the fallback when Fashion-MNIST
#: is not installed, or ``--quick --dataset digits``): digits has 1,294 training images, ten steps an epoch, and one
#: epoch leaves the BatchNorm statistics unsettled (test accuracy 0.08, below chance); ten epochs reach ~0.98 in
#: about 10 s of training on 2 cores.
QUICK_FALLBACK = dict(epochs=10)

#: Dense baselines of the short demonstration, measured with the same command and ``--density 1.0`` (so method
#: static): what the verdict at the end of a run compares against when the run is that job at another density.
#: ``train_seconds`` is machine-dependent (the verdict says where it was measured).
DENSE_REFERENCES = {
    "fashion-mnist": dict(
        job=dict(QUICK, dataset="fashion-mnist"),
        test_accuracy=0.7965, train_seconds=17.9,
        command="sparsestart train --quick --density 1.0",
        measured="2026-12-04, AMD EPYC, 2 threads, CPU fp32, bench/results/main-job/fmnist-dense.json",
        note="one short epoch favours the sparse model at lr 0.1; two full epochs give 91.3% sparse vs 91.3% dense, "
             "docs/training.md"),
    "digits": dict(
        job=dict(QUICK, **QUICK_FALLBACK, dataset="digits"),
        test_accuracy=0.9777, train_seconds=14.5,
        command="SPARSESTART_SYSTEM_DATA=0 sparsestart train --quick --density 1.0",
        measured="2026-12-04, AMD EPYC, 2 threads, CPU fp32, bench/results/main-job/digits-dense.json"),
}

#: Keys that may differ between a run and a dense reference: the sparsity itself, and what never changes results.
_REFERENCE_FREE = ("density", "distribution", "distribution_options", "format", "block_size", "exclude", "flow",
                   "method", "method_options", "data_dir", "ood_dir", "device", "precision", "compile") + RUNTIME_KEYS


def dense_reference(cfg: "TrainConfig") -> Optional[dict]:
    """The stored dense baseline (:data:`DENSE_REFERENCES`) of the job ``cfg`` runs, or None when there is none.

    A reference applies when every setting outside the sparsity (:data:`_REFERENCE_FREE`) equals the
    reference job's, i.e. the run is the short demonstration (any density, distribution or method)."""
    ref = DENSE_REFERENCES.get(cfg.dataset)
    if ref is None:
        return None
    job = config_from_dict(ref["job"])
    mine, theirs = cfg.to_dict(), job.to_dict()
    if any(mine[k] != theirs[k] for k in mine if k not in _REFERENCE_FREE):
        return None
    return ref

_FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def config_from_dict(d: dict, *, where: str = "config") -> TrainConfig:
    """A TrainConfig from a dict of overrides (keys with _ or -); unknown keys list the valid ones."""
    cfg = TrainConfig()
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys are: {', '.join(_FIELD_NAMES)}")
        setattr(cfg, name, value)
    return cfg


def load_config_file(path) -> dict:
    """The mapping in a .yaml/.yml or .toml file (keys normalised to underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            raise ValueError(f"--config {path}: unknown file type {suffix!r}; use .yaml, .yml or .toml")
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        name = str(k).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ValueError(f"--config {path}: unknown key {k!r}; valid keys are: {', '.join(_FIELD_NAMES)}")
        out[name] = v
    return out


def parse_key_values(items, what: str) -> dict:
    """["k=v", ...] -> {k: yaml-parsed v} for --model-option and friends."""
    import yaml

    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ValueError(f"{what}: empty key in {item!r}")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- resolution
def distributions() -> tuple[str, ...]:
    try:
        from ..init import DISTRIBUTIONS
        return tuple(DISTRIBUTIONS)
    except ImportError:
        return ("uniform",)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the "auto" fields (dataset, distribution, method) with concrete names."""
    from .data import canonical_dataset_name, fashion_mnist_available
    from .methods import available_methods

    cfg = dataclasses.replace(cfg)
    if cfg.dataset is None:
        # A named --data-dir is for Fashion-MNIST (digits needs no files): used, or refused when it lacks them.
        cfg.dataset = "fashion-mnist" if cfg.data_dir or fashion_mnist_available(None) else "digits"
    else:
        cfg.dataset = canonical_dataset_name(cfg.dataset)
    if cfg.distribution is None:
        cfg.distribution = "erk" if "erk" in distributions() else "uniform"
    if cfg.method is None:
        cfg.method = "rigl" if "rigl" in available_methods() else "static"
        if _is_dense(cfg):
            cfg.method = "static"
    cfg.device = resolve_device(cfg.device)
    if isinstance(cfg.precision, str):
        cfg.precision = cfg.precision.strip().lower()
    return cfg


def resolve_device(device) -> str:
    """--device resolved for this process: "cpu", "cuda" or "cuda:N" (under torchrun: the rank's choice)."""
    from .distributed import run_device

    return run_device(device, "--device")


#: --threads may be at most this many times the machine's cores (os.cpu_count()).
THREADS_PER_CORE = 4


def max_threads() -> int:
    """The largest --threads accepted: :data:`THREADS_PER_CORE` x os.cpu_count().

    torch starts that many OpenMP threads at once; far more than the cores only
    slows a run down, and an absurd count (100000) crashes the process inside
    torch (SIGSEGV) instead of failing."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(value, option: str = "--threads"):
    """``value`` (None or an int in [1, :func:`max_threads`]); ValueError naming ``option``, the value and the range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{option}: expected an integer, got {value!r}")
    top = max_threads()
    if not 1 <= value <= top:
        raise ValueError(f"{option}: {value!r} is outside the accepted range [1, {top}] (at most {THREADS_PER_CORE} "
                         f"threads per core; this machine has {os.cpu_count() or 1})")
    return int(value)


def _is_dense(cfg) -> bool:
    return isinstance(cfg.density, numbers.Real) and not isinstance(cfg.density, bool) and float(cfg.density) == 1.0


def _number(cfg, name, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, optional=False):
    v = getattr(cfg, name)
    if v is None and optional:
        return
    ok_type = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(float(v))):
        raise ValueError(f"--{name.replace('_', '-')}: expected {'an integer' if integer else 'a number'}, "
                         f"got {v!r}")
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open else ']'}"
        raise ValueError(f"--{name.replace('_', '-')}: {v!r} is outside the accepted range {rng}")


def validate(cfg: TrainConfig, explicit: frozenset = frozenset()) -> None:
    """Every check that can fail before any data is read or any model is built.

    ``explicit``: keys the user set (file or command line); options that the
    chosen combination ignores are an error only when set explicitly.
    """
    from ..models import names as model_names
    from .data import canonical_dataset_name
    from .methods import METHODS, check_method

    if not isinstance(cfg.model, str) or cfg.model.strip().lower().replace("-", "") not in model_names():
        raise ValueError(f"unknown model {cfg.model!r}; valid names are: {', '.join(model_names())}")
    canonical_dataset_name(cfg.dataset)
    for key in ("model_options", "distribution_options", "method_options"):
        if not isinstance(getattr(cfg, key), dict):
            raise ValueError(f"{key} must be a mapping, got {getattr(cfg, key)!r}")
    _number(cfg, "density", lo=0.0, hi=1.0, lo_open=True)
    _number(cfg, "val_fraction", lo=0.0, hi=0.5, lo_open=True)
    _number(cfg, "split_seed", integer=True)
    _number(cfg, "seed", integer=True)
    _number(cfg, "train_limit", lo=1, integer=True, optional=True)
    _number(cfg, "test_limit", lo=1, integer=True, optional=True)
    _number(cfg, "lr", lo=0.0, lo_open=True)
    _number(cfg, "lr_min", lo=0.0)
    if float(cfg.lr_min) > float(cfg.lr):
        raise ValueError(f"--lr-min {cfg.lr_min} must not exceed --lr {cfg.lr}")
    _number(cfg, "momentum", lo=0.0, hi=1.0, hi_open=True)
    _number(cfg, "weight_decay", lo=0.0)
    _number(cfg, "warmup_epochs", lo=0.0)
    _number(cfg, "epochs", lo=1, integer=True)
    _number(cfg, "batch_size", lo=1, integer=True)
    _number(cfg, "eval_batch_size", lo=1, integer=True)
    _number(cfg, "fgsm_eps", lo=0.0, hi=1.0)
    check_threads(cfg.threads)
    if cfg.warmup_epochs >= cfg.epochs:
        raise ValueError(f"--warmup-epochs {cfg.warmup_epochs} must be smaller than --epochs {cfg.epochs}")
    from .device import check_precision

    resolve_device(cfg.device)
    check_precision(cfg.precision)
    if not isinstance(cfg.compile, bool):
        raise ValueError(f"--compile: {cfg.compile!r} is not a boolean; allowed: true, false")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid names are: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid names are: {', '.join(SCHEDULES)}")
    if cfg.optimizer == "adamw" and ({"momentum", "nesterov"} & explicit):
        raise ValueError("--momentum/--nesterov apply to --optimizer sgd only (AdamW has betas)")
    if cfg.nesterov and cfg.momentum == 0:
        raise ValueError("--nesterov needs --momentum > 0")
    if not isinstance(cfg.exclude, (list, tuple)) or not all(isinstance(e, str) for e in cfg.exclude):
        raise ValueError(f"exclude must be a list of layer names or glob patterns, got {cfg.exclude!r}")
    method = cfg.method.lower() if isinstance(cfg.method, str) else cfg.method
    if method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; valid methods are: {', '.join(METHODS)}")
    if _is_dense(cfg):
        if method != "static":
            raise ValueError(f"--density 1.0 trains the plain dense baseline (no sparse layers), so --method must be "
                             f"static, got {method!r}; use a density below 1 for {method}")
        sparse_only = {"distribution_options", "block_size", "exclude", "flow", "method_options"} & explicit
        if cfg.format != "csr" and "format" in explicit:
            sparse_only.add("format")
        if sparse_only:
            raise ValueError(f"--density 1.0 trains the plain dense baseline; "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(sparse_only))} "
                             f"only apply to sparse runs")
    else:
        dists = distributions()
        if cfg.distribution not in dists:
            raise ValueError(f"unknown distribution {cfg.distribution!r}; valid names are: {', '.join(dists)}")
        if cfg.format not in FORMATS:
            raise ValueError(f"unknown format {cfg.format!r}; valid formats are: {', '.join(FORMATS)}")
        if cfg.format == "bsr":
            if cfg.block_size is None:
                raise ValueError("--format bsr needs --block-size (e.g. 16, 32 or 64)")
            _number(cfg, "block_size", lo=2, integer=True)
        elif cfg.block_size not in (None, 1):
            raise ValueError(f"--block-size applies to --format bsr only, got --block-size {cfg.block_size} with csr")
        if cfg.flow is not None and cfg.flow not in ("random_addition", "rejection"):
            raise ValueError(f"unknown flow repair {cfg.flow!r}; valid names are: random_addition, rejection")
        check_method(method)
