"""Render benchmark JSON (bench/results/*.json) as the markdown report docs/benchmarks.md.

    python -m bench.report                                  # bench/results/cpu.json -> docs/benchmarks.md
    python -m bench.report bench/results/x.json --out -     # print to stdout
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from . import fit

ROOT = Path(__file__).resolve().parents[1]

# The targets of the issue "CPU kernels that make sparse training faster than dense".
TARGETS = [
    ("spmm", 0.1, "dense", 3.5),
    ("spmm", 0.01, "dense", 20.0),
]
TORCH_TARGET = ("spmm", 0.2, 2.0)  # >= 2x torch CSR @ dense at every density <= 0.2
# Issue "training step and memory": ER MLP at density 0.1.
TRAIN_TARGET = {"model": "mlp", "density": 0.1, "speedup": 2.5, "memory_ratio": 0.3}
ALGO_TARGET = 0.02  # one RigL/SET update <= 2% of the training between two updates (issue 14; it was 5% before)
# Issue 14 (CPU speed of conv nets): training step vs dense at ERK 0.1 / 0.01 under glibc's default malloc.
STEP_TARGETS = {"mlp": {0.1: 5.0, 0.01: 20.0}, "vgg11": {0.1: 2.0, 0.01: 5.0}, "resnet20": {0.1: 1.5, 0.01: 3.0}}
SAMPLING_TARGET = {"seconds": 5.0, "bytes": 1e9}  # one 32768 x 32768 layer at density 0.01


def _f(v, fmt="{:.2f}", none="–"):
    if v is None or (isinstance(v, float) and v != v):
        return none
    return fmt.format(v)


def _load(v):
    return "–" if not v else ", ".join(f"{x:.2f}" for x in v)


def _ms(s):
    return _f(s * 1e3, "{:.3f}" if s < 0.01 else "{:.2f}")


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shape(r):
    return f"{r['M']}x{r['K']}x{r['N']}"


def _targets(recs: List[dict]) -> str:
    """The issue's targets, on the linear-layer shapes (square W, N = batch <= 1024); the unfolded-convolution
    shapes are reported in the tables only."""
    rows = []
    csr = [r for r in recs if r["format"] == "csr" and r["op"] == "spmm" and r["M"] == r["K"] and r["N"] <= 1024]
    for shape in sorted({_shape(r) for r in csr}, key=lambda s: [-int(v) for v in s.split("x")]):
        rs = {r["density"]: r for r in csr if _shape(r) == shape}
        for op, d, base, goal in TARGETS:
            if d in rs:
                v = rs[d]["speedup_vs_dense"]
                rows.append([f"{op} CSR {shape}, density {d}: >= {goal:g}x faster than dense GEMM",
                             f"{v:.2f}x", "met" if v >= goal else f"missed by {(1 - v / goal) * 100:.0f}%"])
        low = [r for d, r in sorted(rs.items(), reverse=True) if d <= TORCH_TARGET[1] and "speedup_vs_torch" in r]
        if low:
            worst = min(low, key=lambda r: r["speedup_vs_torch"])
            ok = worst["speedup_vs_torch"] >= TORCH_TARGET[2]
            vals = ", ".join(f"{r['density']:g}: {r['speedup_vs_torch']:.2f}x" for r in low)
            rows.append([f"spmm CSR {shape}: >= 2x faster than torch CSR @ dense at every density <= 0.2",
                         vals, "met" if ok else f"missed at {worst['density']:g} ({worst['speedup_vs_torch']:.2f}x)"])
    return _table(["target", "measured (median ratio in one run)", "status"], rows) if rows else "(no CSR spmm data)"


def _kernel_tables(recs: List[dict]) -> str:
    out = []
    keys = []
    for r in recs:
        k = (r["M"], r["K"], r["N"], r["format"], r["op"])
        if k not in keys:
            keys.append(k)
    for M, K, N, fmt, op in keys:
        rs = sorted((r for r in recs if (r["M"], r["K"], r["N"], r["format"], r["op"]) == (M, K, N, fmt, op)),
                    key=lambda r: -r["density"])
        tname = rs[0].get("torch_name")
        header = ["density", "nnz (weights)", "sparsestart ms", "GF/s eff.", "GF/s dense-eq.", "dense ms", "dense GF/s",
                  "x dense"]
        if tname:
            header += [f"{tname} ms", f"{tname} GF/s eff.", f"x {tname}"]
        header += ["op overhead us"]
        rows = []
        for r in rs:
            t = r["times"]
            row = [f"{r['density']:g}", str(r["nnz_elements"]), _ms(t["sparsestart"]["median"]),
                   _f(r["gflops_effective"], "{:.1f}"), _f(r["gflops_dense_equiv"], "{:.1f}"),
                   _ms(t["dense"]["median"]), _f(r["dense_gflops"], "{:.1f}"), _f(r["speedup_vs_dense"]) + "x"]
            if tname:
                row += [_ms(t[tname]["median"]) if tname in t else "–",
                        _f(r.get("torch_gflops_effective"), "{:.1f}"), _f(r.get("speedup_vs_torch")) + "x"
                        if "speedup_vs_torch" in r else "–"]
            row += [_f(r["op_overhead_us"], "{:.0f}")]
            rows.append(row)
        out.append(f"#### {op}, {fmt.upper()}, M x K x N = {M} x {K} x {N}\n\n" + _table(header, rows))
    return "\n\n".join(out)


def _fit_table(fits: List[dict], recs: List[dict]) -> str:
    order = list(dict.fromkeys((r["M"], r["K"], r["N"], r["format"], r["op"]) for r in recs))
    rank = {k: i for i, k in enumerate(order)}
    rows = []
    for f in sorted(fits, key=lambda f: (rank.get((f["M"], f["K"], f["N"], f["format"], f["op"]), len(rank)),
                                         f["impl"] != "sparsestart")):
        be = f["break_even_density_fit"]
        rows.append([f"{f['M']}x{f['K']}x{f['N']}", f["format"], f["op"], f["impl"],
                     _f(f["slope_ns_per_nnz"], "{:.3g}"), _f(f["slope_ns_per_nnz_per_n"], "{:.3g}"),
                     _f(f["intercept_us"], "{:.0f}"), _f(f["r2"], "{:.3f}"), _f(f["dense_ms"], "{:.2f}"),
                     ("> 1" if be is not None and be > 1 else _f(be, "{:.3f}")),
                     _f(f["largest_faster_density"], "{:.3g}")])
    return _table(["M x K x N", "format", "op", "impl", "slope ns/nnz", "ns/(nnz*N)", "intercept us", "R^2",
                   "dense ms", "break-even density (fit)", "largest measured density faster than dense"], rows)


def _layer_tables(recs: List[dict]) -> str:
    out = []
    for layer in dict.fromkeys(r["layer"] for r in recs):
        rs = [r for r in recs if r["layer"] == layer]
        rows = []
        for d in sorted({r["density"] for r in rs}, reverse=True):
            row = [f"{d:g}"]
            for p in ("forward", "forward+backward"):
                r = next((x for x in rs if x["density"] == d and x["pass"] == p), None)
                if r is None:
                    row += ["–"] * 5
                    continue
                t = r["times"]
                row += [_ms(t["sparse"]["median"]), _ms(t["dense"]["median"]), _ms(t["masked"]["median"]),
                        _f(r["speedup_vs_dense"]) + "x", _f(r["speedup_vs_masked"]) + "x"]
            rows.append(row)
        b = rs[0]["batch"]
        out.append(f"#### {layer}, batch {b}, {rs[0]['format'].upper()}\n\n" + _table(
            ["density", "fwd sparse ms", "fwd dense ms", "fwd masked ms", "fwd x dense", "fwd x masked",
             "fwd+bwd sparse ms", "fwd+bwd dense ms", "fwd+bwd masked ms", "fwd+bwd x dense", "fwd+bwd x masked"],
            rows))
    return "\n\n".join(out)


def _g(v) -> str:
    """Three significant digits, without exponent notation for large values."""
    return _f(v, "{:.0f}" if v is not None and abs(v) >= 1000 else "{:.3g}")


def _mib(b) -> str:
    return _f(None if b is None else b / 2**20, "{:.3g}" if b < 100 * 2**20 else "{:.0f}")


def _status(ok: bool, how: str = "") -> str:
    return "met" if ok else ("missed" + (f" ({how})" if how else ""))


def _layer_fit_table(recs: List[dict]) -> str:
    rows = []
    for f in fit.layer_fits(recs):
        rows.append([f["layer"], f["format"], f["pass"], _g(f["slope_ns_per_nnz"]), _g(f["intercept_ms"]), _f(f["r2"], "{:.3f}"), _f(f["dense_ms"], "{:.2f}"),
                     "> 1" if f["break_even_fit"] is not None and f["break_even_fit"] > 1
                     else _f(f["break_even_fit"], "{:.3g}"),
                     fit.format_break_even(f["break_even_measured"])])
    return _table(["layer", "format", "pass", "slope ns/nnz", "intercept ms", "R^2", "dense ms (median)",
                   "break-even density (fit)", "break-even density (measured, interpolated)"], rows)


def _setting(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join("x".join(map(str, x)) if isinstance(x, (list, tuple)) else f"{x:g}" if isinstance(x, float)
                        else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _runs_table(result: dict) -> str:
    rows = []
    for suite in ("kernels", "layers", "convalgo", "training", "algorithms", "sampling"):
        run = result.get(suite, {}).get("run")
        if run:
            settings = "; ".join(f"{k}={_setting(v)}" for k, v in run.get("settings", {}).items())
            rows.append([suite, f"`{run.get('command')}`", str(run.get("date")), str(run.get("threads")),
                         _f(run.get("seconds"), "{:.0f}"), _f(run.get("idle_at_start")),
                         _malloc(run.get("malloc")), settings or "–"])
    header = ["suite", "command", "date (UTC)", "threads", "seconds", "idle fraction at start", "malloc", "settings"]
    return _table(header, rows) if rows else ""


def _malloc(settings: Optional[dict]) -> str:
    """The allocator policy of a run (runs recorded before the policy was recorded used glibc's default)."""
    if not settings or settings.get("policy") == "default":
        return "glibc default"
    return "freed memory retained"


def _policy(r: dict) -> str:
    """The allocator a training record was measured under (records before the field: the run's policy)."""
    return _malloc({"policy": r["malloc"]}) if "malloc" in r else ""


def _first_policy(recs: List[dict]) -> List[dict]:
    """The records of the first allocator policy: memory and profiles do not depend on it."""
    first = recs[0].get("malloc") if recs else None
    return [r for r in recs if r.get("malloc") == first]


def _training_target(recs: List[dict]) -> List[List[str]]:
    """Rows of the MLP target of the issue "training step and memory" (TRAIN_TARGET)."""
    t = TRAIN_TARGET
    rows = []
    for r in recs:
        if r["model"] != t["model"] or r["density"] != t["density"]:
            continue
        under = f" ({_policy(r)})" if "malloc" in r else ""
        for base, v in (("dense", r["speedup_vs_dense"]), ("masked-dense", r["speedup_vs_masked"])):
            rows.append([f"{r['title']} ({r['distribution']}), density {r['density']:g}, batch {r['batch']}: "
                         f"training step >= {t['speedup']:g}x faster than {base}{under}", f"{v:.2f}x",
                         _status(v >= t["speedup"], f"by {(1 - v / t['speedup']) * 100:.0f}%")])
        if r.get("malloc") != recs[0].get("malloc"):
            continue  # the memory rows once: they do not depend on the allocator
        for opt in ("sgd_momentum", "adamw"):
            v = r["memory"]["sparse"][opt]["ratio_vs_dense"]
            rows.append([f"{r['title']} ({r['distribution']}), density {r['density']:g}: parameters + gradients + "
                         f"{'SGD momentum' if opt == 'sgd_momentum' else 'AdamW'} state (+ index) <= "
                         f"{t['memory_ratio']:g}x dense", f"{v:.3f}x", _status(v <= t["memory_ratio"])])
    return rows


# The ops of the layers themselves in a profiled step: the sparse kernels and the Python of their
# autograd functions (sparsestart::*, _<Op>Function[Backward]), and the dense kernels the sparse
# model's layers fall back to (conv_algorithm "dense", saturated classifiers) or the dense model runs.
DENSE_LAYER_OPS = {"aten::mkldnn_convolution", "aten::convolution_backward", "aten::addmm", "aten::mm",
                   "aten::im2col", "aten::col2im"}


def _is_layer_op(op: str) -> bool:
    return op.startswith("sparsestart::") or op in DENSE_LAYER_OPS or (op.startswith("_") and "Function" in op)


def layer_free_bound(r: dict) -> Optional[float]:
    """The step speedup over dense the sparse model would reach if its layers took no time: the dense step
    over the sparse step's time outside its layers' ops (share of the profiled step, from the ops above the
    profile's 1% floor, times the measured sparse median). None without a profile."""
    prof = (r.get("profile") or {}).get("sparse")
    if not prof or not prof.get("total_ms"):
        return None
    layers = sum(o["self_ms"] for o in prof["ops"] if _is_layer_op(o["op"]))
    rest = (prof["total_ms"] - layers) / prof["total_ms"] * r["times"]["sparse"]["median"]
    return r["times"]["dense"]["median"] / rest if rest > 0 else None


def _step_targets(recs: List[dict]) -> List[List[str]]:
    """Rows of the per-model step targets (STEP_TARGETS), on the records measured under glibc's default malloc;
    a missed target says how far free layers would go (layer_free_bound)."""
    rows = []
    for r in recs:
        goal = STEP_TARGETS.get(r["model"], {}).get(r["density"])
        if goal is None or r.get("malloc") != "default":
            continue
        v = r["speedup_vs_dense"]
        bound = layer_free_bound(r)
        why = f"by {(1 - v / goal) * 100:.0f}%"
        if bound is not None:
            why += f"; with layers taking no time the rest of the sparse step allows {bound:.2f}x"
        rows.append([f"{r['title']} ({r['distribution']}), density {r['density']:g}, batch {r['batch']}, glibc "
                     f"default malloc: training step >= {goal:g}x faster than dense", f"{v:.2f}x",
                     _status(v >= goal, why)])
    return rows


def _training_tables(recs: List[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in recs):
        rs = [r for r in recs if r["model"] == model]
        rows, mem_rows = [], []
        policies = any("malloc" in r for r in rs)
        for r in rs:
            t, ph = r["times"], r["phases"]
            row = [r["distribution"], f"{r['density']:g}", _f(r["density_actual"], "{:.4f}")]
            row += [_policy(r)] if policies else []
            row += [_ms(t[k]["median"]) for k in ("sparse", "dense", "masked")]
            row += [_f(r["speedup_vs_dense"]) + "x", _f(r["speedup_vs_masked"]) + "x"]
            row += [" / ".join(_ms(ph[k][p]) for p in ("forward", "backward", "optimizer"))
                    for k in ("sparse", "dense", "masked")]
            rows.append(row)
        for r in _first_policy(rs):
            for k in ("sparse", "dense", "masked"):
                sg, aw = r["memory"][k]["sgd_momentum"], r["memory"][k]["adamw"]
                mem_rows.append([r["distribution"], f"{r['density']:g}", k, _mib(sg["params"]), _mib(sg["grads"]),
                                 _mib(sg["optimizer_state"]), _mib(aw["optimizer_state"]), _mib(sg["index"]),
                                 _mib(sg["mask"]), _mib(sg["other_buffers"]), _mib(sg["total"]),
                                 _f(sg["ratio_vs_dense"], "{:.3f}") + "x", _mib(aw["total"]),
                                 _f(aw["ratio_vs_dense"], "{:.3f}") + "x"])
        r0 = rs[0]
        out.append(f"#### {r0['title']}, batch {r0['batch']}: time per training step\n\n" + _table(
            ["distribution", "density", "density (actual)"] + ["malloc"] * policies + [
             "sparse ms", "dense ms", "masked ms", "x dense",
             "x masked", "sparse fwd / bwd / opt ms", "dense fwd / bwd / opt ms", "masked fwd / bwd / opt ms"], rows))
        out.append(f"#### {r0['title']}: bytes kept between steps (MiB)\n\n" + _table(
            ["distribution", "density", "model", "params", "grads", "SGD momentum", "AdamW state", "index", "mask",
             "other buffers", "total (SGD)", "x dense", "total (AdamW)", "x dense"], mem_rows))
        for r in _first_policy(rs):
            out.append(f"#### {r['title']}, {r['distribution']} {r['density']:g}: where one step's time goes"
                       f"{f' ({_policy(r)})' if policies else ''}\n\n"
                       + _profile_table(r["profile"]))
        dens = ", ".join(f"{n} {d:.3g}" for n, d in rs[0]["layer_densities"].items())
        out.append(f"Layer densities at {rs[0]['distribution']} {rs[0]['density']:g}: {dens}.")
    return "\n\n".join(out)


def _profile_table(prof: dict, top: int = 8) -> str:
    """Self CPU ms of the ops that are among the ``top`` of any model in one profiled step."""
    models = list(prof)
    by = {k: {o["op"]: o for o in prof[k]["ops"]} for k in models}
    ops = list(dict.fromkeys(o["op"] for k in models for o in prof[k]["ops"][:top]))
    ops.sort(key=lambda op: -max(by[k].get(op, {}).get("self_ms", 0.0) for k in models))
    rows = [[f"`{op}`"] + [_f(by[k][op]["self_ms"], "{:.2f}") + f" ({by[k][op]['calls']})" if op in by[k] else "–"
                           for k in models] for op in ops]
    rows.append(["all ops (profiled step)"] + [_f(prof[k]["total_ms"], "{:.2f}") for k in models])
    return _table(["op (self CPU time)"] + [f"{k} ms (calls)" for k in models], rows)


def _algorithm_table(recs: List[dict]) -> str:
    rows = []
    for r in recs:
        row = [r["title"], str(r["batch"]), r["distribution"], f"{r['density']:g}", str(r["nnz"]),
               _f(r["iteration_ms"], "{:.2f}")]
        for k in ("rigl", "set"):
            a = r[k]
            row += [_f(a["update_cost_ms"], "{:.2f}"), _f(a["step_call_ms"], "{:.2f}"),
                    _f(a["fraction"] * 100, "{:.2f}") + "%", _status(a["fraction"] <= ALGO_TARGET)]
        rows.append(row)
    dt = recs[0]["update_interval"]
    return _table(["model", "batch", "distribution", "density", "nnz", "iteration ms (no update)",
                   "RigL update ms", "RigL step() ms", f"RigL / ({dt} steps)", f"<= {ALGO_TARGET * 100:g}%",
                   "SET update ms", "SET step() ms", f"SET / ({dt} steps)", f"<= {ALGO_TARGET * 100:g}%"], rows)


def _sampling_table(recs: List[dict]) -> str:
    rows = []
    for r in recs:
        sec, peak = r["seconds"], r["peak_bytes"]
        rows.append([r["variant"], f"{r['M']}x{r['K']}", f"{r['density']:g}", str(r["nnz_elements"][0]),
                     _f(sec["median"], "{:.2f}"), f"{sec['min']:.2f}–{sec['q3']:.2f}" if r["rounds"] > 1 else "–",
                     _mib(peak["median"]), _mib(r["result_bytes"]),
                     _status(sec["median"] < SAMPLING_TARGET["seconds"]),
                     _status(peak["median"] < SAMPLING_TARGET["bytes"]),
                     str(r["rounds"])])
    return _table(["variant", "M x K", "density", "nnz (weights)", "seconds (median)", "min–q3", "peak MiB",
                   "result MiB", f"< {SAMPLING_TARGET['seconds']:g} s", f"< {SAMPLING_TARGET['bytes'] / 1e9:g} GB",
                   "processes"], rows)


def _new_suites(result: dict) -> List[str]:
    parts = []
    tr = result.get("training", {}).get("records")
    if tr:
        r0 = tr[0]
        parts += ["## Training step", "",
                  "One step = `zero_grad(set_to_none=True)`, forward, cross-entropy, backward, "
                  f"`optimizer.step()` with `{r0['optimizer']}`, on a fixed random batch (sizes in the headings), "
                  "float32. `sparse` is the model after `sparsestart.sparsify(model, density, distribution)` "
                  "(CSR SparseLinear/SparseConv2d; the distribution is sparsify's default unless stated). "
                  "`dense` is the torch model (nn.Linear/nn.Conv2d, every weight trained). `masked` is the papers' "
                  "way: each Linear/Conv2d weight is a dense parameter seen through a fixed float 0/1 mask (a torch "
                  "parametrization, so forward computes with `weight * mask` and autograd masks the gradient); the "
                  "optimizer updates the whole dense tensor and the mask is re-applied to the weight after every "
                  "optimizer step, as sparselearning's `apply_mask` does. All three start from the same numbers "
                  "(the dense model holds the kept weights, zeros elsewhere); before timing, one step of each is "
                  "checked: equal losses, masked weight and gradient zero outside the mask, and, on float64 copies of "
                  "the sparse and masked models, equal weight and bias gradients at the kept positions and equal "
                  "weights after the optimizer step (float64 because in float32 a pre-activation within rounding "
                  "error of zero can land on the other side of a ReLU in the two models, and through BatchNorm that "
                  "one element changes whole gradients of earlier layers). "
                  "Steps of the three are timed interleaved (medians); the fwd / bwd / opt columns are medians of the "
                  "same timed calls split at the end of forward (zero_grad included) and of backward (opt includes "
                  "the re-masking).", "",
                  "Memory counts the bytes of the tensors a training run keeps between steps (activations not "
                  "included): parameters (sparse: values and biases; masked: the dense weight), gradients, "
                  "optimizer state (SGD momentum of the timed run; AdamW: after one AdamW step), the sparse index "
                  "(rowptr, col, slot and the CSC colptr, row, slot_t), the masks (float32, as the papers keep them) "
                  "and other buffers (BatchNorm statistics). The profiled step is one extra step of each model under "
                  "`torch.profiler` (self CPU time per op, number of calls in brackets).", ""]
        target = _training_target(tr) + _step_targets(tr)
        if target:
            parts += ["### Targets", "", _table(["target", "measured", "status"], target), ""]
        parts += [_training_tables(tr), ""]
    ca = result.get("convalgo", {})
    if ca.get("records"):
        from . import convalgo
        parts += ["## Convolution algorithms per layer", "",
                  f"Every `SparseConv2d.conv_algorithm` on each convolution of {ca.get('model')} after "
                  f"`sparsify(model, density, {ca.get('distribution')!r})`, with the input the layer gets in the "
                  "model's forward pass, forward+backward, against the dense nn.Conv2d with the same kept weights "
                  "(interleaved, medians; each algorithm checked against it first). `direct`: the direct sparse "
                  "convolution; `unfold`: im2col + spmm; `dense`: the stored weights scattered into a transient "
                  "dense kernel for torch's convolution. `auto picks` is what `conv_algorithm=\"auto\"` chooses "
                  "by timing the candidates itself (sparsestart.nn.autotune; marked `(rule)` where the run had "
                  "tuning off or predates the autotuner, and \"auto\" applied the threshold rule), `rule picks` "
                  "what the threshold rule (`conv_algorithm=\"heuristic\"`, thresholds in "
                  "sparsestart/nn/conv.py) chooses; `fastest / auto time` is 1.00 when `auto picks` is the "
                  "fastest.",
                  "", convalgo.table(ca), ""]
    al = result.get("algorithms", {}).get("records")
    if al:
        r0 = al[0]
        parts += ["## Structure updates (RigL, SET)", "",
                  "Three copies of the same sparse model (sparsify, CSR), each with its own SGD-momentum optimizer: "
                  "`idle` has RigL with an update interval longer than the run (every `algo.step()` is a non-update "
                  "step, the capture hooks installed), `rigl` has RigL(update_every=1) and `set` SET(update_every=1), "
                  f"so every step of those is an update with drop fraction {r0['drop_fraction_used']:g} (alpha at "
                  "the start of training: the largest updates of a run). A timed call is a whole iteration "
                  "(zero_grad, forward, loss, backward, optimizer.step(), algo.step()), interleaved over the three. "
                  "Update cost = median iteration with an update - median idle iteration (it includes RigL's capture "
                  "of each layer's input and output gradient in forward/backward and its chunked dense gradient); "
                  "`step()` = the median of `algo.step()` alone. The fraction is the update cost over the training "
                  f"between two updates at ΔT = {r0['update_interval']}: ΔT x the median idle iteration. Before "
                  "timing, two iterations check that every update kept each layer's nnz, changed the structure and "
                  "left a valid index, and that the idle structure did not change.", "",
                  _algorithm_table(al), ""]
    sa = result.get("sampling", {}).get("records")
    if sa:
        parts += ["## ER sampling of one large layer", "",
                  "`indices-*`: `sparsestart.init.er_indices((M, K), p)` (int64 rows and cols); `csr-*` / `bsr16-*`: "
                  "the whole layer `sparsestart.nn.SparseLinear(K, M, density=p)` (index with its CSC view, values "
                  "initialised as torch initialises nn.Linear, bias; BSR with 16 x 16 blocks, p of the blocks). "
                  "`exact`: exactly round(p M K) positions, without replacement; `bernoulli` (exact=False): each "
                  "position kept with probability p. Each sample is a fresh process (import, then reset of the "
                  "kernel's peak-RSS counter, then the timed call); peak = VmHWM after the call - VmRSS before it, "
                  "so it includes temporaries and allocator slack; result = bytes of the tensors returned. After "
                  "the measurement each sample is checked (count, uniqueness, range, `validate()`). `sparsify` is "
                  "not measured: it converts an existing dense model, so a 32768 x 32768 nn.Linear would first hold "
                  "its 4 GiB dense weight.", "",
                  _sampling_table(sa), ""]
    return parts


#: How-to of `make bench-regress` (pytest-benchmark), part of the generated page so that a re-render keeps it.
REGRESSION_TRACKING = [
    "## Regression tracking: `make bench-regress`", "",
    "`tests/bench/test_regress.py` holds pytest-benchmark cases, sparse and dense torch side by side in one group "
    "each, on one thread: `spmm`, `spmm_t`, `sddmm` through `torch.ops.sparsestart` (1024 x 1024 at density 0.1, "
    "N = 128) against `torch.mm`; SparseLinear 1024->1024 (batch 128) and SparseConv2d 3x3 64->64 at 16x16 (batch 16) "
    "forward+backward against nn.Linear / nn.Conv2d with the same masked weights; one SGD training step of an MLP "
    "784-512-512-10, ERK 0.1 against dense.", "",
    "- `make bench-regress`: the first time, or with `BASELINE=1`, times the cases and saves a baseline "
    "(`.benchmarks/<machine>/NNNN_baseline.json`, pytest-benchmark's storage: machine-specific, not committed); "
    "afterwards it times them again, compares against the newest baseline and fails when a case's minimum is more "
    "than 25% slower (`REGRESS_FAIL=N`, `REGRESS_STAT=median`). About 1 to 1.5 minutes on 2 cores.",
    "- Noise: the cases run on one thread and are timed in CPU time of the process (`time.process_time`), so that "
    "time slices taken by other jobs do not count. On the 2-core machine shared with other jobs (load average 5), "
    "unchanged code moved between runs by up to 16% in the minimum and 30% in the median (wall-clock medians: up to "
    "146%), hence the minimum at 25%. On a quiet machine `REGRESS_FAIL=10` catches smaller slowdowns. Time the "
    "baseline and the change under the same conditions (machine, load, build), and rerun before trusting a failure "
    "seen on a busy machine.",
    "- `make test` runs the same file with benchmarks disabled (the default set in `tests/conftest.py`; "
    "`--benchmark-enable` times them): each case runs once and checks its result against a float64 reference.",
    "- `python -m bench` (below) stays the full measurement; `make bench-regress` only guards against slowdowns.", "",
]


def render(result: dict, source: Optional[str] = None) -> str:
    meta = result.get("meta", {})
    parts = ["# CPU benchmarks", ""]
    src = f"`{Path(source).relative_to(ROOT)}`" if source and Path(source).is_relative_to(ROOT) else f"`{source}`"
    parts += [f"Generated by `python -m bench.report` from {src} (written by `{meta.get('command', 'python -m bench')}`); "
              "do not edit by hand. Reproduce with `python -m bench` from the repository root "
              "(`python -m bench --quick` for a smoke run).", ""]
    parts += REGRESSION_TRACKING
    runs = _runs_table(result)
    parts += ["## Machine", "",
              _table(["", ""], [
                  ["CPU", str(meta.get("cpu"))], ["flags", ", ".join(meta.get("cpu_flags", []))],
                  ["logical CPUs", str(meta.get("logical_cpus"))], ["threads (torch.set_num_threads)", str(meta.get("threads"))],
                  ["torch", str(meta.get("torch"))], ["date (UTC)", str(meta.get("date"))],
                  ["load average (1, 5, 15 min) at start / end", f"{_load(meta.get('loadavg_start'))} / {_load(meta.get('loadavg_end'))}"],
                  ["idle fraction at start", _f(meta.get("idle_at_start"))],
              ] + ([] if runs else [  # result files from before per-suite run records
                  ["rounds (kernels / layers)", f"{meta.get('rounds')} / {meta.get('layer_rounds')}"]]) + [
                  ["portable build (no -march=native)", str(meta.get("portable_build"))],
                  ["malloc (this run)", _malloc(meta.get("malloc"))],
              ]), ""]
    if runs:
        parts += ["Suites, as last run (a result file keeps the suites a later run did not repeat):", "", runs, ""]
    if meta.get("merge_warning"):
        parts += [f"**Warning:** {meta['merge_warning']}.", ""]
    parts += ["## How to read this", "",
              "- Times are medians over interleaved rounds (every round runs every implementation of a problem once, "
              "in rotating order), in one process, float32, after a correctness check against the float64 "
              "reference. The idle fraction of the machine just before each problem is in the JSON (`idle_before`).",
              "- Allocator: unless run with `--default-malloc`, the benchmark process keeps freed memory "
              "(`sparsestart.runtime.retain_freed_memory`, glibc mallopt; `sparsestart train` does the same), for "
              "sparse, dense and masked alike. With glibc's default every fresh multi-MB buffer may be page-faulted "
              "afresh, depending on what the other implementations allocated before; `python -m bench --suites "
              "layers --default-malloc --name cpu-default-malloc` measures that (a run is in "
              "`bench/results/cpu-default-malloc.json`). The training suite measures every step under both "
              "policies (the other one in a child process; column `malloc`), and the step targets of conv nets "
              "are judged under glibc's default, the setting a library user's own script has.",
              "- `sparsestart` is the native op (`torch.ops.sparsestart._native_*`); `op overhead` is the extra time of "
              "the public `torch.ops.sparsestart.spmm/spmm_t/sddmm` (Python checks, backend registry).",
              "- GF/s eff. = 2 * nnz * N / t (useful work, nnz in weights); GF/s dense-eq. = 2 * M * K * N / t; "
              "x dense = dense time / sparse time (torch.mm: W @ x, W^T @ dy, dy @ x^T).",
              "- spmm_t against torch uses a transposed CSR/BSR copy of W; sddmm against torch uses "
              "`torch.sparse.sampled_addmm` (CSR only on CPU).",
              "- Fits: least squares of the sparse time against nnz over the densities; break-even density = "
              "where the fitted line reaches the dense time.", ""]
    parts += ["## The kernels in one paragraph", "",
              "csrc/cpu (AVX-512 / AVX2 / scalar chosen at compile time, `-march=native` unless "
              "`SPARSESTART_PORTABLE=1`): rows are split across threads by nonzeros (binary search in the prefix "
              "of rowptr); each CSR output row keeps a tile of up to 256 floats in 16 zmm registers for the whole row "
              "and does one broadcast-FMA per gathered input row segment; values are gathered per chunk so the "
              "transposed (CSC) walk reads them sequentially; for N wider than a tile the input panel is packed "
              "contiguously and reused by all rows; when that panel is larger than half the L2 cache (as reported "
              "by the C library, or `SPARSESTART_L2_BYTES`), CSR SpMM and SDDMM run K panel by panel so the "
              "gathered rows come from L2 (csrc/cpu/panels.h; the same bits as without). The direct convolution "
              "runs the same tiles along flattened padded planes whose rows and planes share their zero margins, "
              "its entries grouped by input-channel blocks whose window fits L1, the bias added as the output is "
              "written. BSR keeps an 8-row x 48-column register tile over all blocks "
              "of a block row. SDDMM keeps a tile of dY's row in registers and computes 8 gathered dot products "
              "at once with one transposed reduction. Every output element has one writer and a summation order "
              "that depends on the shape only, so results are bitwise reproducible for any thread count.", ""]
    kern = result.get("kernels", {})
    recs = kern.get("records", [])
    if recs:
        parts += ["## Targets", "",
                  "The issue's targets (2 threads, float32, ratios from one run), evaluated on the linear-layer "
                  "shapes. The unfolded-convolution shapes (64 x 576 x 65536 = 3x3 conv 64->64 at 32x32, batch 64; "
                  "256 x 2304 x 4096 = 3x3 conv 256->256 at 8x8, batch 64) are in the tables below: at low "
                  "density they are bound by streaming the unfolded input from memory.", "",
                  _targets(recs), ""]
        parts += ["## Kernels", "", _kernel_tables(recs), ""]
        oh = kern.get("call_overhead")
        if oh:
            parts += ["Fixed cost per call (a 64 x 64 x 16 spmm, ~1 us of kernel work): native op "
                      f"{oh['native']['median_us']:.1f} us, public `torch.ops.sparsestart.spmm` "
                      f"{oh['public_op']['median_us']:.1f} us (medians). The `op overhead` columns above are "
                      "differences of two medians and are noisy for long calls.", ""]
        parts += ["## Time against nnz, break-even density", "", _fit_table(kern.get("fits", []), recs), ""]
    lay = result.get("layers", {})
    if lay.get("records"):
        parts += ["## Layers", "",
                  "`forward` runs under `torch.no_grad()`; `forward+backward` computes weight, bias and input "
                  "gradients. `masked` is the dense layer computing with `weight * mask` (how the papers' code "
                  "trains). SparseConv2d with a CSR weight and stride 1 runs the direct sparse convolution ops.", "",
                  _layer_tables(lay["records"]), ""]
        parts += ["### Layers: time against nnz, break-even density", "",
                  "Least squares of the sparse layer time against nnz over the measured densities (slope, "
                  "intercept, R^2); break-even density (fit) = where that line reaches the median dense time; "
                  "break-even density (measured) = walking up from the lowest density, where sparse first turns "
                  "slower than dense (t_sparse / t_dense crossing 1, interpolated linearly in density between the two "
                  "neighbouring densities); `> d` = faster at every measured density up to d, `< d` = slower already "
                  "at the lowest measured density d.", "",
                  _layer_fit_table(lay["records"]), ""]
    elif "skipped" in lay:
        parts += ["## Layers", "", f"Skipped: {lay['skipped']}", ""]
    parts += _new_suites(result)
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="?", default=str(ROOT / "bench" / "results" / "cpu.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="'-' for stdout")
    args = p.parse_args(argv)
    result = json.loads(Path(args.json).read_text())
    md = render(result, source=str(Path(args.json).resolve()))
    if args.out == "-":
        print(md)
    else:
        from .gpu_report import write_cpu_docs

        write_cpu_docs(Path(args.out), md)  # keeps the GPU sections of the file
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
