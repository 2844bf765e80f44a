"""The machinery the GPU suites (bench/gpu_suites.py) share: device settings and machine facts,
CUDA-event timing (perf_counter on CPU), peak memory, the result file that survives a killed run,
and the models (sparse, dense, masked-dense) with their correctness check."""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import common
from . import training as cpu_training
from .training import MaskParametrization, sparse_layers  # the papers' masked-dense training, as on CPU

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("training", "layers", "algorithms")  # the default order: the targets first
PRECISIONS = ("fp32", "bf16")
# Relative tolerance (max |out - ref| / max |ref|) of the check against the fp32 dense result; the
# sparse side may also be up to CHECK_FACTOR times the same-precision dense error (DESIGN.md).
TOL = {"fp32": 1e-4, "bf16": 3e-2}
CHECK_FACTOR = 3.0
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
NEVER = 10**12
OVERHEAD_CALLS, OVERHEAD_ROUNDS = 50, 7  # per-op host overhead: calls per burst, bursts


# ----------------------------------------------------------------------------- settings
def parse_format(s: str) -> tuple:
    """'csr' -> ('csr', None); 'bsr32' -> ('bsr', 32)."""
    s = s.lower()
    if s == "csr":
        return "csr", None
    m = re.fullmatch(r"bsr-?(\d+)", s)
    if not m or int(m.group(1)) < 2:
        raise ValueError(f"format must be csr or bsrB (e.g. bsr32), got {s!r}")
    return "bsr", int(m.group(1))


def format_name(fmt: str, block: Optional[int]) -> str:
    return "csr" if fmt == "csr" else f"bsr{block}"


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{common.cpu_model()} (cpu dry run)"


def configure(args) -> None:
    """Fill in the GPU suites' defaults (quick / full / tiny) on the parsed CLI arguments."""
    tiny = getattr(args, "tiny", False)
    quick = args.quick or tiny
    args.suites = list(args.suites or SUITES)
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        raise SystemExit(f"python -m bench --device {args.device}: suites {bad} are CPU-only; the GPU suites are "
                         f"{list(SUITES)} (GPU kernels: python bench/gpu.py)")
    args.train_models = args.train_models or (["mlp", "vgg11"] if quick else ["mlp", "vgg11", "resnet18"])
    if "resnet20" in args.train_models:
        raise ValueError("--train-models resnet20 is measured by the CPU suites only; the GPU suites take mlp, "
                         "vgg11 and resnet18")
    if getattr(args, "train_malloc", None) is not None:
        raise ValueError("--train-malloc applies to the CPU training suite (glibc's allocator); leave it out with "
                         "--device cuda")
    args.densities = args.densities or ([0.1, 0.01] if quick else [0.5, 0.2, 0.1, 0.05, 0.01])
    args.precisions = args.precisions or list(PRECISIONS)
    args.formats = args.formats or ["csr", "bsr32"]
    for f in args.formats:
        parse_format(f)
    args.reps = args.reps or (3 if tiny else 10 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3 if quick else 5)
    args.algo_reps = args.algo_reps or (2 if tiny else 5 if quick else 10)
    args.algo_precisions = args.algo_precisions or (["fp32"] if quick else list(args.precisions))
    args.layer_set = "tiny" if tiny else "quick" if quick else "full"
    if args.autotune is None:  # the quick run must fit a few minutes: no autotune search
        env = os.environ.get("SPARSESTART_TRITON_AUTOTUNE")
        args.autotune = (env != "0") if env is not None else not quick


def gpu_settings(args) -> dict:
    keys = ("suites", "train_models", "train_densities", "densities", "precisions", "formats", "distributions",
            "reps", "warmup", "algo_reps", "algo_precisions", "algo_density", "update_interval", "drop_fraction",
            "vgg_batch", "layer_set", "autotune", "seed", "time_budget")
    return {k: getattr(args, k, None) for k in keys}


def setup_device(device: torch.device, autotune: bool) -> dict:
    """IEEE fp32 everywhere, cuDNN autotuning for the dense baseline; the Triton autotune switch (read by
    sparsestart.kernels when first imported). Returns what was set."""
    out = {}
    if device.type == "cuda":  # (the CPU dry run leaves the environment of the calling process alone)
        os.environ["SPARSESTART_TRITON_AUTOTUNE"] = "1" if autotune else "0"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.benchmark = True
        out.update(cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=True,
                   float32_matmul_precision=torch.get_float32_matmul_precision())
        for key, get in (("cuda_matmul_fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
                         ("cudnn_conv_fp32_precision", lambda: torch.backends.cudnn.conv.fp32_precision)):
            try:  # torch >= 2.9's TF32 API
                out[key] = get()
            except (AttributeError, RuntimeError):
                pass
    out["sparsestart_triton_autotune_env"] = os.environ.get("SPARSESTART_TRITON_AUTOTUNE")
    return out


def machine_info(device: torch.device) -> dict:
    meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "host": platform.node(),
            "cpu": common.cpu_model(), "logical_cpus": os.cpu_count(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(capability=f"{p.major}.{p.minor}", total_memory=p.total_memory,
                    multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    try:
        import importlib.metadata as md
        meta["triton"] = md.version("triton")
    except Exception:  # noqa: BLE001 - not installed
        meta["triton"] = None
    try:
        import sparsestart.ops.gpu as g
        meta["cuda_extension"] = g.cuda_extension_available()
        meta["triton_available"] = g.triton_available()
    except Exception as exc:  # noqa: BLE001
        meta["gpu_backends_error"] = f"{type(exc).__name__}: {exc}"
    return meta


# ------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> tuple:
    """(device seconds, host seconds) of one call, started on an idle device."""
    if device.type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        h0 = time.perf_counter()
        fn()
        h1 = time.perf_counter()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, h1 - h0
    h0 = time.perf_counter()
    fn()
    h1 = time.perf_counter()
    return h1 - h0, h1 - h0


def interleaved(fns: Dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> Dict[str, dict]:
    """{name: {"device": stats, "host": stats}} in seconds (common.summarize) over ``reps`` rotated rounds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    dev: Dict[str, List[float]] = {n: [] for n in names}
    host: Dict[str, List[float]] = {n: [] for n in names}
    for order in common.rotations(names, reps):
        for n in order:
            d, h = time_call(fns[n], device)
            dev[n].append(d)
            host[n].append(h)
    return {n: {"device": common.summarize(dev[n]), "host": common.summarize(host[n])} for n in names}


def per_call(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> dict:
    """Host and device microseconds per call of ``fn`` issued ``calls`` times back to back (medians of rounds):
    host = the time to enqueue one call, device = the device time of the burst / calls."""
    for _ in range(3):
        fn()
    host, dev = [], []
    for _ in range(rounds):
        def burst():
            for _ in range(calls):
                fn()
        d, h = time_call(burst, device)
        host.append(h / calls * 1e6)
        dev.append(d / calls * 1e6)
    return {"host_us": statistics.median(host), "device_us": statistics.median(dev), "calls": calls,
            "rounds": rounds}


def peak_step_memory(step: Callable[[], object], device: torch.device) -> Optional[dict]:
    """Bytes allocated before the call, and the peak during it (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"allocated_before": base, "max_allocated": peak, "peak_above_before": peak - base}


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return contextlib.nullcontext()


def _check_errors(out, out_dense, ref, precision: str) -> dict:
    """Errors of the sparse and the dense result of the same precision against the fp32 dense reference."""
    finite = bool(torch.isfinite(out.float()).all())
    e_s, e_d = common.rel_err(out.float(), ref), common.rel_err(out_dense.float(), ref)
    bound = max(TOL[precision], CHECK_FACTOR * e_d)
    return {"rel_error": e_s, "rel_error_dense_same_precision": e_d, "bound": bound,
            "ok": finite and e_s <= bound, "dtype": str(out.dtype).replace("torch.", ""),
            "dense_dtype": str(out_dense.dtype).replace("torch.", "")}


# ------------------------------------------------------------------------------ results
class Results:
    """The result file, rewritten (atomically) after every case."""

    def __init__(self, path: Path, meta: dict, kept: Optional[dict] = None, log=print):
        self.path = Path(path)
        self.data = {"meta": meta, **(kept or {})}
        self.log = log
        self.t0 = time.time()
        self.total = 0
        self.done = 0

    def suite(self, name: str, run: dict) -> dict:
        self.data[name] = {"run": run, "records": [], "errors": []}
        self.flush()
        return self.data[name]

    def flush(self) -> None:
        self.data["meta"]["seconds"] = round(time.time() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.path)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(results: Results, suite: str, case: dict, fn: Callable[[], List[dict]], describe, budget_end,
             device: torch.device) -> None:
    """Run one case; its records (or its error) go into the suite's result and the file is rewritten."""
    results.done += 1
    label = " ".join(f"{k}={v}" for k, v in case.items())
    head = f"[{results.done}/{results.total} {time.time() - results.t0:6.1f}s] {suite} {label}"
    if budget_end is not None and time.time() > budget_end:
        results.data[suite]["errors"].append({**case, "status": "skipped", "error": "time budget exhausted"})
        results.log(f"{head}: skipped (time budget)")
        results.flush()
        return
    t0 = time.time()
    try:
        recs = fn()
        for r in recs:
            r["case_seconds"] = round(time.time() - t0, 2)
        results.data[suite]["records"].extend(recs)
        results.log(f"{head}: {describe(recs)}  ({time.time() - t0:.1f}s)")
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and the suite goes on
        msg = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exc(limit=8)
        results.data[suite]["errors"].append({**case, "status": "error", "error": msg[:4000], "traceback": tb[-4000:],
                                              "oom": isinstance(exc, torch.cuda.OutOfMemoryError)
                                              or "out of memory" in msg.lower(),
                                              "seconds": round(time.time() - t0, 2)})
        results.log(f"{head}: FAILED after {time.time() - t0:.1f}s: {msg.splitlines()[0][:300] if msg else ''}")
    finally:
        _free(device)
        results.flush()


# ------------------------------------------------------------------------------ models
def model_configs(layer_set: str, models: Sequence[str], vgg_batch: Optional[int] = None) -> List[dict]:
    from sparsestart import models as zoo

    if layer_set == "tiny":
        cfgs = [dict(model="mlp", title="MLP 64-96-96-10", batch=16, input=(64,),
                     build=lambda: zoo.mlp([64, 96, 96, 10])),
                dict(model="vgg11", title="VGG-11-BN (width 1/16) at 3x8x8", batch=vgg_batch or 2, input=(3, 8, 8),
                     build=lambda: zoo.vgg11(width=0.0625, input_size=8)),
                dict(model="resnet18", title="ResNet-18 (width 1/16) at 3x8x8", batch=vgg_batch or 2,
                     input=(3, 8, 8), build=lambda: zoo.resnet18(width=0.0625, input_size=8))]
    else:
        batch = vgg_batch or 256
        cfgs = [dict(model="mlp", title="MLP 784-4096-4096-10", batch=4096, input=(784,),
                     build=lambda: zoo.mlp([784, 4096, 4096, 10])),
                dict(model="vgg11", title="VGG-11-BN at 3x32x32", batch=batch, input=(3, 32, 32),
                     build=lambda: zoo.vgg11()),
                dict(model="resnet18", title="ResNet-18 at 3x32x32", batch=batch, input=(3, 32, 32),
                     build=lambda: zoo.resnet18())]
    by = {c["model"]: c for c in cfgs}
    return [by[m] for m in models if m in by]


def sparsify_model(model: nn.Module, density: float, distribution: str, fmt: str, block: Optional[int],
                   seed: int) -> tuple:
    """sparsify(model) with ``distribution`` densities; BSR where a layer's matrix is a multiple of the block,
    CSR elsewhere (same densities). Returns (model, {layer name: format name})."""
    import sparsestart
    from sparsestart.init import allocate_densities
    from sparsestart.nn.convert import maskable_layers

    dens = allocate_densities(model, density, distribution)
    if fmt == "csr":
        return sparsestart.sparsify(model, dens, format="csr", seed=seed), {n: "csr" for n in dens}
    layers = maskable_layers(model)
    csr = [n for n, m in layers if m.weight.shape[0] % block or m.weight[0].numel() % block]
    bsr = {n: d for n, d in dens.items() if n not in csr}
    if bsr:
        sparsestart.sparsify(model, bsr, format="bsr", block_size=block, seed=seed, exclude=csr)
    if csr:
        sparsestart.sparsify(model, {n: dens[n] for n in csr}, format="csr", seed=seed + 1)
    return model, {n: ("csr" if n in csr else format_name(fmt, block)) for n in dens}


def mask_pairs(model: nn.Module) -> List[tuple]:
    return [(m.parametrizations.weight.original, m.parametrizations.weight[0].mask) for m in model.modules()
            if parametrize.is_parametrized(m, "weight")]


_BUILT: dict = {}  # the last models built on the CPU: the next precision of the same case reuses them


def build_models(cfg: dict, density: float, distribution: str, fmt: str, block: Optional[int], seed: int,
                 device: torch.device, masked: bool = True) -> tuple:
    """{sparse, dense, masked} models on ``device`` holding the same kept weights, and the layer formats."""
    key = (cfg["model"], cfg["title"], density, distribution, fmt, block, seed, masked)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = _build_models(cfg, density, distribution, fmt, block, seed, masked)
    models, formats = _BUILT[key]
    return {k: copy.deepcopy(v).to(device) for k, v in models.items()}, formats


def _build_models(cfg, density, distribution, fmt, block, seed, masked):
    from sparsestart import densify

    torch.manual_seed(seed)
    base = cfg["build"]()
    sparse, formats = sparsify_model(base, density, distribution, fmt, block, seed)
    dense = densify(copy.deepcopy(sparse))
    models = {"sparse": sparse, "dense": dense}
    if masked:
        m = copy.deepcopy(dense)
        for name, layer in sparse_layers(sparse).items():
            mod = m.get_submodule(name)
            parametrize.register_parametrization(mod, "weight", MaskParametrization(layer.mask().to(mod.weight.dtype)))
        models["masked"] = m
    return models, formats


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, precision: str, device: torch.device,
              after: Optional[Callable[[], None]] = None):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if after is not None:
            after()
        return loss
    return step


def batch(cfg: dict, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(cfg["batch"], *cfg["input"], generator=g)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g)
    return x.to(device), y.to(device)


def _sparse_dtypes(model: nn.Module, run: Callable[[], object]) -> List[str]:
    """The output dtypes of the sparse layers during ``run()`` (shows whether bf16 autocast reached them)."""
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(str(out.dtype).replace("torch.", "")))
             for m in sparse_layers(model).values()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return sorted(seen)


def check_models(models: dict, x, y, precision: str, device: torch.device) -> dict:
    """The sparse model's logits and loss against its dense twin in the same precision and the fp32 dense
    result (the verdict); the value gradients of one backward against the dense twin's weight gradients at
    the kept positions (recorded: a pre-activation within rounding of zero may take the other side of a
    ReLU in the two models, and through BatchNorm that changes whole gradients of earlier layers)."""
    sparse, dense = models["sparse"], models["dense"]
    # Copies, so the models timed afterwards keep their BatchNorm statistics and gradients untouched.
    sparse, dense = copy.deepcopy(sparse), copy.deepcopy(dense)
    out = {}

    def fwd_sparse():
        with autocast(precision, device):
            out["sparse"] = sparse(x)
    dtypes = _sparse_dtypes(sparse, fwd_sparse)
    with autocast(precision, device):
        out["dense"] = dense(x)
    with torch.no_grad():
        ref = copy.deepcopy(dense)(x).detach()
    res = _check_errors(out["sparse"].detach(), out["dense"].detach(), ref, precision)
    loss = {k: F.cross_entropy(v.float(), y) for k, v in out.items()}
    loss_ref = F.cross_entropy(ref, y)
    res["loss"] = {k: v.item() for k, v in loss.items()}
    res["loss_fp32_dense"] = loss_ref.item()
    res["sparse_layer_dtypes"] = dtypes
    for v in loss.values():
        v.backward()
    grad_err = 0.0
    for name, layer in sparse_layers(sparse).items():
        sw = layer.sparse_weight
        if layer.values.grad is None:
            continue
        g_sparse = type(sw)(layer.values.grad.detach(), *sw.index_tensors(), sw.shape).to_dense()
        w = dense.get_submodule(name).weight
        g_dense = w.grad.reshape(sw.shape) * sw.mask().to(w.grad.dtype)
        grad_err = max(grad_err, common.rel_err(g_sparse.float(), g_dense.float()))
    res["rel_error_value_grad"] = grad_err
    return res


def footprint(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict:
    """Bytes the model keeps between steps, gradients left out (they are part of the step's peak)."""
    fp = cpu_training.footprint(model, opt)
    out = {k: fp[k] for k in ("params", "optimizer_state", "index", "mask", "other_buffers")}
    out["resident"] = sum(out.values())
    return out


def step_memory(model, opt, step, device) -> dict:
    """Resident bytes (without gradients) and the peak of one step (see the module docstring)."""
    opt.zero_grad(set_to_none=True)
    fp = footprint(model, opt)
    mem = peak_step_memory(step, device)
    if mem is not None:
        fp.update(mem)
        fp["training_peak"] = fp["resident"] + mem["peak_above_before"]
    return fp
