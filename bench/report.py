"""Render benchmark JSON (bench/results/*.json) as the markdown report docs/benchmarks.md.

    python -m bench.report                                  # bench/results/cpu.json -> docs/benchmarks.md
    python -m bench.report bench/results/x.json --out -     # print to stdout
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]

# The targets of the issue "CPU kernels that make sparse training faster than dense".
TARGETS = [
    ("spmm", 0.1, "dense", 3.5),
    ("spmm", 0.01, "dense", 20.0),
]
TORCH_TARGET = ("spmm", 0.2, 2.0)  # >= 2x torch CSR @ dense at every density <= 0.2


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


def render(result: dict, source: Optional[str] = None) -> str:
    meta = result.get("meta", {})
    parts = ["# CPU benchmarks", ""]
    src = f"`{Path(source).relative_to(ROOT)}`" if source and Path(source).is_relative_to(ROOT) else f"`{source}`"
    parts += [f"Generated by `python -m bench.report` from {src} (written by `{meta.get('command', 'python -m bench')}`); "
              "do not edit by hand. Reproduce with `python -m bench` from the repository root "
              "(`python -m bench --quick` for a smoke run).", ""]
    parts += ["## Machine", "",
              _table(["", ""], [
                  ["CPU", str(meta.get("cpu"))], ["flags", ", ".join(meta.get("cpu_flags", []))],
                  ["logical CPUs", str(meta.get("logical_cpus"))], ["threads (torch.set_num_threads)", str(meta.get("threads"))],
                  ["torch", str(meta.get("torch"))], ["date (UTC)", str(meta.get("date"))],
                  ["load average (1, 5, 15 min) at start / end", f"{_load(meta.get('loadavg_start'))} / {_load(meta.get('loadavg_end'))}"],
                  ["idle fraction at start", _f(meta.get("idle_at_start"))],
                  ["rounds (kernels / layers)", f"{meta.get('rounds')} / {meta.get('layer_rounds')}"],
                  ["portable build (no -march=native)", str(meta.get("portable_build"))],
              ]), ""]
    parts += ["## How to read this", "",
              "- Times are medians over interleaved rounds (every round runs every implementation of a problem once, "
              "in rotating order), in one process, float32, after a correctness check against the float64 "
              "reference. The idle fraction of the machine just before each problem is in the JSON (`idle_before`).",
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
              "contiguously and reused by all rows. BSR keeps an 8-row x 48-column register tile over all blocks "
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
    elif "skipped" in lay:
        parts += ["## Layers", "", f"Skipped: {lay['skipped']}", ""]
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
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
