"""GPU kernel benchmarks: sparsestart's triton (BSR, CSR) and cuda (CSR) backends against
cuBLAS dense, torch's Triton BSR kernels (torch.sparse._triton_ops.bsr_dense_mm /
sampled_addmm) and torch's CSR @ dense (cuSPARSE).

Run on a CUDA machine (docs/gpu.md):

    python bench/gpu.py                       # default sweep, fp32 and bf16
    python bench/gpu.py --quick               # 4096x4096, N=4096 (the issue 13 targets), a few densities
    python bench/gpu.py --dtypes bf16 --blocks 32 64 --densities 0.5 0.1 --ops spmm

For every (shape, dtype, format, density) it first checks each implementation
against dense float64 torch, then times all of them interleaved in the same
process (medians of rounds of triton.testing.do_bench, which flushes L2), and
reports time, effective GFLOP/s (2 * nnz * N / t: useful work), dense-equivalent
GFLOP/s (2 * M * K * N / t), the ratio to dense, the peak memory of one call,
and per (shape, dtype, format) the break-even density (the largest density at
which the sparse kernel beats dense). Results: bench/results/gpu-kernels-<device>.json
(the layer/training suites of `python -m bench --device cuda` write gpu-<device>.json)
and a markdown table next to it.

Ops (the three products of a training step of a layer with weight W [M, K] and
a feature-major input x [K, N]):
    spmm    Y = W x            dense: W_dense @ x        torch: bsr_dense_mm(W_bsr, x) / W_csr @ x
    spmm_t  dX = W^T dY        dense: W_dense.T @ dY     torch: bsr_dense_mm(W^T_bsr, dY) (transposed copy)
    sddmm   dW = (dY x^T) o S  dense: dY @ x.T           torch: sampled_addmm(S_bsr, dY, x.T, beta=0)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_common import slug  # noqa: E402  (the layer suites name their result files the same way)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # relative max error vs float64


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096x4096", "4096x4096x256", "1024x1024x16384"],
                   help="MxKxN (N = batch * positions)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01])
    p.add_argument("--blocks", nargs="+", type=int, default=[16, 32, 64], help="BSR block sizes (1 = CSR)")
    p.add_argument("--csr", action=argparse.BooleanOptionalAction, default=True, help="also benchmark CSR")
    p.add_argument("--ops", nargs="+", default=["spmm", "spmm_t", "sddmm"], choices=["spmm", "spmm_t", "sddmm"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (dense cuBLAS and triton alike)")
    p.add_argument("--quick", action="store_true", help="one shape, densities 0.5/0.1/0.01, blocks 32, fp32+bf16")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu-kernels-<device>.json)")
    args = p.parse_args()
    if args.quick:
        args.shapes, args.densities, args.blocks = ["4096x4096x4096"], [0.5, 0.1, 0.01], [32]
    return args


def _timer():
    try:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")
    except ImportError:  # pragma: no cover - without triton: CUDA events, no L2 flush
        def bench(fn):
            for _ in range(3):
                fn()
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        return bench


def _structure(M, K, density, b, dtype, seed):
    """A sparse weight with ER block structure and its dense twin."""
    from sparsestart.formats import BSR, CSR

    g = torch.Generator().manual_seed(seed)
    R, Q = M // b, K // b
    nnz = max(0, round(density * R * Q))
    flat = torch.randperm(R * Q, generator=g)[:nnz]
    rows, cols = flat // Q, flat % Q
    shape = (nnz,) if b == 1 else (nnz, b, b)
    vals = torch.randn(shape, generator=g) / math.sqrt(density * K)
    cls = CSR if b == 1 else BSR
    m = cls.from_indices(rows, cols, (M, K), vals, block_size=b, dtype=dtype)
    m = type(m)(m.values.cuda(), *(t.cuda() for t in m.index_tensors()), m.shape)
    return m, m.to_dense().detach()


def _candidates(op, m, w, x, dy, b):
    """name -> (zero-argument callable, flops of useful work, flops of the dense product)."""
    import sparsestart.ops.gpu as gpu
    from sparsestart import ops

    M, K = m.shape
    N = x.shape[1]
    nnz = m.nnz_elements
    out = {}
    if op == "spmm":
        out["dense (cuBLAS)"] = lambda: w @ x
    elif op == "spmm_t":
        out["dense (cuBLAS)"] = lambda: w.T @ dy
    else:
        out["dense (cuBLAS)"] = lambda: dy @ x.T
    backends = (["cuda"] if b == 1 and gpu.cuda_extension_available() else []) + \
        (["triton"] if gpu.triton_available() else [])
    for be in backends:
        def run(be=be):
            with ops.use_backend(be):
                if op == "spmm":
                    return ops.matmul(m, x)
                if op == "spmm_t":
                    return ops.matmul_t(m, dy)
                return ops.sampled_matmul(m, dy, x)
        out[f"sparsestart {be}"] = run
    # torch's own sparse kernels
    try:
        if b > 1:
            from torch.sparse import _triton_ops as tto

            wb = w.to_sparse_bsr((b, b))
            if op == "spmm":
                out["torch bsr_dense_mm"] = lambda: tto.bsr_dense_mm(wb, x)
            elif op == "spmm_t":
                wtb = w.T.contiguous().to_sparse_bsr((b, b))  # torch has no transposed walk: a transposed copy
                out["torch bsr_dense_mm (W^T copy)"] = lambda: tto.bsr_dense_mm(wtb, dy)
            else:
                xt = x.T.contiguous()
                out["torch sampled_addmm"] = lambda: tto.sampled_addmm(wb, dy, xt, beta=0.0, alpha=1.0)
        else:
            wc = w.to_sparse_csr()
            if op == "spmm":
                out["torch csr @ dense (cuSPARSE)"] = lambda: wc @ x
            elif op == "spmm_t":
                wtc = w.T.contiguous().to_sparse_csr()
                out["torch csr @ dense (W^T copy)"] = lambda: wtc @ dy
            else:
                xt = x.T.contiguous()
                out["torch sampled_addmm (cuSPARSE)"] = lambda: torch.sparse.sampled_addmm(wc, dy, xt, beta=0.0)
    except Exception as exc:  # noqa: BLE001 - a missing torch kernel is reported, not fatal
        print(f"  (torch baseline unavailable: {type(exc).__name__}: {exc})")
    dense_flops = 2 * M * K * N
    return out, 2 * nnz * N, dense_flops


def _as_dense_result(op, res, m, mask):
    """The result of any implementation as a dense tensor comparable to the dense product."""
    if res.layout in (torch.sparse_bsr, torch.sparse_csr):
        return res.to_dense()
    if op == "sddmm" and res.shape != mask.shape:  # sparsestart: values-shaped
        return type(m)(res, *m.index_tensors(), m.shape).to_dense()
    return res


def main():
    args = _parse()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; see docs/gpu.md")
        return 1
    import sparsestart.ops.gpu as gpu  # noqa: F401  (registers the GPU backends)

    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    bench = _timer()
    dev = torch.cuda.get_device_name()
    results = []
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-kernels-{slug(dev)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=dev, torch=torch.__version__, cuda=torch.version.cuda, time=time.strftime("%Y-%m-%d %H:%M"),
                host=platform.node(), tf32=args.tf32, argv=sys.argv[1:], complete=False)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None

    def save():  # after every problem: a run cut off by a time limit keeps what it measured
        out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    blocks = ([1] if args.csr else []) + [b for b in args.blocks if b != 1]
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(K, N, device="cuda", generator=g).to(dtype)
            dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
            for b in blocks:
                if M % b or K % b:
                    continue
                for density in args.densities:
                    m, w = _structure(M, K, density, b, dtype, seed=1)
                    mask = (w != 0)
                    for op in args.ops:
                        cands, useful, dense_flops = _candidates(op, m, w, x, dy, b)
                        w64 = w.double()
                        ref = (w64 @ x.double() if op == "spmm" else w64.T @ dy.double() if op == "spmm_t"
                               else (dy.double() @ x.double().T) * mask)
                        times, ok, mem = {}, {}, {}
                        for name, fn in cands.items():
                            try:
                                torch.cuda.reset_peak_memory_stats()
                                base = torch.cuda.memory_allocated()
                                res = _as_dense_result(op, fn(), m, mask).double()
                                torch.cuda.synchronize()
                                mem[name] = torch.cuda.max_memory_allocated() - base
                                if op == "sddmm" and name.startswith("dense"):
                                    res = res * mask
                                err = ((res - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
                                ok[name] = err <= TOL[dtype] or ref.abs().max().item() == 0
                                times[name] = []
                            except Exception as exc:  # noqa: BLE001
                                print(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                        for _ in range(args.rounds):  # interleaved
                            for name in times:
                                times[name].append(bench(cands[name]))
                        dense_ms = statistics.median(times["dense (cuBLAS)"])
                        for name, ts in times.items():
                            ms = statistics.median(ts)
                            row = dict(device=dev, op=op, M=M, K=K, N=N, dtype=dname, block=b, density=density,
                                       impl=name, ms=ms, correct=ok[name], peak_bytes=mem[name],
                                       useful_gflops=useful / ms / 1e6, dense_equiv_gflops=dense_flops / ms / 1e6,
                                       speedup_vs_dense=dense_ms / ms)
                            results.append(row)
                            flag = "" if ok[name] else "  WRONG RESULT"
                            print(f"{op:6} {shape:>15} {dname} b={b:<2} d={density:<5} {name:32} {ms:8.3f} ms "
                                  f"{row['useful_gflops']:9.1f} GF/s useful  x{row['speedup_vs_dense']:.2f} vs dense"
                                  f"{flag}", flush=True)
                        save()
                    del m, w
    meta["complete"] = True
    save()
    md = _markdown(results, meta)
    out.with_suffix(".md").write_text(md)
    print(f"\nwrote {out} and {out.with_suffix('.md')}\n")
    print(md)
    return 0


def _markdown(results, meta):
    lines = [f"# GPU kernels on {meta['device']} (torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"triton {meta['triton']}, tf32={meta['tf32']})", "",
             "Speed-up over dense cuBLAS (>1: faster) and useful GFLOP/s; `*` marks a wrong result.", ""]
    keys = sorted({(r["op"], r["M"], r["K"], r["N"], r["dtype"], r["block"]) for r in results})
    for op, M, K, N, dt, b in keys:
        rows = [r for r in results if (r["op"], r["M"], r["K"], r["N"], r["dtype"], r["block"]) == (op, M, K, N, dt, b)]
        impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if not i.startswith("dense")]
        dens = sorted({r["density"] for r in rows}, reverse=True)
        fmt = "CSR" if b == 1 else f"BSR b={b}"
        lines += [f"## {op} {M}x{K}, N={N}, {dt}, {fmt}", "",
                  "| density | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
        for d in dens:
            cells = []
            for i in impls:
                r = next((r for r in rows if r["impl"] == i and r["density"] == d), None)
                cells.append("-" if r is None else
                             f"x{r['speedup_vs_dense']:.2f} ({r['useful_gflops']:.0f}){'' if r['correct'] else '*'}")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        for i in impls:
            wins = [r["density"] for r in rows if r["impl"] == i and r["speedup_vs_dense"] >= 1 and r["correct"]]
            lines.append(f"\nbreak-even ({i}): " + (f"density <= {max(wins)}" if wins else "never in this sweep"))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
