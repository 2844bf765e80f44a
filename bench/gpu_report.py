"""Markdown of the GPU suites (bench/gpu_suites.py), kept as one section per device in docs/benchmarks.md.

    python -m bench.gpu_report bench/results/gpu-nvidia-h200.json           # (re)write its section
    python -m bench.gpu_report bench/results/gpu-nvidia-h200.json --out -   # print it

A section lies between ``<!-- gpu-benchmarks:<device> begin ... -->`` and ``<!-- gpu-benchmarks:<device> end -->``;
writing one replaces that device's section (or appends it) and leaves everything else. The CPU report
(bench/report.py, ``python -m bench``) keeps the GPU sections of the file it rewrites.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- gpu-benchmarks:(?P<slug>[a-z0-9-]+) begin.*?<!-- gpu-benchmarks:(?P=slug) end -->\n?",
                    re.S)
# Issue 13's training-step targets (measured on one H100/H200; reported, never asserted).
TRAIN_TARGETS = {"density": 0.1, "precision": "bf16", "speedup": {"mlp": 3.0, "vgg11": 1.5}, "memory_ratio": 0.5}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _f(v, fmt="{:.2f}", none="–"):
    if v is None or (isinstance(v, float) and v != v):
        return none
    return fmt.format(v)


def _ms(s) -> str:
    if s is None:
        return "–"
    v = s * 1e3
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.0f}" if b >= 100 * 2**20 else f"{b / 2**20:.3g}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _med(t: dict, k: str, where: str = "device"):
    return t.get(k, {}).get(where, {}).get("median")


def _check_cell(c: dict) -> str:
    dt = c.get("dtype")
    dts = c.get("sparse_layer_dtypes")
    where = ",".join(dts) if dts else dt
    return f"{c['rel_error']:.1e} ({where})" + ("" if c.get("ok") else " **failed**")


def _targets(recs: List[dict]) -> str:
    t = TRAIN_TARGETS
    rows = []
    for r in recs:
        goal = t["speedup"].get(r["model"])
        if goal is None or r["density"] != t["density"] or r["precision"] != t["precision"]:
            continue
        v = r["speedup_vs_dense"]
        rows.append([f"{r['title']}, {r['format'].upper()}, {r['distribution']} {r['density']:g}, "
                     f"{r['precision']}, batch {r['batch']}: step >= {goal:g}x faster than dense",
                     f"{v:.2f}x", "met" if v >= goal else "missed"])
        m = r.get("peak_memory_ratio_vs_dense")
        if m is not None:
            rows.append([f"{r['title']}, {r['format'].upper()}, {r['precision']}: peak memory of a step "
                         f"<= {t['memory_ratio']:g}x dense", f"{m:.2f}x",
                         "met" if m <= t["memory_ratio"] else "missed"])
    return _table(["target", "measured", "status"], rows) if rows else ""


def _training(recs: List[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in recs):
        rs = [r for r in recs if r["model"] == model]
        rows = []
        for r in rs:
            t, mem = r["times"], r.get("memory", {})
            rows.append([r["format"], r["precision"], f"{r['density']:g}", _f(r["density_actual"], "{:.4f}"),
                         _ms(_med(t, "sparse")), _ms(_med(t, "dense")), _ms(_med(t, "masked")),
                         _f(r["speedup_vs_dense"]) + "x", _f(r.get("speedup_vs_masked")) + "x"
                         if r.get("speedup_vs_masked") else "–",
                         f"{_ms(_med(t, 'sparse', 'host'))} / {_ms(_med(t, 'dense', 'host'))}",
                         f"{_mib(mem.get('sparse', {}).get('training_peak'))} / "
                         f"{_mib(mem.get('dense', {}).get('training_peak'))}",
                         _f(r["peak_memory_ratio_vs_dense"]) + "x" if r.get("peak_memory_ratio_vs_dense") else "–",
                         _check_cell(r["check"])])
        r0 = rs[0]
        out.append(f"#### {r0['title']}, batch {r0['batch']}\n\n" + _table(
            ["format", "precision", "density", "density (actual)", "sparse ms", "dense ms", "masked ms", "x dense",
             "x masked", "host ms sparse / dense", "peak MiB sparse / dense", "peak x dense",
             "check: rel. error (sparse layer dtype)"], rows))
        bsr = next((r for r in rs if r["format"] != "csr"), None)
        if bsr:
            csr = [n for n, f in bsr["layer_formats"].items() if f == "csr"]
            if csr:
                out.append(f"In the {bsr['format'].upper()} model these layers stay CSR (their matrix is not a "
                           f"multiple of the block): {', '.join(csr)}.")
    return "\n\n".join(out)


def _layers(recs: List[dict]) -> str:
    out = []
    for layer in dict.fromkeys(r["layer"] for r in recs):
        rs = [r for r in recs if r["layer"] == layer]
        rows = []
        keys = list(dict.fromkeys((r["format"], r["precision"], r["density"]) for r in rs))
        for fmt, prec, d in keys:
            row = [fmt, prec, f"{d:g}"]
            check = None
            for p in ("forward", "forward+backward"):
                r = next((x for x in rs if (x["format"], x["precision"], x["density"], x["pass"]) == (fmt, prec, d, p)),
                         None)
                if r is None:
                    row += ["–"] * 5
                    continue
                check = r["check"]
                t = r["times"]
                row += [_ms(_med(t, "sparse")), _ms(_med(t, "dense")), _ms(_med(t, "masked")),
                        _f(r["speedup_vs_dense"]) + "x", _f(r["speedup_vs_masked"]) + "x"]
            row.append(_check_cell(check) if check else "–")
            rows.append(row)
        out.append(f"#### {layer}, batch {rs[0]['batch']}\n\n" + _table(
            ["format", "precision", "density", "fwd sparse ms", "fwd dense ms", "fwd masked ms", "fwd x dense",
             "fwd x masked", "fwd+bwd sparse ms", "fwd+bwd dense ms", "fwd+bwd masked ms", "fwd+bwd x dense",
             "fwd+bwd x masked", "check: rel. error (output dtype)"], rows))
    return "\n\n".join(out)


def _overhead(recs: List[dict]) -> str:
    rows = []
    for r in recs:
        for op, impls in r["ops"].items():
            for name, v in impls.items():
                rows.append([r["format"], r["precision"], "x".join(map(str, r["shape"])), op, name,
                             _f(v["host_us"], "{:.1f}"), _f(v["device_us"], "{:.1f}")])
    return _table(["format", "precision", "M x K x N", "op", "implementation", "host us / call", "device us / call"],
                  rows)


def _algorithms(recs: List[dict]) -> str:
    rows = []
    for r in recs:
        row = [r["title"], str(r["batch"]), r["format"], r["precision"], f"{r['density']:g}", str(r["nnz"]),
               _f(r["iteration_ms"], "{:.3f}")]
        for k in ("rigl", "set"):
            a = r[k]
            row += [_f(a["update_cost_ms"], "{:.3f}"), _f(a["step_call_ms"], "{:.3f}"), _f(a["fraction"] * 100) + "%"]
        rows.append(row)
    dt = recs[0]["update_interval"]
    return _table(["model", "batch", "format", "precision", "density", "nnz", "iteration ms (no update)",
                   "RigL update ms", "RigL step() ms", f"RigL / ({dt} steps)", "SET update ms", "SET step() ms",
                   f"SET / ({dt} steps)"], rows)


def _errors(result: dict) -> str:
    rows = []
    for suite in ("layers", "training", "algorithms"):
        for e in result.get(suite, {}).get("errors", []):
            case = ", ".join(f"{k}={v}" for k, v in e.items()
                             if k not in ("status", "error", "traceback", "oom", "seconds"))
            msg = (e.get("error") or "").splitlines()[0] if e.get("error") else ""
            msg = msg.replace("|", "\\|")
            rows.append([suite, case, e.get("status", "error"), (msg[:300] + "…") if len(msg) > 300 else msg])
    return _table(["suite", "case", "status", "error (first line; full message and traceback in the JSON)"],
                  rows) if rows else ""


def render(result: dict, source: Optional[str] = None) -> str:
    meta = result.get("meta", {})
    name = meta.get("device", "unknown device")
    s = _slug(name)
    src = source
    if source:
        p = Path(source).resolve()
        src = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else source
    ps = meta.get("precision_settings", {})
    parts = [f"<!-- gpu-benchmarks:{s} begin: generated by `python -m bench --device cuda` (re-render: "
             f"`python -m bench.gpu_report {src}`); do not edit by hand -->", "",
             f"# GPU benchmarks: {name}", "",
             f"Generated from `{src}`, written by `{meta.get('command')}`"
             + (" (**quick run**: few configurations and rounds, Triton autotune off unless stated)"
                if meta.get("quick") else "") + ".", ""]
    machine = [["device", f"{name} (compute capability {meta.get('capability', '–')}, "
                          f"{_mib(meta.get('total_memory'))} MiB)"],
               ["torch / CUDA / cuDNN / triton", f"{meta.get('torch')} / {meta.get('cuda')} / {meta.get('cudnn')} / "
                                                 f"{meta.get('triton')}"],
               ["sparsestart CUDA extension / triton backend", f"{meta.get('cuda_extension')} / "
                                                               f"{meta.get('triton_available')}"],
               ["Triton autotune", str(meta.get("triton_autotune"))],
               ["fp32", "IEEE on both sides: cuda.matmul.allow_tf32 = "
                        f"{ps.get('cuda_matmul_allow_tf32')}, cudnn.allow_tf32 = {ps.get('cudnn_allow_tf32')}, "
                        f"float32 matmul precision {ps.get('float32_matmul_precision')}; cudnn.benchmark = "
                        f"{ps.get('cudnn_benchmark')}"
                        + (f"; fp32_precision matmul / cudnn conv = {ps.get('cuda_matmul_fp32_precision')} / "
                           f"{ps.get('cudnn_conv_fp32_precision')}" if "cuda_matmul_fp32_precision" in ps else "")],
               ["date (UTC) / seconds", f"{meta.get('date')} / {_f(meta.get('seconds'), '{:.0f}')}"],
               ["host CPU", f"{meta.get('cpu')} ({meta.get('logical_cpus')} logical)"]]
    parts += ["## Machine", "", _table(["", ""], machine), ""]
    if meta.get("merge_warning"):
        parts += [f"**Warning:** {meta['merge_warning']}.", ""]
    parts += ["How to read this: times are medians over interleaved rounds of CUDA-event timings, each call started "
              "on an idle device (`device`); `host` is the CPU time to issue the same call. `fp32` is IEEE fp32 "
              "(no TF32) on both sides; `bf16` is `torch.autocast(\"cuda\", torch.bfloat16)` around forward and loss "
              "with fp32 master weights, on both sides. `dense` is the torch model or layer holding the kept weights "
              "(cuBLAS/cuDNN); `masked` computes with `weight * mask` as the papers' code trains. Peak memory of a "
              "step = bytes kept between steps (parameters, optimizer state, index, buffers) + "
              "`torch.cuda.max_memory_allocated` above the memory allocated before the step (activations, "
              "gradients, workspaces). The check compares the sparse output with the fp32 dense result (bound: "
              f"fp32 1e-4, bf16 3e-2, or 3x the error of the dense model in the same precision); its dtype column "
              "shows the dtype the sparse layers produced (float32 under bf16 autocast means the sparse ops ran in "
              "fp32). Details: bench/gpu_suites.py.", ""]
    tr = result.get("training", {}).get("records", [])
    if tr:
        target = _targets(tr)
        parts += ["## Training step", "",
                  "One step = `zero_grad(set_to_none=True)`, forward, cross-entropy, backward, "
                  f"`{tr[0]['optimizer']}`, on a fixed random batch; `sparsify(model, density, "
                  f"{tr[0]['distribution']!r})`.", ""]
        if target:
            parts += ["### Targets (issue 13)", "", target, ""]
        parts += [_training(tr), ""]
    lay = result.get("layers", {}).get("records", [])
    layer_recs = [r for r in lay if r.get("kind") != "op_overhead"]
    over = [r for r in lay if r.get("kind") == "op_overhead"]
    if layer_recs:
        parts += ["## Layers", "",
                  "`forward` under `torch.no_grad()`; `forward+backward` computes weight, bias and input gradients "
                  "from a fixed output gradient.", "", _layers(layer_recs), ""]
    if over:
        parts += ["## Per-op host overhead", "",
                  f"Time per call of {over[0].get('calls', 50)} calls issued back to back (median of "
                  f"{over[0].get('rounds', 7)} bursts) on a small layer at density 0.1: the public op "
                  "(`torch.ops.sparsestart.*`: checks, backend choice, dispatch), the kernel of "
                  "the backend the registry picks called directly, and `torch.mm` on the same shapes; `layer "
                  "forward` is `SparseLinear` against `nn.Linear` under `no_grad` (batch-major input).", "",
                  _overhead(over), ""]
    al = result.get("algorithms", {}).get("records", [])
    if al:
        parts += ["## Structure updates (RigL, SET)", "",
                  "As the CPU suite: update cost = median iteration with an update - median idle iteration "
                  f"(drop fraction {al[0]['drop_fraction_used']:g}); the fraction is that over ΔT = "
                  f"{al[0]['update_interval']} idle iterations.", "", _algorithms(al), ""]
    err = _errors(result)
    if err:
        parts += ["## Failed or skipped cases", "", err, ""]
    parts.append(f"<!-- gpu-benchmarks:{s} end -->")
    return "\n".join(parts) + "\n"


def gpu_blocks(text: str) -> List[str]:
    """The GPU sections of a markdown report, in order."""
    return [m.group(0) for m in _BLOCK.finditer(text)]


def splice(text: str, block: str) -> str:
    """``text`` with the section of ``block``'s device replaced by ``block`` (appended when absent)."""
    s = _BLOCK.match(block).group("slug")
    for m in _BLOCK.finditer(text):
        if m.group("slug") == s:
            return text[:m.start()] + block + text[m.end():]
    return text.rstrip("\n") + "\n\n" + block if text.strip() else block


def update_docs(path: Path, result: dict, source: Optional[str] = None) -> str:
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    new = splice(text, render(result, source))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    return new


def write_cpu_docs(path: Path, cpu_md: str) -> None:
    """Write the CPU report ``cpu_md`` to ``path``, keeping the GPU sections the file has."""
    path = Path(path)
    blocks = gpu_blocks(path.read_text()) if path.exists() else []
    text = cpu_md
    for b in blocks:
        text = splice(text, b)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="'-' for stdout")
    args = p.parse_args(argv)
    result = json.loads(Path(args.json).read_text())
    if args.out == "-":
        print(render(result, source=args.json))
    else:
        update_docs(Path(args.out), result, source=args.json)
        print(f"wrote the {result['meta'].get('device')} section of {args.out}")


if __name__ == "__main__":
    main()
