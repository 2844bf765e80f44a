"""Time against nnz and break-even density of the layer benchmarks (computed from the layer records,
so any result file with a layer suite can be re-rendered without measuring again).

Per layer and pass (forward, forward+backward):
- a least-squares line  t_sparse = intercept + slope * nnz  over the measured densities
  (common.fit_line), with R^2;
- the break-even density from that line: where it reaches the median dense time;
- the measured break-even density: walking up from the lowest density, the first
  pair of neighbouring densities where sparse turns from faster to slower than
  dense (ratio t_sparse / t_dense crossing 1), linearly interpolated in density.
  If sparse is faster at every measured density it is "> the largest density";
  if slower at every one, "< the smallest".
"""
from __future__ import annotations

import statistics
from typing import List, Optional

from . import common


def crossing(points: List[tuple]) -> dict:
    """points: (density, t_sparse / t_dense). The density where the ratio first reaches 1 going up."""
    pts = sorted(points)
    if all(r < 1 for _, r in pts):
        return {"density": None, "bound": ">", "at": pts[-1][0]}
    if all(r >= 1 for _, r in pts):
        return {"density": None, "bound": "<", "at": pts[0][0]}
    if pts[0][1] >= 1:  # slower already at the lowest density, faster somewhere above: noise; report the bound
        return {"density": None, "bound": "<", "at": pts[0][0]}
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            return {"density": d0 + (1 - r0) * (d1 - d0) / (r1 - r0), "bound": None, "at": None}
    raise AssertionError("unreachable")  # pragma: no cover


def format_break_even(be: dict, digits: str = "{:.3g}") -> str:
    if be["bound"] is not None:
        return f"{be['bound']} {be['at']:g}"
    return digits.format(be["density"])


def layer_fits(records: List[dict]) -> List[dict]:
    """One row per (layer, format, pass), in the order the records list them."""
    out = []
    keys = list(dict.fromkeys((r["layer"], r["format"], r["pass"]) for r in records))
    for layer, fmt, pass_ in keys:
        rs = sorted((r for r in records if (r["layer"], r["format"], r["pass"]) == (layer, fmt, pass_)),
                    key=lambda r: r["nnz_elements"])
        xs = [r["nnz_elements"] for r in rs]
        ys = [r["times"]["sparse"]["median"] for r in rs]
        f = common.fit_line(xs, ys)
        dense = statistics.median(r["times"]["dense"]["median"] for r in rs)
        numel = max(round(r["nnz_elements"] / r["density_actual"]) for r in rs if r["density_actual"] > 0)
        fit_be: Optional[float] = common.break_even(f, dense, numel)
        measured = crossing([(r["density_actual"], r["times"]["sparse"]["median"] / r["times"]["dense"]["median"])
                             for r in rs])
        out.append({
            "layer": layer, "kind": rs[0]["kind"], "format": fmt, "pass": pass_, "batch": rs[0]["batch"],
            "numel": numel, "points": len(rs),
            "slope_ns_per_nnz": f["slope"] * 1e9, "intercept_ms": f["intercept"] * 1e3, "r2": f["r2"],
            "dense_ms": dense * 1e3, "break_even_fit": fit_be, "break_even_measured": measured,
        })
    return out
