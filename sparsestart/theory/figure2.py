"""Figure 2 of the paper: required width of source layer 1 against sparsity (rows, CSV, plot)."""
from __future__ import annotations

import csv
import numbers
from typing import Dict, List, Optional, Sequence

from .bounds import width_factors
from .checks import _check_positive_int

FIG2_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95,
                   0.96, 0.97, 0.98, 0.99)
FIG2_COLUMNS = ("sparsity", "density", "q1", "width", "width_int")


def fig2(
    sparsities: Optional[Sequence[float]] = None,
    delta: float = 0.001,
    hidden: int = 128,
    outputs: int = 10,
    inputs: int = 784,
) -> List[Dict[str, float]]:
    """Rows of Figure 2: required width of source layer 1 against sparsity.

    Target: ``inputs -> hidden -> outputs`` (depth ``L = 2``), dense; the ER source
    has the same density ``p = 1 - sparsity`` in every layer. By Theorem 2.1
    ``q_1 = max(1, log(2 * hidden * outputs / delta) / log(1 / sparsity))``, which
    depends on neither ``inputs`` nor ``p_0, p_1``. Each row has

    * ``sparsity``, ``density``;
    * ``q1``: the real factor;
    * ``width``: ``q1 * hidden`` (the curve of the figure);
    * ``width_int``: ``ceil(q1) * hidden``, whole copies as :func:`required_widths`.
    """
    if sparsities is None:
        sparsities = FIG2_SPARSITIES
    hidden = _check_positive_int("hidden", hidden)
    outputs = _check_positive_int("outputs", outputs)
    inputs = _check_positive_int("inputs", inputs)
    rows = []
    for i, s in enumerate(sparsities):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (0.0 <= float(s) < 1.0):
            raise ValueError(f"sparsities[{i}] must be in [0, 1), got {s!r}")
        p = 1.0 - float(s)
        q = width_factors([inputs, hidden, outputs], [p, p, p], delta)
        qi = width_factors([inputs, hidden, outputs], [p, p, p], delta, integer=True)
        rows.append({
            "sparsity": float(s),
            "density": p,
            "q1": q[1],
            "width": q[1] * hidden,
            "width_int": int(qi[1]) * hidden,
        })
    return rows


def write_fig2_csv(rows: Sequence[Dict[str, float]], path) -> None:
    """Write the rows of :func:`fig2` as CSV with header ``FIG2_COLUMNS``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(FIG2_COLUMNS)
        for r in rows:
            w.writerow([
                f"{r['sparsity']:.6g}", f"{r['density']:.6g}", f"{r['q1']:.6f}",
                f"{r['width']:.3f}", str(int(r["width_int"])),
            ])


def plot_fig2(rows: Sequence[Dict[str, float]], path, delta: float = 0.001,
              hidden: int = 128, outputs: int = 10) -> None:
    """Plot the rows of :func:`fig2` to ``path`` (PNG; matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(s, [r["width"] for r in rows], "o-", ms=4, label=r"$q_1 \cdot n_{T,1}$ (Thm 2.1)")
    ax.plot(s, [r["width_int"] for r in rows], "x", ms=5,
            label=r"$\lceil q_1\rceil \cdot n_{T,1}$ (whole copies)")
    ax.axhline(hidden, color="gray", lw=0.8, ls=":", label=f"target width {hidden}")
    ax.set_xlabel("sparsity $1 - p$")
    ax.set_ylabel("required width of source layer 1")
    ax.set_title(f"target {hidden}-{outputs}, $\\delta$ = {delta:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
