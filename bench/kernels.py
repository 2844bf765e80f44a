"""Kernel benchmarks: sparsestart's CPU spmm / spmm_t / sddmm against dense GEMM and torch.sparse.

For a weight W [M, K] with a random (Erdős–Rényi) support of the given density and
feature-major operands x [K, N], dy [M, N]:

    op      sparsestart (native kernel)            dense (torch.mm)     torch.sparse
    spmm    _native_spmm(W, x)        = W x        W_dense @ x          W_csr @ x  (W_bsr @ x)
    spmm_t  _native_spmm(CSC view, dy) = W^T dy    W_dense.T @ dy       (W^T)_csr @ dy (transposed copy)
    sddmm   _native_sddmm(dy, x) = (dy x^T)[W≠0]  dy @ x.T (all M*K)   sampled_addmm(W_csr, dy, x.T) (CSR only)

``sparsestart`` times the native op itself (what a backend call costs); ``sparsestart_op``
times the public torch.ops.sparsestart.{spmm, spmm_t, sddmm} (Python checks and the
backend registry added). Effective GFLOP/s count useful work only (2 * nnz * N, nnz
in weights); dense-equivalent GFLOP/s are 2 * M * K * N / t.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List

import torch

from . import common

NATIVE = None  # torch.ops.sparsestart, bound in run()

OPS = ("spmm", "spmm_t", "sddmm")


def _structure(M: int, K: int, density: float, block: int, seed: int):
    from sparsestart.formats import BSR, CSR

    g = torch.Generator().manual_seed(seed)
    R, Q = M // block, K // block
    mask = torch.rand(R, Q, generator=g) < density
    rows, cols = mask.nonzero(as_tuple=True)
    shape = (rows.numel(),) if block == 1 else (rows.numel(), block, block)
    vals = torch.randn(shape, generator=g) / math.sqrt(max(1.0, density * K))
    cls = CSR if block == 1 else BSR
    return cls.from_indices(rows, cols, (M, K), vals, block_size=block)


def _reference_outputs(m, x, dy):
    """float64 results of the three ops: reference.py when its [nnz, N] temporary is small, else dense float64
    (the same sums; reference.py itself is tested against dense torch in tests/ops)."""
    from sparsestart.ops import reference

    M, K = m.shape
    r, c, s, cp, rr, st = m.index_tensors()
    v = m.values.double()
    if m.nnz_elements * x.shape[1] <= 2**24:
        return (reference.native_spmm(v, r, c, s, x.double(), M, False),
                reference.native_spmm(v, cp, rr, st, dy.double(), K, True),
                reference.native_sddmm(r, c, s, dy.double(), x.double(), m.capacity, m.block_size))
    wd = m.to_dense().double()
    full = dy.double() @ x.double().t()
    rows, cols, slots = m.coo()
    b = m.block_size
    if b == 1:
        dv = torch.zeros(m.capacity, dtype=torch.float64)
        dv[slots] = full[rows, cols]
    else:
        blocks = full.view(M // b, b, K // b, b).permute(0, 2, 1, 3)
        dv = torch.zeros(m.capacity, b, b, dtype=torch.float64)
        dv[slots] = blocks[rows, cols]
    return wd @ x.double(), wd.t() @ dy.double(), dv


def bench_problem(M: int, K: int, N: int, density: float, block: int, rounds: int, seed: int = 0,
                  check_tol: float = 1e-4) -> List[dict]:
    """Check, then time, all implementations of the three ops for one (shape, format, density)."""
    m = _structure(M, K, density, block, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(K, N, generator=g)
    dy = torch.randn(M, N, generator=g)
    r, c, s, cp, rr, st = idx = m.index_tensors()
    vals, C, b = m.values.detach(), m.capacity, m.block_size
    wd = m.to_dense().detach().contiguous()
    fmt = "csr" if b == 1 else f"bsr{b}"
    with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        if b == 1:
            t_w, t_wt = wd.to_sparse_csr(), wd.t().contiguous().to_sparse_csr()
            torch_name = "torch_csr"
        else:
            t_w, t_wt = wd.to_sparse_bsr((b, b)), wd.t().contiguous().to_sparse_bsr((b, b))
            torch_name = "torch_bsr"
    wdt = wd.t()
    xt = x.t()

    impls = {
        "spmm": {
            "sparsestart": lambda: NATIVE._native_spmm(vals, r, c, s, x, M, False),
            "sparsestart_op": lambda: NATIVE.spmm(vals, *idx, x),
            "dense": lambda: torch.mm(wd, x),
            torch_name: lambda: t_w @ x,
        },
        "spmm_t": {
            "sparsestart": lambda: NATIVE._native_spmm(vals, cp, rr, st, dy, K, True),
            "sparsestart_op": lambda: NATIVE.spmm_t(vals, *idx, dy),
            "dense": lambda: torch.mm(wdt, dy),
            torch_name: lambda: t_wt @ dy,
        },
        "sddmm": {
            "sparsestart": lambda: NATIVE._native_sddmm(r, c, s, dy, x, C, b),
            "sparsestart_op": lambda: NATIVE.sddmm(*idx, dy, x, C, b),
            "dense": lambda: torch.mm(dy, xt),
        },
    }
    if b == 1:  # torch's CPU sampled_addmm supports CSR only
        impls["sddmm"][torch_name] = lambda: torch.sparse.sampled_addmm(t_w, dy, xt, beta=0.0)

    # ---- correctness before timing
    refs = dict(zip(OPS, _reference_outputs(m, x, dy)))
    errors: Dict[str, Dict[str, float]] = {}
    for op in OPS:
        errors[op] = {}
        for name in ("sparsestart", "sparsestart_op"):
            errors[op][name] = common.rel_err(impls[op][name](), refs[op])
        if torch_name in impls[op]:
            out = impls[op][torch_name]()
            if op == "sddmm":  # sampled_addmm returns a CSR tensor in W's entry order; compare in slots
                rows, cols, slots = m.coo()
                got = torch.zeros(C)
                got[slots] = out.to_dense()[rows, cols]
                out = got
            errors[op][torch_name] = common.rel_err(out, refs[op])
        bad = {k: v for k, v in errors[op].items() if not v <= check_tol}
        if bad:
            raise AssertionError(f"{op} {fmt} {M}x{K}x{N} d={density}: relative error {bad} > {check_tol}")
    del refs

    # ---- timing: all ops and implementations of this problem interleaved
    idle = common.idle_fraction()
    fns = {f"{op}/{name}": fn for op in OPS for name, fn in impls[op].items()}
    stats = common.interleaved(fns, rounds)
    out = []
    nnz_el = m.nnz_elements
    for op in OPS:
        times = {name: stats[f"{op}/{name}"] for name in impls[op]}
        t = times["sparsestart"]["median"]
        rec = {
            "op": op, "M": M, "K": K, "N": N, "format": fmt, "block": b, "density": density,
            "density_actual": m.density, "nnz": m.nnz, "nnz_elements": nnz_el, "idle_before": idle,
            "rel_error": errors[op], "times": times,
            "gflops_effective": 2.0 * nnz_el * N / t / 1e9,
            "gflops_dense_equiv": 2.0 * M * K * N / t / 1e9,
            "dense_gflops": 2.0 * M * K * N / times["dense"]["median"] / 1e9,
            "speedup_vs_dense": times["dense"]["median"] / t,
            "op_overhead_us": (times["sparsestart_op"]["median"] - t) * 1e6,
        }
        if torch_name in times:
            rec["torch_name"] = torch_name
            rec["speedup_vs_torch"] = times[torch_name]["median"] / t
            rec["torch_gflops_effective"] = 2.0 * nnz_el * N / times[torch_name]["median"] / 1e9
        out.append(rec)
    return out


def fits(records: List[dict]) -> List[dict]:
    """Per (shape, format, op, implementation): time vs nnz line fit and break-even density."""
    res = []
    keys = list(dict.fromkeys((r["M"], r["K"], r["N"], r["format"], r["op"]) for r in records))
    for key in keys:
        rs = sorted((r for r in records if (r["M"], r["K"], r["N"], r["format"], r["op"]) == key),
                    key=lambda r: r["nnz_elements"])
        M, K, N, fmt, op = key
        dense = sorted(r["times"]["dense"]["median"] for r in rs)[len(rs) // 2]
        for impl in ("sparsestart", rs[0].get("torch_name")):
            if impl is None or any(impl not in r["times"] for r in rs):
                continue
            xs = [r["nnz_elements"] for r in rs]
            ys = [r["times"][impl]["median"] for r in rs]
            f = common.fit_line(xs, ys)
            measured = [r["density_actual"] for r in rs if r["times"][impl]["median"] < r["times"]["dense"]["median"]]
            res.append({
                "M": M, "K": K, "N": N, "format": fmt, "op": op, "impl": impl,
                "slope_ns_per_nnz": f["slope"] * 1e9, "slope_ns_per_nnz_per_n": f["slope"] * 1e9 / N,
                "intercept_us": f["intercept"] * 1e6, "r2": f["r2"], "dense_ms": dense * 1e3,
                "break_even_density_fit": common.break_even(f, dense, M * K),
                "largest_faster_density": max(measured) if measured else None,
            })
    return res


def dispatch_overhead(rounds: int = 7) -> dict:
    """Fixed cost per call of the native op and of the public op (Python checks, registry), on a problem
    small enough that the kernel itself takes about a microsecond."""
    m = _structure(64, 64, 0.1, 1, 0)
    x = torch.randn(64, 16)
    vals, idx = m.values.detach(), m.index_tensors()
    r, c, s = idx[:3]
    st = common.interleaved({
        "native": lambda: NATIVE._native_spmm(vals, r, c, s, x, 64, False),
        "public_op": lambda: NATIVE.spmm(vals, *idx, x),
    }, rounds, min_sample=2e-2, max_inner=20000)
    return {k: {"median_us": v["median"] * 1e6, "min_us": v["min"] * 1e6} for k, v in st.items()}


def run(args, log=print) -> dict:
    global NATIVE
    import sparsestart  # noqa: F401  (registers the ops)
    from sparsestart import ops

    if not ops.NATIVE_AVAILABLE:
        raise RuntimeError("sparsestart._C is not built: pip install --no-build-isolation -e .")
    NATIVE = torch.ops.sparsestart
    records = []
    for (M, K, N) in args.shapes:
        for block in args.blocks:
            if M % block or K % block:
                continue
            for d in args.densities:
                if args.wait_quiet:
                    common.wait_quiet(args.wait_quiet)
                recs = bench_problem(M, K, N, d, block, args.rounds, seed=args.seed)
                records += recs
                for r in recs:
                    vs = f" vs {r['torch_name']} x{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else ""
                    log(f"  {r['op']:6s} {r['format']:6s} {M}x{K}x{N} d={d:<6g} "
                        f"{r['times']['sparsestart']['median'] * 1e3:9.3f} ms {r['gflops_effective']:6.1f} GF/s  "
                        f"vs dense x{r['speedup_vs_dense']:.2f}{vs}")
    overhead = dispatch_overhead()
    log(f"  per-call overhead (64x64x16 spmm): native op {overhead['native']['median_us']:.1f} us, "
        f"public op {overhead['public_op']['median_us']:.1f} us")
    return {"records": records, "fits": fits(records), "call_overhead": overhead}
