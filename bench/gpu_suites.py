"""GPU benchmarks of whole layers, training steps and structure updates: ``python -m bench --device cuda``.

    python -m bench --device cuda --quick      # ~2-3 min: MLP + VGG-11, ERK 0.1/0.01, fp32/bf16, CSR/BSR-32
    python -m bench --device cuda              # everything (adds ResNet-18, more layers and densities)
    python -m bench --device cuda --suites training --precisions bf16 --formats bsr32

Suites (sparse against dense cuBLAS/cuDNN in the same process, same precision):

    layers      SparseLinear / SparseConv2d against nn.Linear / nn.Conv2d with the same kept weights
                and the masked-dense layer (weight * mask), forward (no_grad) and forward+backward;
                plus the per-op host overhead on a small layer (public ``torch.ops.sparsestart.*`` op,
                the backend's kernel called directly, ``torch.mm`` on the same shapes)
    training    one training step (zero_grad, forward, cross-entropy, backward, SGD-momentum step) of
                MLP 784-4096-4096-10 (batch 4096), VGG-11-BN and ResNet-18 at 3x32x32 after
                ``sparsify(model, density, "erk")``, against the dense model holding the kept weights
                and the masked-dense model; peak memory of a step
    algorithms  one RigL / SET structure update, as in the CPU suite (bench/algorithms.py)

The machinery the suites share (settings, timing, memory, the result file, the models and their
check) is in bench/gpu_common.py.

Precision: ``fp32`` is IEEE fp32 on both sides (``torch.backends.cuda.matmul.allow_tf32 = False``,
``torch.backends.cudnn.allow_tf32 = False``, matmul precision "highest", which the Triton kernels
follow); ``bf16`` runs forward and loss under ``torch.autocast("cuda", torch.bfloat16)`` with fp32
master weights and optimizer state, on both sides. Formats: ``csr`` (unstructured) and ``bsrB``
(B x B blocks); layers whose weight matrix is not a multiple of B (the MLP's 784-wide input
layer and 10-class output layer, the first convolution, the classifier) stay CSR in a BSR model.

Timing: every implementation of a case is run ``warmup`` times, then ``reps`` rounds interleaved
(order rotated per round). Each call is synchronised before it starts and timed by CUDA events
around it (device time: what a training loop that never waits would see as the step time, since
a step cannot overlap the next one) and by ``time.perf_counter`` around the call alone (host time:
the CPU time to enqueue the step, which equals the device time when the host is the bottleneck
or the step synchronises). Medians and quartiles are reported. On a CPU device (the dry run of
the tests) the device time falls back to perf_counter.

Peak memory of a training step: gradients are dropped (``zero_grad(set_to_none=True)``), then
``torch.cuda.reset_peak_memory_stats``, one step, ``torch.cuda.max_memory_allocated``; the peak
above the memory allocated before the step (activations, gradients, workspaces, temporaries) plus
the bytes the model keeps between steps (parameters, optimizer state, sparse index, buffers) is
the peak of a process that trains this model alone.

Correctness before timing: the sparse model's (layer's) output against its densified twin's in
the same precision and against the fp32 dense result; a case whose check fails is still timed
and flagged (``check.ok = false``, marked in the tables). Every case runs in its own try block: an
exception (e.g. out of memory, a kernel the backend lacks) is recorded in the JSON with its
message and the suite goes on; the JSON is rewritten after every case, so a killed run leaves
the cases done so far.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import algorithms as cpu_algorithms
from . import common
from .gpu_common import (  # noqa: F401  (configure, PRECISIONS: callers reach them through this module)
    ROOT, _BUILT, _check_errors, autocast, batch, build_models, check_models, configure, format_name, gpu_settings,
    interleaved, LR, machine_info, make_step, mask_pairs, model_configs, MOMENTUM, OVERHEAD_CALLS,
    OVERHEAD_ROUNDS, parse_format, peak_step_memory, per_call, PRECISIONS, Results, run_case, setup_device,
    sgd, slug, sparsify_model, step_memory, SUITES, time_call, WEIGHT_DECAY)
from .training import compiled_models, remasker, sparse_layers  # the papers' masked-dense training, as on CPU


# ----------------------------------------------------------------------------- training
def bench_training(cfg: dict, density: float, distribution: str, fmt: str, block: Optional[int], precision: str,
                   reps: int, warmup: int, seed: int, device: torch.device, compiled: bool = False) -> dict:
    models, formats = build_models(cfg, density, distribution, fmt, block, seed, device)
    x, y = batch(cfg, seed, device)
    check = check_models(models, x, y, precision, device)
    opts = {k: sgd(m) for k, m in models.items()}
    pairs = mask_pairs(models["masked"]) if "masked" in models else []
    calls = compiled_models(models, compiled)
    steps = {k: make_step(calls[k], opts[k], x, y, precision, device, after=remasker(pairs) if k == "masked" else None)
             for k in models}
    times = interleaved(steps, reps, warmup, device)
    mem = {k: step_memory(models[k], opts[k], steps[k], device) for k in models}
    layers = sparse_layers(models["sparse"])
    t = {k: v["device"]["median"] for k, v in times.items()}
    rec = {
        "model": cfg["model"], "title": cfg["title"], "batch": cfg["batch"], "input": list(cfg["input"]),
        "density": density, "distribution": distribution, "format": format_name(fmt, block),
        "layer_formats": formats, "precision": precision,
        "layer_densities": {n: m.density for n, m in layers.items()},
        "density_actual": sum(m.nnz for m in layers.values()) / sum(math.prod(m.matrix_shape) for m in layers.values()),
        "check": check, "times": times, "memory": mem,
        "speedup_vs_dense": t["dense"] / t["sparse"],
        "optimizer": f"SGD(lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY})", "compiled": compiled,
    }
    if "masked" in t:
        rec["speedup_vs_masked"] = t["masked"] / t["sparse"]
    if mem["sparse"].get("training_peak") and mem["dense"].get("training_peak"):
        rec["peak_memory_ratio_vs_dense"] = mem["sparse"]["training_peak"] / mem["dense"]["training_peak"]
    rec["resident_ratio_vs_dense"] = mem["sparse"]["resident"] / mem["dense"]["resident"]
    return rec


def _ms(s: float) -> str:
    return f"{s * 1e3:8.3f} ms"


def describe_training(recs: List[dict]) -> str:
    r = recs[0]
    t = r["times"]
    mem = r.get("peak_memory_ratio_vs_dense")
    flag = "" if r["check"]["ok"] else "  CHECK FAILED"
    return (f"sparse {_ms(t['sparse']['device']['median'])} (host {_ms(t['sparse']['host']['median'])})  dense "
            f"{_ms(t['dense']['device']['median'])}  x{r['speedup_vs_dense']:.2f}"
            + (f"  peak mem x{mem:.2f} dense" if mem is not None else "")
            + f"  err {r['check']['rel_error']:.2g} [{','.join(r['check']['sparse_layer_dtypes'])}]{flag}")


def training_cases(args, device) -> List[tuple]:
    cases = []  # density outermost (0.1 first: the targets), precision innermost (the models are reused)
    for d in args.train_densities:
        for cfg in model_configs(args.layer_set, args.train_models, args.vgg_batch):
            for dist in args.distributions:
                for f in args.formats:
                    fmt, block = parse_format(f)
                    for prec in args.precisions:
                        case = {"model": cfg["model"], "format": f, "precision": prec, "density": d,
                                "distribution": dist}
                        if getattr(args, "train_compile", False):  # its own case: merged next to the eager one
                            case["compiled"] = True
                        cases.append((case, lambda cfg=cfg, d=d, dist=dist, fmt=fmt, block=block, prec=prec: [
                            bench_training(cfg, d, dist, fmt, block, prec, args.reps, args.warmup, args.seed, device,
                                           compiled=bool(getattr(args, "train_compile", False)))],
                            describe_training))
    return cases


# ------------------------------------------------------------------------------- layers
def layer_configs(layer_set: str) -> List[dict]:
    if layer_set == "tiny":
        return [dict(kind="linear", name="linear 64->64", in_f=64, out_f=64, batch=16),
                dict(kind="conv", name="conv3x3 32->32 @6x6", cin=32, cout=32, hw=6, batch=2)]
    if layer_set == "quick":
        return [dict(kind="linear", name="linear 4096->4096", in_f=4096, out_f=4096, batch=4096),
                dict(kind="conv", name="conv3x3 64->64 @32x32", cin=64, cout=64, hw=32, batch=256)]
    return [dict(kind="linear", name="linear 4096->4096", in_f=4096, out_f=4096, batch=4096),
            dict(kind="linear", name="linear 1024->1024", in_f=1024, out_f=1024, batch=4096),
            dict(kind="conv", name="conv3x3 64->64 @32x32", cin=64, cout=64, hw=32, batch=256),
            dict(kind="conv", name="conv3x3 256->256 @8x8", cin=256, cout=256, hw=8, batch=256)]


def build_layer(cfg: dict, density: float, fmt: str, block: Optional[int], seed: int, device: torch.device):
    import sparsestart.nn as snn

    torch.manual_seed(seed)
    if cfg["kind"] == "linear":
        base = nn.Linear(cfg["in_f"], cfg["out_f"])
        sparse = snn.SparseLinear.from_dense(base, density=density, format=fmt, block_size=block, seed=seed)
        x = torch.randn(cfg["batch"], cfg["in_f"])

        def masked_fn(inp, w, bias, mask):
            return F.linear(inp, w * mask, bias)
    else:
        base = nn.Conv2d(cfg["cin"], cfg["cout"], 3, padding=1)
        sparse = snn.SparseConv2d.from_dense(base, density=density, format=fmt, block_size=block, seed=seed)
        x = torch.randn(cfg["batch"], cfg["cin"], cfg["hw"], cfg["hw"])

        def masked_fn(inp, w, bias, mask):
            return F.conv2d(inp, w * mask, bias, padding=1)
    dense = sparse.to_dense()
    mask = sparse.mask().to(dense.weight.dtype)
    return dense.to(device), sparse.to(device), x.to(device), mask.to(device), masked_fn


def bench_layer(cfg: dict, density: float, fmt: str, block: Optional[int], precision: str, reps: int, warmup: int,
                seed: int, device: torch.device) -> List[dict]:
    dense, sparse, x, mask, masked_fn = build_layer(cfg, density, fmt, block, seed, device)
    w, bias = dense.weight, dense.bias
    impl = {"sparse": sparse, "dense": dense, "masked": lambda inp: masked_fn(inp, w, bias, mask)}
    with torch.no_grad():
        ref = dense(x).float()
        with autocast(precision, device):
            y = {k: f(x) for k, f in impl.items()}
    check = _check_errors(y["sparse"], y["dense"], ref, precision)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    gys = {}
    xg = x.clone().requires_grad_(True)
    params = [p for m in (dense, sparse) for p in m.parameters()]

    def fwd(f):
        def run():
            with torch.no_grad(), autocast(precision, device):
                f(x)
        return run

    def fwd_bwd(f, prec=precision):
        def run():
            for p in params:
                p.grad = None
            xg.grad = None
            with autocast(prec, device):
                out = f(xg)
            g = gys.get(out.dtype)
            if g is None:
                g = gys[out.dtype] = gy.to(out.dtype)
            out.backward(g)
        return run

    # the input gradients: sparse and dense in this precision against the fp32 dense one
    gx = {}
    for k, f, prec in (("ref", dense, "fp32"), ("sparse", sparse, precision), ("dense", dense, precision)):
        fwd_bwd(f, prec)()
        gx[k] = xg.grad.detach().clone()
    gcheck = _check_errors(gx["sparse"], gx["dense"], gx["ref"].float(), precision)
    check["input_grad"] = {k: gcheck[k] for k in ("rel_error", "rel_error_dense_same_precision", "bound", "ok")}
    check["ok"] = check["ok"] and gcheck["ok"]
    del gx
    fns = {f"forward/{k}": fwd(f) for k, f in impl.items()}
    fns.update({f"forward+backward/{k}": fwd_bwd(f) for k, f in impl.items()})
    times = interleaved(fns, reps, warmup, device)
    mem = {}
    for name, f in fns.items():
        if name.startswith("forward+backward/"):
            m = peak_step_memory(f, device)
            if m is not None:
                mem[name.split("/")[1]] = m["peak_above_before"]
    sw = sparse.sparse_weight
    out = []
    for pass_ in ("forward", "forward+backward"):
        tt = {k.split("/")[1]: v for k, v in times.items() if k.startswith(pass_ + "/")}
        t = tt["sparse"]["device"]["median"]
        rec = {"layer": cfg["name"], "kind": cfg["kind"], "batch": cfg["batch"], "format": format_name(fmt, block),
               "precision": precision, "density": density, "density_actual": sw.density,
               "nnz_elements": sw.nnz_elements, "pass": pass_, "check": check, "times": tt,
               "speedup_vs_dense": tt["dense"]["device"]["median"] / t,
               "speedup_vs_masked": tt["masked"]["device"]["median"] / t}
        if pass_ == "forward+backward" and mem:
            rec["peak_bytes_above_before"] = mem
        out.append(rec)
    return out


def describe_layer(recs: List[dict]) -> str:
    parts = []
    for r in recs:
        t = r["times"]
        parts.append(f"{r['pass']}: sparse {_ms(t['sparse']['device']['median'])} dense "
                     f"{_ms(t['dense']['device']['median'])} x{r['speedup_vs_dense']:.2f}")
    flag = "" if recs[0]["check"]["ok"] else "  CHECK FAILED"
    return "; ".join(parts) + f"  err {recs[0]['check']['rel_error']:.2g} [{recs[0]['check']['dtype']}]{flag}"


def op_overhead(fmt: str, block: Optional[int], precision: str, device: torch.device, size: int = 256,
                n: int = 256, calls: int = OVERHEAD_CALLS, rounds: int = OVERHEAD_ROUNDS, seed: int = 0) -> dict:
    """Host and device time per call of the public ops, the chosen backend's kernel called directly and torch.mm
    on the same small shapes (W [size, size] at density 0.1, N = n)."""
    import sparsestart.nn as snn
    from sparsestart.ops import registry

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(seed)
    base = nn.Linear(size, size)
    layer = snn.SparseLinear.from_dense(base, density=0.1, format=fmt, block_size=block, seed=seed).to(device, dtype)
    twin = layer.to_dense()
    sw = layer.sparse_weight
    values = layer.values.detach()
    idx = sw.index_tensors()
    rowptr, col, slot, colptr, row, slot_t = idx
    M, K = sw.shape
    b = sw.block_size
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(K, n, generator=g).to(device, dtype)
    dy = torch.randn(M, n, generator=g).to(device, dtype)
    xb = torch.randn(n, K, generator=g).to(device, dtype)
    w = twin.weight.detach()
    ops = torch.ops.sparsestart
    be_spmm = registry.choose("spmm", [values, rowptr, x])
    be_sddmm = registry.choose("sddmm", [dy, rowptr, x])
    cases = {
        "spmm": {"public op": lambda: ops.spmm(values, *idx, x),
                 f"backend kernel ({be_spmm.name})": lambda: be_spmm.spmm(values, rowptr, col, slot, x, M, False),
                 "torch.mm": lambda: torch.mm(w, x)},
        "spmm_t": {"public op": lambda: ops.spmm_t(values, *idx, dy),
                   f"backend kernel ({be_spmm.name})": lambda: be_spmm.spmm(values, colptr, row, slot_t, dy, K, True),
                   "torch.mm": lambda: torch.mm(w.t(), dy)},
        "sddmm": {"public op": lambda: ops.sddmm(*idx, dy, x, sw.capacity, b),
                  f"backend kernel ({be_sddmm.name})": lambda: be_sddmm.sddmm(rowptr, col, slot, dy, x, sw.capacity,
                                                                            b),
                  "torch.mm": lambda: torch.mm(dy, x.t())},
    }

    def no_grad(f):
        def run():
            with torch.no_grad():
                f(xb)
        return run
    cases["layer forward"] = {"SparseLinear": no_grad(layer), "nn.Linear": no_grad(twin)}
    out = {"format": format_name(fmt, block), "precision": precision, "shape": [M, K, n], "density": sw.density,
           "calls": calls, "rounds": rounds,
           "backends": {"spmm": be_spmm.name, "sddmm": be_sddmm.name}, "ops": {}}
    for op, impls in cases.items():
        out["ops"][op] = {name: per_call(f, device, calls, rounds) for name, f in impls.items()}
    return out


def describe_overhead(recs: List[dict]) -> str:
    r = recs[0]
    parts = []
    for op, impls in r["ops"].items():
        parts.append(f"{op}: " + ", ".join(f"{k} {v['host_us']:.1f}/{v['device_us']:.1f}" for k, v in impls.items()))
    return "host/device us per call: " + "; ".join(parts)


def layer_cases(args, device) -> List[tuple]:
    cases = []
    for f in args.formats:
        fmt, block = parse_format(f)
        for prec in args.precisions:
            tiny = args.layer_set == "tiny"
            kw = dict(size=64, n=64, calls=5, rounds=3) if tiny else {}
            cases.append(({"what": "op overhead", "format": f, "precision": prec},
                          lambda fmt=fmt, block=block, prec=prec, kw=kw: [
                              dict(op_overhead(fmt, block, prec, device, **kw), kind="op_overhead")],
                          describe_overhead))
    for cfg in layer_configs(args.layer_set):
        for f in args.formats:
            fmt, block = parse_format(f)
            for prec in args.precisions:
                for d in args.densities:
                    case = {"layer": cfg["name"], "format": f, "precision": prec, "density": d}
                    cases.append((case, lambda cfg=cfg, d=d, fmt=fmt, block=block, prec=prec: bench_layer(
                        cfg, d, fmt, block, prec, args.reps, args.warmup, args.seed, device), describe_layer))
    return cases


# --------------------------------------------------------------------------- algorithms
def bench_algorithms(cfg: dict, density: float, distribution: str, fmt: str, block: Optional[int], precision: str,
                     reps: int, warmup: int, interval: int, drop_fraction: float, seed: int,
                     device: torch.device) -> dict:
    """bench/algorithms.py on the device: the cost of one RigL / SET update against an idle iteration."""

    torch.manual_seed(seed)
    sparse, formats = sparsify_model(cfg["build"](), density, distribution, fmt, block, seed)
    sparse = sparse.to(device)
    x, y = batch(cfg, seed, device)
    models = {k: copy.deepcopy(sparse) for k in ("idle", "rigl", "set")}
    opts = {k: sgd(m) for k, m in models.items()}
    algos = cpu_algorithms.updating_algorithms(models, opts, drop_fraction, seed)
    algo_times: Dict[str, List[float]] = {k: [] for k in models}

    def iteration(k):
        step = make_step(models[k], opts[k], x, y, precision, device)
        algo, ts = algos[k], algo_times[k]

        def run():
            step()
            d, _ = time_call(algo.step, device)
            ts.append(d)
        return run

    iterations = {k: iteration(k) for k in models}
    check = cpu_algorithms._check(models, algos, iterations)
    for v in algo_times.values():
        v.clear()
    times = interleaved(iterations, reps, warmup, device)
    base = times["idle"]["device"]["median"]
    layers = sparse_layers(sparse)
    rec = {"model": cfg["model"], "title": cfg["title"], "batch": cfg["batch"], "density": density,
           "distribution": distribution, "format": format_name(fmt, block), "layer_formats": formats,
           "precision": precision, "nnz": sum(m.nnz for m in layers.values()), "update_interval": interval,
           "drop_fraction": drop_fraction,
           "drop_fraction_used": algos["rigl"].drop_fraction_at(algos["rigl"].step_count),
           "check": check, "times": times,
           "algo_step": {k: common.summarize(v[-reps:]) for k, v in algo_times.items() if v},
           "iteration_ms": base * 1e3}
    for k in ("rigl", "set"):
        cost = times[k]["device"]["median"] - base
        step_s = rec["algo_step"][k]["median"]
        rec[k] = {"update_cost_ms": cost * 1e3, "step_call_ms": step_s * 1e3, "fraction": cost / (interval * base),
                  "fraction_step_call": step_s / (interval * base)}
    return rec


def describe_algorithms(recs: List[dict]) -> str:
    r = recs[0]
    return (f"iteration {r['iteration_ms']:.3f} ms" + "".join(
        f"  {k}: update {r[k]['update_cost_ms']:.3f} ms (step() {r[k]['step_call_ms']:.3f} ms) = "
        f"{r[k]['fraction'] * 100:.2f}% of {r['update_interval']} steps" for k in ("rigl", "set")))


def algorithm_cases(args, device) -> List[tuple]:
    cases = []
    for cfg in model_configs(args.layer_set, args.train_models, args.vgg_batch):
        for prec in args.algo_precisions:
            for f in args.formats:
                fmt, block = parse_format(f)
                case = {"model": cfg["model"], "format": f, "precision": prec, "density": args.algo_density}
                cases.append((case, lambda cfg=cfg, fmt=fmt, block=block, prec=prec: [bench_algorithms(
                    cfg, args.algo_density, args.distributions[0], fmt, block, prec, args.algo_reps,
                    min(args.warmup, 2), args.update_interval, args.drop_fraction, args.seed, device)],
                    describe_algorithms))
    return cases


CASES = {"layers": layer_cases, "training": training_cases, "algorithms": algorithm_cases}


# ---------------------------------------------------------------------------------- run
def _shown(path: Path) -> str:
    """A path as logs show it: relative to the repository when inside it (logs get committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def result_path(args, name: str) -> Path:
    return Path(args.out_dir) / f"{args.name or 'gpu-' + slug(name)}.json"


def run(args, command: str, log=print) -> dict:
    """Run the GPU suites of ``args`` (configured by :func:`configure`); returns the result dict."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"python -m bench --device {args.device}: CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(args.seed)
    settings = setup_device(device, args.autotune)
    meta = machine_info(device)
    meta.update(command=command, quick=args.quick, settings=gpu_settings(args), precision_settings=settings,
                kind="gpu-suites")
    name = meta["device"]
    path = args.result_path = result_path(args, "cpu-dry-run" if device.type == "cpu" else name)
    kept = {}
    if args.merge and path.exists():
        try:
            prev = json.loads(path.read_text())
            if prev.get("meta", {}).get("kind") == "gpu-suites":
                kept = {s: prev[s] for s in SUITES if s in prev and s not in args.suites}
                if kept and prev["meta"].get("device") != meta["device"]:
                    meta["merge_warning"] = f"kept suites {list(kept)} were measured on {prev['meta'].get('device')}"
        except (OSError, ValueError) as exc:
            log(f"(could not read the previous {path}: {exc})")
    if kept:
        meta["kept_from_previous"] = list(kept)
    results = Results(path, meta, kept, log=log)
    log(f"sparsestart GPU benchmarks on {name} ({device}), torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"triton {meta['triton']}, cuda extension {meta.get('cuda_extension')}, autotune {args.autotune}; "
        f"writing {_shown(path)}")
    plan = [(s, CASES[s](args, device)) for s in args.suites]
    results.total = sum(len(c) for _, c in plan)
    budget_end = time.time() + args.time_budget if args.time_budget is not None else None
    for suite, cases in plan:
        ts = time.time()
        log(f"{suite}: {len(cases)} cases")
        run_rec = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "settings": gpu_settings(args)}
        results.suite(suite, run_rec)
        for case, fn, describe in cases:
            run_case(results, suite, case, fn, describe, budget_end, device)
        run_rec["seconds"] = round(time.time() - ts, 1)
    launch = sys.modules.get("sparsestart.kernels.launch")  # imported only if a Triton kernel ran
    meta["triton_autotune"] = getattr(launch, "AUTOTUNE", None)
    _BUILT.clear()
    results.flush()
    errors = sum(len(results.data[s]["errors"]) for s in args.suites)
    log(f"wrote {_shown(path)} ({results.total} cases, {errors} failed or skipped, {meta['seconds']:.0f} s)")
    return results.data
