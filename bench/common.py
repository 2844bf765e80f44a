"""Timing, machine description and line fits shared by the CPU benchmarks.

Timing rules (DESIGN.md, "Benchmarks"):
- correctness is checked before anything is timed;
- all implementations of one problem are timed in the same process, interleaved:
  every round runs each of them once, in an order rotated from round to round,
  so a burst of background load hits all of them alike;
- a sample is one call, or for calls shorter than ``min_sample`` seconds, the mean
  of enough back-to-back calls to reach it (the inner count is fixed per
  implementation before the rounds start);
- the reported time is the median over rounds, with the quartiles and minimum.

The machine this runs on may be shared: the CPU idle fraction just before each
problem is recorded, and ``wait_quiet`` can hold the run until the machine is idle.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx512f", "avx512bw", "avx512vl", "avx2", "fma") if x in have]
    except OSError:
        pass
    return []


def _cpu_times():
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return idle, sum(vals)


def idle_fraction(interval: float = 0.25) -> Optional[float]:
    """Fraction of all CPUs' time spent idle over ``interval`` seconds (None if /proc/stat is missing)."""
    try:
        i0, t0 = _cpu_times()
        time.sleep(interval)
        i1, t1 = _cpu_times()
    except OSError:
        return None
    return (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait: float, threshold: float = 0.85) -> Optional[float]:
    """Wait (up to ``max_wait`` s) until the machine is at least ``threshold`` idle; return the last idle fraction."""
    deadline = time.monotonic() + max_wait
    while True:
        f = idle_fraction()
        if f is None or f >= threshold or time.monotonic() >= deadline:
            return f
        time.sleep(0.5)


def loadavg() -> Optional[tuple]:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    load = loadavg()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[0:3],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": load,
        "portable_build": os.environ.get("SPARSESTART_PORTABLE", "0") == "1",
    }


def run_info(command: str, threads: int, seconds: float, idle_at_start: Optional[float]) -> dict:
    """When and how one suite was run: kept with the suite's results so merged result files stay traceable."""
    return {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "threads": threads, "torch": torch.__version__, "seconds": round(seconds, 1),
            "idle_at_start": idle_at_start, "loadavg_end": loadavg()}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], params, x: torch.Tensor,
                     gy: torch.Tensor) -> Callable[[], None]:
    """A timed call of one layer pass: ``fn(x).backward(gy)`` with the gradients of ``params`` and of
    ``x`` (a leaf requiring grad: a hidden layer computes all three) reset to None first."""
    params = list(params)

    def run():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(gy)
    return run


def tensor_bytes(tensors) -> int:
    """Bytes held by the given tensors (None entries count 0; storage shared between them is counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _calibrate(fn: Callable[[], object], min_sample: float, max_inner: int) -> int:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if dt >= min_sample:
        return 1
    return int(min(max_inner, max(1, round(min_sample / max(dt, 1e-7)))))


def rotations(names: Sequence[str], rounds: int) -> Iterator[List[str]]:
    """The order of every round: each name once, the starting point rotated from round to round."""
    names = list(names)
    for r in range(rounds):
        k = r % max(1, len(names))
        yield names[k:] + names[:k]


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int, *, warmup: int = 2, min_sample: float = 2e-3,
                max_inner: int = 200) -> Dict[str, dict]:
    """Time each callable ``rounds`` times, interleaved; return per-name statistics in seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    inner = {n: _calibrate(fns[n], min_sample, max_inner) for n in names}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for order in rotations(names, rounds):
        for n in order:
            f, k = fns[n], inner[n]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            samples[n].append((time.perf_counter() - t0) / k)
    return {n: summarize(samples[n], inner[n]) for n in names}


def timed_calls(log: Sequence, stats: dict) -> Sequence:
    """The entries a callable appended to ``log`` during the timed rounds of :func:`interleaved` (the last
    n * inner calls; warm-up and calibration calls come before them)."""
    return log[len(log) - stats["n"] * stats["inner"]:]


def summarize(xs: Sequence[float], inner: int = 1) -> dict:
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "q1": q[0], "q3": q[2], "n": len(s), "inner": inner}


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares y = intercept + slope * x, with R^2."""
    n = len(xs)
    if n < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan")}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else float("nan")
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else float("nan")}


def break_even(fit: dict, dense_time: float, numel: float) -> Optional[float]:
    """Density at which the fitted sparse time equals the dense time (None if the fit does not cross)."""
    s, a = fit["slope"], fit["intercept"]
    if not s or s != s or s <= 0:
        return None
    return (dense_time - a) / (s * numel)


# ------------------------------------------------------------------- standalone benchmark modules
def standalone_args(doc: str, out, threads: int, argv):
    """Parse the command line every ``python -m bench.<module>`` measurement shares (--threads, --rounds,
    --out), set torch's thread count and note the start time (``args.start``) for :func:`write_standalone`."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path, default=Path(out))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.start = time.perf_counter()
    return args


def write_standalone(args, module: str, argv, results: dict, **extra) -> dict:
    """Write a standalone measurement's JSON (machine, run, ``extra`` fields, results) to ``args.out``."""
    doc = {"machine": machine_info(args.threads),
           "run": run_info(f"python -m {module} " + " ".join(argv or []), args.threads,
                           time.perf_counter() - args.start, None),
           **extra, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc
