"""Sampling benchmarks: time and peak memory of building the ER structure of one large layer.

The public paths that never hold a dense weight or mask (the default is a
32768 x 32768 layer at density 0.01, about 10.7M weights):

    indices-exact       sparsestart.init.er_indices((M, K), p): exactly round(p M K) distinct
                        positions (without replacement), as int64 (rows, cols)
    indices-bernoulli   er_indices(..., exact=False): each position kept with probability p
    csr-exact           sparsestart.nn.SparseLinear(K, M, density=p): the whole layer (CSR and
                        CSC index, values initialised as torch does, bias)
    csr-bernoulli       the same with exact=False
    bsr16-exact         SparseLinear(..., format="bsr", block_size=16): p of the 16 x 16 blocks
    bsr16-bernoulli     the same with exact=False

``sparsify`` is not measured here: it converts an existing dense model, so a
32768 x 32768 nn.Linear would first hold its 4 GiB dense weight.

Every sample runs in a fresh Python process (``python -m bench.sampling --child``),
so nothing allocated before (or by another variant) hides its peak. The child
imports torch and sparsestart, sets the thread count, resets the kernel's peak-RSS
counter (writing 5 to /proc/self/clear_refs), times the call and reads the peak
resident set (VmHWM in /proc/self/status). Peak memory = that peak minus the
resident set just before the call. Only then does it check the result: the
number of positions (exact: round(p M K); Bernoulli: within 6 standard
deviations of p M K), uniqueness and range, and ``validate()`` for layers.
Variants run interleaved: round r starts each variant once, in rotated order.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from . import common

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("indices-exact", "indices-bernoulli", "csr-exact", "csr-bernoulli", "bsr16-exact", "bsr16-bernoulli")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _check_positions(keys, n: int, density: float, exact: bool) -> dict:
    """keys: sorted row-major (block) positions of one sample."""
    k = keys.numel()
    expected = min(n, max(1, round(density * n))) if exact else density * n
    tol = 0 if exact else 6 * math.sqrt(n * density * (1 - density)) + 1
    unique = bool((keys[1:] > keys[:-1]).all()) if k > 1 else True
    in_range = bool(k == 0 or (int(keys[0]) >= 0 and int(keys[-1]) < n))
    ok = abs(k - expected) <= tol and unique and in_range
    return {"positions": k, "expected": expected, "unique_sorted": unique, "in_range": in_range, "ok": ok}


def child(spec: dict) -> dict:
    import torch

    import sparsestart  # noqa: F401
    from sparsestart.init import er_indices
    from sparsestart.nn import SparseLinear

    torch.set_num_threads(spec["threads"])
    variant, size, density, seed = spec["variant"], spec["size"], spec["density"], spec["seed"]
    kind, mode = variant.split("-")
    exact = mode == "exact"
    block = 16 if kind == "bsr16" else 1
    reset = _reset_peak()
    rss0 = _status_kib("VmRSS")
    hwm0 = _status_kib("VmHWM")
    t0 = time.perf_counter()
    if kind == "indices":
        out = er_indices((size, size), density, exact=exact, generator=torch.Generator().manual_seed(seed))
    else:
        fmt = dict(format="bsr", block_size=block) if block > 1 else {}
        out = SparseLinear(size, size, density=density, exact=exact, seed=seed, **fmt)
    seconds = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    rss1 = _status_kib("VmRSS")
    grid = size // block
    if kind == "indices":
        rows, cols = out
        check = _check_positions(rows * grid + cols, grid * grid, density, exact)
        stored = rows.numel() * rows.element_size() + cols.numel() * cols.element_size()
        nnz_elements = rows.numel()
    else:
        out.validate()
        m = out.sparse_weight
        r, c, _ = m.coo()
        check = _check_positions(r * grid + c, grid * grid, density, exact)
        check["validate"] = True
        stored = sum(t.numel() * t.element_size() for t in list(out.parameters()) + list(out.buffers()))
        nnz_elements = m.nnz_elements
    return {"variant": variant, "seconds": seconds, "peak_bytes": (hwm - rss0) * 1024,
            "retained_bytes": (rss1 - rss0) * 1024, "result_bytes": stored, "nnz_elements": nnz_elements,
            "rss_before_bytes": rss0 * 1024, "peak_reset": reset, "hwm_before_bytes": hwm0 * 1024, "check": check}


def _spawn(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.sampling", "--child", json.dumps(spec)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"sampling child {spec['variant']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args, log=print, timeout: float = 600.0) -> dict:
    size, density = args.sampling_size, args.sampling_density
    variants = list(args.sampling_variants)
    samples = {v: [] for v in variants}
    idle = common.idle_fraction()
    for i, order in enumerate(common.rotations(variants, args.sampling_rounds)):
        if args.wait_quiet:
            common.wait_quiet(args.wait_quiet)
        for v in order:
            spec = {"variant": v, "size": size, "density": density, "seed": args.seed + i, "threads": args.threads}
            r = _spawn(spec, timeout)
            if not r["check"]["ok"]:
                raise AssertionError(f"sampling {v}: wrong sample {r['check']}")
            samples[v].append(r)
    records = []
    for v in variants:
        rs = samples[v]
        rec = {"variant": v, "M": size, "K": size, "density": density, "rounds": len(rs), "idle_before": idle,
               "seconds": common.summarize([r["seconds"] for r in rs]),
               "peak_bytes": common.summarize([r["peak_bytes"] for r in rs]),
               "retained_bytes_median": common.summarize([r["retained_bytes"] for r in rs])["median"],
               "result_bytes": rs[0]["result_bytes"], "nnz_elements": [r["nnz_elements"] for r in rs],
               "peak_reset": all(r["peak_reset"] for r in rs), "checks": [r["check"] for r in rs]}
        records.append(rec)
        log(f"  {v:18s} {size}x{size} d={density:<6g} {rec['seconds']['median']:7.2f} s  "
            f"peak {rec['peak_bytes']['median'] / 2**20:8.1f} MiB  result {rec['result_bytes'] / 2**20:8.1f} MiB"
            f"  nnz {rec['nnz_elements'][0]}")
    return {"records": records}


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description="child process of the sampling suite "
                                "(run the suite with python -m bench --suites sampling)")
    p.add_argument("--child", required=True, help="JSON spec: variant, size, density, seed, threads")
    args = p.parse_args(argv)
    print(json.dumps(child(json.loads(args.child))))


if __name__ == "__main__":
    _main()
