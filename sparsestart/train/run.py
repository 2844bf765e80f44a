"""What a training run is made of, built from its configuration: the model (sparsified on the
CPU, then moved), the optimizer, the learning-rate schedule, the sparse method and the batch
generator (:class:`RunState`, :func:`build_run`), and loading a checkpoint into them."""

from __future__ import annotations

import math
import os
import random
from typing import Optional

import torch
from torch import nn

from .. import nn as snn
from ..nn import autotune
from .checkpoint import CheckpointError, move_optimizer_state_, set_rng_state
from .config import TrainConfig
from .data import Dataset, NormalizedModel
from .device import autocast, torch_device
from .methods import make_algorithm

__all__ = ["RunState", "build_net", "build_model", "build_run", "LRFactor", "compiled_step", "COMPILE_BACKEND"]

#: torch.compile's backend for ``--compile``. Inductor generates fused C++ (CPU) or Triton (GPU) code for the
#: dense ops between the sparse layers (batch norm, activations, pooling, the loss); the sparse ops stay opaque
#: custom ops that run their own kernels. The environment variable SPARSESTART_COMPILE_BACKEND names another
#: (e.g. "aot_eager": the same tracing without code generation, to tell a code-generation problem from a
#: tracing one; the tests use it).
COMPILE_BACKEND = "inductor"


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


def build_model(cfg: TrainConfig, data: Dataset) -> nn.Module:
    """The run's net as it starts: the zoo model (:func:`build_net`), sparsified (deterministic given the
    configuration and the global seed).

    A sparse run never allocates a Linear/Conv2d weight of more than
    :data:`~sparsestart.nn.LARGE_LAYER_NUMEL` elements densely (a density-0.001 MLP with a 1.5M-unit
    hidden layer would need 4.7 GB for it): the model is built inside
    :func:`~sparsestart.nn.defer_large_weights` and sparsify builds those layers sparse directly, their
    kept values drawn from the same distribution as the dense init. Smaller layers are built, and draw
    from the RNG, exactly as without it, so a model without such a layer comes out bit for bit as before.
    snip, grasp and synflow score the dense weights, so they get every layer dense first.
    """
    if _is_dense(cfg) or cfg.distribution in ("snip", "grasp", "synflow"):
        net = build_net(cfg, data)
    else:
        with snn.defer_large_weights():
            net = build_net(cfg, data)
    _sparsify(net, cfg, data)
    _materialize(net)
    return net


def _materialize(net: nn.Module) -> None:
    """Allocate and initialise what was deferred but stayed dense (a large layer named by --exclude)."""
    for name, m in net.named_modules():
        local = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_meta for t in local):
            if not hasattr(m, "reset_parameters"):
                raise ValueError(f"layer {name!r} ({type(m).__name__}) was left on the meta device and has no "
                                 f"reset_parameters to initialise it")
            m.to_empty(device="cpu", recurse=False)
            m.reset_parameters()


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


def compiled_step(model: nn.Module, enabled: bool) -> nn.Module:
    """What the training step calls: ``model`` itself, or (``--compile``) a torch.compile'd wrapper of it.

    Only the training step is compiled; evaluation runs the model as it is. The wrapper shares the model's
    parameters and buffers, so checkpoints, the sparse methods' in-place structure updates and
    ``state_dict`` see one model. Graph breaks are allowed (not ``fullgraph``): a method's Python hooks
    (RigL's gradient capture, edge-popup's score substitution) run eagerly between compiled pieces, and
    dynamo's guards recompile where a structure update changes a traced choice (the layer's algorithm
    follows its density). Under DDP the wrapper compiles the DDP module (torch's supported order).
    """
    if not enabled:
        return model
    backend = os.environ.get("SPARSESTART_COMPILE_BACKEND") or COMPILE_BACKEND
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"SPARSESTART_COMPILE_BACKEND={backend!r}: not a torch.compile backend; allowed: "
                         f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    return torch.compile(model, backend=backend)


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
    """Build a run from scratch, or rebuild it and load ``checkpoint`` (model, optimizer, schedule, method, RNGs,
    the autotuner's choices).

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
    net = build_model(cfg, data)
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
            if "autotune" in checkpoint:  # absent from checkpoints saved before the autotuner
                autotune.load_state_dict(checkpoint["autotune"], where="the checkpoint's autotune entries")
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"the checkpoint does not match the run: {type(exc).__name__}: {exc}") from None
    return run


def _check_saved_capacity(model: nn.Module, state: dict) -> None:
    """Refuse a saved model whose sparse layers hold another number of value slots in all than the model its
    configuration builds: the configuration was edited (--density) or belongs to another model.

    A layer adopts a saved structure of another capacity (SparseLayer._load_from_state_dict), so without this
    such a checkpoint resumed silently at the stored density while its configuration, the summary and the
    report said another. The capacity is the test because no method changes it while training (pruning and
    regrowth move entries within it), while the live density does change (IMP, gradual pruning). The tolerance
    covers per-layer rounding by another version of the density allocation: one slot per layer or 1 %."""
    built = saved = per_layer = dense = 0  # in weights (a BSR slot holds a block of them)
    for name, m in model.named_modules():
        if not isinstance(m, snn.SparseLayer):
            continue
        v = state.get(f"{name}.values" if name else "values")
        if not torch.is_tensor(v) or v.dim() == 0:
            return  # a missing or malformed entry: load_state_dict names it
        built, saved = built + m.values.numel(), saved + v.numel()
        per_layer, dense = per_layer + m.values[0].numel(), dense + math.prod(m.weight_shape)
    if abs(saved - built) <= max(per_layer, 0.01 * built):
        return
    raise CheckpointError(
        f"the saved model does not match its configuration: its sparse layers have room for {saved:,} weights "
        f"(density {saved / dense:.4g} of {dense:,}) where the configuration saved with it "
        f"(--model/--density/--distribution) builds {built:,} (density {built / dense:.4g}); the configuration was "
        f"changed or belongs to another run; the file was left untouched")


def _load_model(model: nn.Module, state: dict, optimizer=None) -> None:
    """load_state_dict (strict); sparse layers adopt the saved structure and capacity.

    A layer whose saved capacity differs resizes its ``values`` Parameter in place
    (SparseLayer._load_from_state_dict), so the optimizer keeps stepping it; should a
    load ever replace a Parameter object, the optimizer's groups are pointed at the new one.
    """
    _check_saved_capacity(model, state)
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
