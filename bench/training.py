"""Training-step benchmarks: a whole step of an ER-sparse model against the dense and the masked-dense model.

One training step = ``optimizer.zero_grad(set_to_none=True)``, forward, cross-entropy
loss, backward, ``optimizer.step()`` (SGD, lr 0.01, momentum 0.9, weight decay 5e-4)
on a fixed random batch. Three models start from the same numbers:

    sparse   sparsestart.sparsify(model, density, distribution): SparseLinear/SparseConv2d
             holding only the kept weights (CSR); the optimizer sees values and biases
    dense    the torch model (nn.Linear/nn.Conv2d), initialised with the kept weights
             (zeros elsewhere), updating every weight
    masked   the papers' way: every Linear/Conv2d weight is a dense parameter seen through
             a fixed 0/1 float mask (a torch parametrization: forward uses weight * mask, so
             autograd multiplies the gradient by the mask); the optimizer updates the whole
             dense tensor and the mask is re-applied to the weight after every optimizer
             step (as sparselearning's ``apply_mask`` does)

Before timing, one step of each is checked: the three losses of the first forward
agree and the masked weight and its gradient stay zero outside the mask; and on
float64 copies of the sparse and masked models, the sparse value and bias gradients
equal the masked model's at the kept positions and the weights after the optimizer
step agree (float64, because in float32 a pre-activation within rounding error of
zero can fall on the other side of a ReLU in the two models, and through BatchNorm
that single element changes the whole gradient of earlier layers). The three steps are then timed interleaved
(common.interleaved); each timed call also records its forward / backward /
optimizer split. After timing: one profiled step per model (time per op), and the
bytes of parameters, gradients, optimizer state (SGD momentum, and AdamW after one
AdamW step), sparse index buffers, masks and other buffers.
"""
from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import common

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
PHASES = ("forward", "backward", "optimizer")


def default_distribution() -> str:
    """The layer-wise density rule sparsify uses when none is given."""
    import sparsestart

    return inspect.signature(sparsestart.sparsify).parameters["distribution"].default


def configs(quick: bool, models, vgg_batch: Optional[int] = None) -> List[dict]:
    from sparsestart import models as zoo

    if quick:
        cfgs = [dict(model="mlp", title="MLP 64-96-96-10", batch=16, input=(64,),
                     build=lambda: zoo.mlp([64, 96, 96, 10])),
                dict(model="vgg11", title="VGG-11-BN (width 1/16) at 3x8x8", batch=vgg_batch or 2, input=(3, 8, 8),
                     build=lambda: zoo.vgg11(width=0.0625, input_size=8)),
                dict(model="resnet20", title="ResNet-20 (width 1/4) at 3x8x8", batch=vgg_batch or 2, input=(3, 8, 8),
                     build=lambda: zoo.resnet20(width=0.25, input_size=8)),
                dict(model="resnet18", title="ResNet-18 (width 1/16) at 3x8x8", batch=vgg_batch or 2,
                     input=(3, 8, 8), build=lambda: zoo.resnet18(width=0.0625, input_size=8))]
    else:
        cfgs = [dict(model="mlp", title="MLP 784-4096-4096-10", batch=256, input=(784,),
                     build=lambda: zoo.mlp([784, 4096, 4096, 10])),
                dict(model="vgg11", title="VGG-11-BN (CIFAR) at 3x32x32", batch=vgg_batch or 64, input=(3, 32, 32),
                     build=lambda: zoo.vgg11()),
                dict(model="resnet20", title="ResNet-20 (CIFAR) at 3x32x32", batch=vgg_batch or 64,
                     input=(3, 32, 32), build=lambda: zoo.resnet20()),
                dict(model="resnet18", title="ResNet-18 (CIFAR) at 3x32x32", batch=vgg_batch or 64,
                     input=(3, 32, 32), build=lambda: zoo.resnet18())]
    return [c for c in cfgs if c["model"] in models]


class MaskParametrization(nn.Module):
    """weight -> weight * mask (a fixed float 0/1 mask, as the papers' code keeps it)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def sparse_model(cfg: dict, density: float, distribution: str, seed: int):
    """(dense model, its sparsified copy): the copy keeps an ER structure of the dense model's weights."""
    import sparsestart

    torch.manual_seed(seed)
    base = cfg["build"]()
    sparse = sparsestart.sparsify(copy.deepcopy(base), density, distribution, seed=seed)
    return base, sparse


def sparse_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from sparsestart.nn import SparseConv2d, SparseLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}


def build_variants(cfg: dict, density: float, distribution: str, seed: int):
    """The sparse, dense and masked models holding the same kept weights, and the masked model's
    (weight, mask) pairs."""
    base, sparse = sparse_model(cfg, density, distribution, seed)
    layers = sparse_layers(sparse)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in layers.items():
            dense.get_submodule(name).weight.copy_(layer.dense_weight())
    masked = copy.deepcopy(dense)
    for name, layer in layers.items():
        mod = masked.get_submodule(name)
        parametrize.register_parametrization(mod, "weight", MaskParametrization(layer.mask().to(mod.weight.dtype)))
    return {"sparse": sparse, "dense": dense, "masked": masked}, mask_pairs(masked)


def mask_pairs(model: nn.Module) -> List[tuple]:
    """(dense weight, mask) of every masked layer, in registration order."""
    return [(m.parametrizations.weight.original, m.parametrizations.weight[0].mask) for m in model.modules()
            if parametrize.is_parametrized(m, "weight")]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              after=None, phases: Optional[List[tuple]] = None):
    """One training step as a closure returning the loss; ``after`` runs after optimizer.step() (and is
    timed with it); ``phases`` receives (forward, backward, optimizer) seconds of every call."""
    clock = time.perf_counter

    def step():
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        opt.step()
        if after is not None:
            after()
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, clock() - t2))
        return loss
    return step


def remasker(pairs):
    @torch.no_grad()
    def remask():
        for w, m in pairs:
            w.mul_(m)
    return remask


def batch(cfg: dict, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(cfg["batch"], *cfg["input"], generator=g), torch.randint(0, 10, (cfg["batch"],), generator=g)


def _compare_step(sparse: nn.Module, masked: nn.Module) -> dict:
    """After one step of each from the same numbers: the sparse value and bias gradients against the masked
    model's at the kept positions, the weights after the optimizer step, and the masked weight and gradient
    outside the mask (max relative errors over the layers)."""
    grad_err = weight_err = outside = 0.0
    for (name, layer), (w, mask) in zip(sparse_layers(sparse).items(), mask_pairs(masked)):
        rows, cols, slots = layer.sparse_weight.coo()
        g_masked = w.grad.reshape(layer.matrix_shape)[rows, cols]
        grad_err = max(grad_err, common.rel_err(layer.values.grad[slots], g_masked))
        if layer.bias is not None:
            grad_err = max(grad_err, common.rel_err(layer.bias.grad, masked.get_submodule(name).bias.grad))
        weight_err = max(weight_err, common.rel_err(layer.dense_weight(), w))
        outside = max(outside, float((w.detach() * (1 - mask)).abs().max()), float((w.grad * (1 - mask)).abs().max()))
    return {"rel_error_grad": grad_err, "rel_error_weight_after_step": weight_err, "masked_outside_max": outside}


def _check(models, steps, x, y, tol32: float = 1e-4, tol64: float = 1e-9) -> dict:
    """One step of each model from the same numbers. float32 (the timed models): the three losses agree and
    the masked weight and gradient stay zero outside the mask. float64 copies of the sparse and masked
    models: the gradients and the weights after the step agree. (In float32 a pre-activation within
    rounding error of 0 may take the other side of a ReLU in the two models; through BatchNorm that one
    element changes whole gradients of earlier layers, so gradients are compared in float64.)"""
    copies = {k: copy.deepcopy(models[k]).double() for k in ("sparse", "masked")}
    losses = {k: steps[k]().item() for k in steps}
    loss_err = max(abs(losses[k] - losses["dense"]) / max(abs(losses["dense"]), 1e-30) for k in losses)
    outside32 = _compare_step(models["sparse"], models["masked"])["masked_outside_max"]
    x64 = x.double()
    for k, m in copies.items():
        make_step(m, sgd(m), x64, y, after=remasker(mask_pairs(m)) if k == "masked" else None)()
    res = _compare_step(copies["sparse"], copies["masked"])
    ok = (loss_err <= tol32 and outside32 == 0.0 and res["masked_outside_max"] == 0.0
          and res["rel_error_grad"] <= tol64 and res["rel_error_weight_after_step"] <= tol64)
    if not ok:
        raise AssertionError(f"training step check failed: float32 loss rel. error {loss_err:.3g}, masked weight or "
                             f"gradient outside the mask {outside32:.3g}; float64: {res}")
    return {"losses": losses, "rel_error_loss": loss_err, "masked_outside_max": outside32,
            **{k + "_float64": v for k, v in res.items()}}


def footprint(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict:
    """Bytes of the tensors training keeps between steps (activations excluded)."""
    layers = sparse_layers(model)
    index = [t for m in layers.values() for t in m.sparse_weight.index_tensors()]
    masks = [m.mask for m in model.modules() if isinstance(m, MaskParametrization)]
    special = {id(t) for t in index + masks}
    params = list(model.parameters())
    state = [v for st in (opt.state.values() if opt is not None else ()) for v in st.values() if torch.is_tensor(v)]
    out = {
        "params": common.tensor_bytes(params),
        "grads": common.tensor_bytes(p.grad for p in params),
        "optimizer_state": common.tensor_bytes(state),
        "index": common.tensor_bytes(index),
        "mask": common.tensor_bytes(masks),
        "other_buffers": common.tensor_bytes(b for b in model.buffers() if id(b) not in special),
        "sparse_weight_values": common.tensor_bytes(m.values for m in layers.values()),
    }
    out["total"] = sum(out[k] for k in ("params", "grads", "optimizer_state", "index", "mask", "other_buffers"))
    return out


def memory(models, opts, pairs, x, y) -> dict:
    """Footprints with SGD momentum (the optimizers timed; grads of their last step), then with AdamW
    after one AdamW step of each model (run after timing: it changes the weights)."""
    out = {}
    for k, model in models.items():
        sgd_fp = footprint(model, opts[k])
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
        make_step(model, adamw, x, y, after=remasker(pairs) if k == "masked" else None)()
        adamw_fp = footprint(model, adamw)
        out[k] = {"sgd_momentum": sgd_fp, "adamw": adamw_fp}
    for k in out:
        for o in ("sgd_momentum", "adamw"):
            out[k][o]["ratio_vs_dense"] = out[k][o]["total"] / out["dense"][o]["total"]
    return out


def profile(step, share_floor: float = 0.01) -> dict:
    """Self CPU time per op over one profiled step (ops above ``share_floor`` of the total)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(({"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events
                  if e.self_cpu_time_total >= share_floor * total), key=lambda r: -r["self_ms"])
    return {"total_ms": total / 1e3, "ops": ops}


def compiled_models(models: Dict[str, nn.Module], enabled: bool) -> Dict[str, nn.Module]:
    """What each variant's step calls: the model, or (``--compile``) its torch.compile'd wrapper, for every
    variant alike (the same compiler around dense, masked and sparse; ``sparsestart train --compile``)."""
    if not enabled:
        return dict(models)
    torch._dynamo.reset()  # a fresh cache per problem: no recompile limit carried over from the last one
    return {k: torch.compile(m) for k, m in models.items()}


def bench_model(cfg: dict, density: float, distribution: str, rounds: int, seed: int = 0,
                compiled: bool = False) -> dict:
    models, pairs = build_variants(cfg, density, distribution, seed)
    x, y = batch(cfg, seed)
    opts = {k: sgd(m) for k, m in models.items()}
    phases: Dict[str, List[tuple]] = {k: [] for k in models}
    calls = compiled_models(models, compiled)
    steps = {k: make_step(calls[k], opts[k], x, y, after=remasker(pairs) if k == "masked" else None,
                          phases=phases[k])
             for k in models}
    check = _check(models, steps, x, y)
    idle = common.idle_fraction()
    times = common.interleaved(steps, rounds, min_sample=5e-3, max_inner=50)
    split = {k: {ph: statistics.median(s[i] for s in common.timed_calls(phases[k], times[k]))
                 for i, ph in enumerate(PHASES)} for k in phases}
    prof = {k: profile(steps[k]) for k in steps}
    mem = memory(models, opts, pairs, x, y)
    layers = sparse_layers(models["sparse"])
    t = times["sparse"]["median"]
    return {
        "model": cfg["model"], "title": cfg["title"], "batch": cfg["batch"], "input": list(cfg["input"]),
        "density": density, "distribution": distribution,
        "layer_densities": {n: m.density for n, m in layers.items()},
        "density_actual": sum(m.nnz for m in layers.values()) / sum(math.prod(m.matrix_shape) for m in layers.values()),
        "idle_before": idle, "check": check, "times": times, "phases": split, "profile": prof, "memory": mem,
        "speedup_vs_dense": times["dense"]["median"] / t, "speedup_vs_masked": times["masked"]["median"] / t,
        "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY})", "compiled": compiled,
    }


def run(args, log=print) -> dict:
    """Every (model, distribution, density) problem under this process's allocator policy; with
    ``args.train_malloc == "both"`` the same problems again in a child process under the other policy
    (glibc's malloc cannot be put back to its default inside a process: a mallopt call fixes thresholds
    that glibc otherwise adapts). Each record names its policy in ``malloc``."""
    from sparsestart import runtime

    policy = runtime.malloc_settings()["policy"]
    records = []
    for cfg in configs(args.quick, args.train_models, args.vgg_batch):
        for dist in args.distributions:
            for d in args.train_densities:
                if args.wait_quiet:
                    common.wait_quiet(args.wait_quiet)
                r = bench_model(cfg, d, dist, args.train_rounds, seed=args.seed,
                                compiled=bool(getattr(args, "train_compile", False)))
                r["malloc"] = policy
                records.append(r)
                t, m = r["times"], r["memory"]
                log(f"  {r['title']:34s} batch {r['batch']:<4d} {r['distribution']} d={d:<5g} {policy:19s} "
                    f"sparse {t['sparse']['median'] * 1e3:8.2f} ms  dense {t['dense']['median'] * 1e3:8.2f} ms"
                    f"  masked {t['masked']['median'] * 1e3:8.2f} ms  x{r['speedup_vs_dense']:.2f} dense"
                    f"  x{r['speedup_vs_masked']:.2f} masked  memory "
                    f"{m['sparse']['sgd_momentum']['ratio_vs_dense']:.3f}x dense (SGD)")
    if getattr(args, "train_malloc", "process") == "both":
        records += _other_malloc(args, policy, log)
    return {"records": records}


def _other_malloc(args, policy: str, log) -> List[dict]:
    """The training records of a child ``python -m bench --suites training`` under the other allocator policy."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "bench", "--suites", "training", "--train-malloc", "process", "--no-merge",
                "--name", "other-malloc", "--out-dir", tmp, "--docs", "", "--threads", str(torch.get_num_threads()),
                "--seed", str(args.seed), "--train-rounds", str(args.train_rounds), "--wait-quiet",
                str(args.wait_quiet), "--train-models", *args.train_models, "--distributions", *args.distributions,
                "--train-densities", *map(str, args.train_densities)]
        argv += ["--quick"] * bool(args.quick) + (["--vgg-batch", str(args.vgg_batch)] if args.vgg_batch else [])
        argv += ["--default-malloc"] if policy != "default" else []  # the child takes the policy this one lacks
        argv += ["--compile"] * bool(getattr(args, "train_compile", False))
        log(f"  the same problems under the other allocator policy: {' '.join(argv[1:])}")
        done = subprocess.run(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in done.stdout.splitlines():
            if line.startswith("  "):
                log(line)
        if done.returncode != 0:
            raise RuntimeError(f"the training suite under the other allocator policy failed "
                               f"(exit {done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads((Path(tmp) / "other-malloc.json").read_text())["training"]["records"]
