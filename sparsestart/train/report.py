"""``sparsestart report``: a table (mean ± 95% CI over seeds) and plots from finished runs.

Reads every ``summary.json`` under the given directories (sweep directories or
run directories), groups the runs by method, distribution and density (and by
any other option that differs between them) over seeds, and writes into the
output directory:

``report.md``                the table: final-epoch test metrics, mean ± 95% CI (Student t, n - 1 degrees of
                             freedom: t * s / sqrt(n)); one seed shows its value with "(n=1)"
``report.csv``               the same groups with mean, CI half-width, standard deviation and n of every metric
``accuracy_vs_sparsity.png`` test accuracy against sparsity (log scale of the density), a line per method and
                             distribution, error bars = CI, the dense baseline as a horizontal band
``layer_densities.png``      per-layer densities, grouped bars per distribution, a panel per density
``structure_history.png``    for methods that change the structure: overall density and the fraction of
                             stored weights dropped / grown at every update (from the method's ``history``)

Plots use matplotlib's object-oriented API with the Agg canvas (no pyplot, no
global backend switch).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import atomic_write_text
from .config import RESUME_CHANGEABLE

__all__ = ["Run", "Group", "collect_runs", "group_runs", "mean_ci", "structure_track", "write_report", "register",
           "METRICS"]

CONFIDENCE = 0.95
_SPARSE_KEYS = ("format", "block_size", "exclude", "flow", "distribution_options")
_NOT_SETTING = {"seed", "method", "method_options", "distribution", "density", *_SPARSE_KEYS, *RESUME_CHANGEABLE}


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) else None


def _scaled(v, k):
    return None if v is None else v * k


@dataclass(frozen=True)
class Metric:
    key: str  # column name in report.csv
    header: str  # column header in report.md
    get: Callable[[dict], Optional[float]]  # from a summary
    fmt: str = "{:.3f}"  # mean (and CI half-width, unless ci_fmt)
    ci_fmt: Optional[str] = None


#: The metrics of the table, in column order; a column appears when any run has the value.
METRICS = (
    Metric("test_accuracy", "test acc. (%)", lambda s: _scaled(_get(s, "final", "test", "accuracy"), 100), "{:.2f}"),
    Metric("best_val_test_accuracy", "test acc. at best val. epoch (%)",
           lambda s: _scaled(_get(s, "best_val", "test", "accuracy"), 100), "{:.2f}"),
    Metric("nll", "NLL", lambda s: _get(s, "final", "test", "nll"), "{:.3f}"),
    Metric("ece", "ECE", lambda s: _get(s, "final", "test", "ece"), "{:.4f}"),
    Metric("ood_auroc_gaussian", "OoD AUROC Gaussian", lambda s: _get(s, "final", "test", "ood_auroc", "gaussian")),
    Metric("ood_auroc_uniform", "OoD AUROC uniform", lambda s: _get(s, "final", "test", "ood_auroc", "uniform")),
    Metric("ood_auroc_shifted", "OoD AUROC shifted", lambda s: _get(s, "final", "test", "ood_auroc", "shifted")),
    Metric("fgsm_accuracy", "FGSM acc. (%)", lambda s: _scaled(_get(s, "final", "test", "fgsm_accuracy"), 100),
           "{:.2f}"),
    Metric("final_density", "final density", lambda s: _get(s, "density"), "{:.4g}", "{:.2g}"),
    Metric("forward_mflops", "forward MFLOPs/sample", lambda s: _scaled(_get(s, "flops", "forward_per_sample"), 1e-6),
           "{:.3g}", "{:.2g}"),
    Metric("train_seconds", "training s", lambda s: _get(s, "train_seconds"), "{:.1f}"),
    Metric("wall_seconds", "wall s", lambda s: _get(s, "wall_time_seconds"), "{:.1f}"),
)


# ---------------------------------------------------------------------------------------------- statistics
def mean_ci(values, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "ci", "std", "n"}`` of the finite values: ci = t_{(1+c)/2, n-1} * s / sqrt(n) (None for n < 2)."""
    import numpy as np
    try:
        from scipy import stats
    except ImportError:
        raise ImportError("sparsestart report needs scipy for the Student t quantiles (pip install scipy)") from None

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": None, "ci": None, "std": None, "n": 0}
    if n == 1:
        return {"mean": float(v[0]), "ci": None, "std": None, "n": 1}
    std = float(v.std(ddof=1))
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return {"mean": float(v.mean()), "ci": t * std / math.sqrt(n), "std": std, "n": n}


# ---------------------------------------------------------------------------------------------- runs and groups
@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def config(self) -> dict:
        return self.summary.get("config") or {}

    @property
    def dense(self) -> bool:
        return float(self.config.get("density", 0)) == 1.0

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Group:
    setting: str  # the options (other than method/distribution/density/seed) that set this group apart, or ""
    method: str  # "dense" for the dense baseline; with [options] when runs of the method differ in them
    distribution: str  # "-" for the dense baseline
    density: float  # nominal (config) density
    runs: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # metric key -> mean_ci dict

    @property
    def dense(self) -> bool:
        return self.method == "dense"

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def collect_runs(dirs, log: Callable[[str], None] = print) -> tuple[list[Run], list[str]]:
    """(finished runs, notes) under ``dirs``: each a run directory or a folder searched for ``summary.json``."""
    runs, notes, seen = [], [], set()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ValueError(f"report: DIR {str(d)!r} is not a directory; give sweep or run directories")
        found = [d / "summary.json"] if (d / "summary.json").is_file() else sorted(d.rglob("summary.json"))
        for path in found:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
                    raise ValueError("not a run summary (no config)")
            except (OSError, ValueError) as exc:
                notes.append(f"skipped {path}: {exc}")
                log(f"report: skipped {path}: {exc}")
                continue
            runs.append(Run(path.parent, summary))
        for ckpt in sorted(d.rglob("checkpoint.pt")):
            if not (ckpt.parent / "summary.json").is_file():
                notes.append(f"unfinished (no summary.json yet): {ckpt.parent}")
    return runs, notes


def _text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)


def _varying(dicts: list[dict]) -> list[str]:
    """Keys whose values are not the same in all the dicts (a missing key counts as a value)."""
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({_text(d.get(k)) for d in dicts}) > 1]


def _label(name: str, opts: dict, keys: list[str]) -> str:
    shown = [f"{k}={_text(opts.get(k))}" for k in keys]
    return f"{name}[{', '.join(shown)}]" if shown else name


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
    """Groups over seeds (sorted: setting, dense first, method, distribution, density descending) and notes.

    Runs with the same configuration and seed are counted once (the first found).
    """
    from .methods import METHODS

    sparse = [r for r in runs if not r.dense]
    setting_of = {id(r): {k: v for k, v in r.config.items() if k not in _NOT_SETTING} for r in runs}
    setting_keys = _varying(list(setting_of.values()))
    sparse_keys = _varying([{k: r.config.get(k) for k in _SPARSE_KEYS} for r in sparse])
    method_keys = {}
    for r in sparse:
        m = r.config.get("method")
        method_keys.setdefault(m, []).append(r.config.get("method_options") or {})
    method_keys = {m: _varying(opts) for m, opts in method_keys.items()}
    groups: dict[tuple, Group] = {}
    notes = []
    for r in runs:
        c = r.config
        setting = ", ".join(f"{k}={_text(setting_of[id(r)].get(k))}" for k in setting_keys)
        if r.dense:
            key = (setting, "dense", "-", 1.0)
        else:
            m = str(c.get("method"))
            key = (setting, _label(m, c.get("method_options") or {}, method_keys.get(m, [])),
                   _label(str(c.get("distribution")), c, sparse_keys), float(c.get("density")))
        g = groups.setdefault(key, Group(*key))
        twin = next((o for o in g.runs if o.seed == r.seed), None)
        if twin is not None:
            notes.append(f"{r.path}: same configuration and seed {r.seed} as {twin.path}; counted once")
            continue
        g.runs.append(r)
    order = {m: i for i, m in enumerate(("dense",) + METHODS)}
    out = sorted(groups.values(), key=lambda g: (g.setting, order.get(g.method.split("[")[0], len(order)), g.method,
                                                 g.distribution, -g.density))
    for g in out:
        g.runs.sort(key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0))
        g.stats = {m.key: mean_ci([m.get(r.summary) for r in g.runs]) for m in METRICS}
    return out, notes


# ---------------------------------------------------------------------------------------------- structure history
def structure_track(summary: dict) -> dict:
    """The method's structure changes per update step, summed over the sparse layers.

    From the summary's ``method.history`` (one record per layer and update:
    dropped, grown, the layer's density after it) and ``layers`` (numel, final
    density). Lists ``step``, ``density`` (overall density of the sparse layers
    after the step; index 0 = the start), ``dropped``/``grown`` (weights) and
    ``dropped_fraction``/``grown_fraction`` (of the weights stored before the
    update). A layer's density before its first record is its first density
    plus (dropped - grown) / numel; BSR records count blocks (times block_size^2).
    """
    history = ((summary.get("method") or {}).get("history")) or []
    layers = {l["name"]: l for l in summary.get("layers") or [] if str(l.get("type", "")).startswith("Sparse")}
    numel = {n: float(l.get("numel") or 0) for n, l in layers.items()}
    total = sum(numel.values())
    empty = {"step": [], "density": [], "dropped": [], "grown": [], "dropped_fraction": [], "grown_fraction": []}
    records = [h for h in history if isinstance(h, dict) and h.get("layer") in layers and numel[h["layer"]] > 0
               and isinstance(h.get("step"), int) and isinstance(h.get("density"), (int, float))]
    if not records or total <= 0:
        return empty
    cfg = summary.get("config") or {}
    unit = int(cfg.get("block_size") or 1) ** 2 if cfg.get("format") == "bsr" else 1
    density = {n: float(l.get("density") or 0.0) for n, l in layers.items()}
    for h in reversed(sorted(records, key=lambda h: h["step"])):  # ends at each layer's first record
        density[h["layer"]] = h["density"] + (h.get("dropped", 0) - h.get("grown", 0)) * unit / numel[h["layer"]]

    def overall():
        return sum(density[n] * numel[n] for n in layers)

    out = {k: [] for k in empty}
    out["step"].append(0)
    out["density"].append(overall() / total)
    for k in ("dropped", "grown", "dropped_fraction", "grown_fraction"):
        out[k].append(0.0)
    by_step: dict[int, list] = {}
    for h in records:
        by_step.setdefault(h["step"], []).append(h)
    for step in sorted(by_step):
        stored = overall()
        dropped = sum(h.get("dropped", 0) for h in by_step[step]) * unit
        grown = sum(h.get("grown", 0) for h in by_step[step]) * unit
        for h in by_step[step]:
            density[h["layer"]] = float(h["density"])
        out["step"].append(step)
        out["density"].append(overall() / total)
        out["dropped"].append(float(dropped))
        out["grown"].append(float(grown))
        out["dropped_fraction"].append(dropped / stored if stored else 0.0)
        out["grown_fraction"].append(grown / stored if stored else 0.0)
    return out


# ---------------------------------------------------------------------------------------------- table
def _cell(stats: dict, metric: Metric, with_n: bool) -> str:
    if stats["mean"] is None:
        return "–"
    mean = metric.fmt.format(stats["mean"])
    if stats["n"] == 1:
        return f"{mean} (n=1)" if with_n else mean
    return f"{mean} ± {(metric.ci_fmt or metric.fmt).format(stats['ci'])}"


def _columns(groups: list[Group]) -> list[Metric]:
    return [m for m in METRICS if any(g.stats[m.key]["n"] for g in groups)]


def markdown_table(groups: list[Group]) -> str:
    metrics = _columns(groups)
    with_setting = any(g.setting for g in groups)
    head = (["setting"] if with_setting else []) + ["method", "distribution", "density", "seeds"] + \
        [m.header for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        row = ([g.setting] if with_setting else []) + [g.method, g.distribution, f"{g.density:g}", str(len(g.runs))]
        row += [_cell(g.stats[m.key], m, with_n=(i == 0)) for i, m in enumerate(metrics)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _csv(groups: list[Group]) -> str:
    metrics = _columns(groups)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "method", "distribution", "density", "n_runs", "seeds", "runs"] +
               [f"{m.key}_{s}" for m in metrics for s in ("mean", "ci95", "std", "n")])
    for g in groups:
        row = [g.setting, g.method, g.distribution, repr(g.density), len(g.runs), " ".join(map(str, g.seeds)),
               " ".join(str(r.path) for r in g.runs)]
        for m in metrics:
            st = g.stats[m.key]
            row += ["" if st[k] is None else (repr(st[k]) if isinstance(st[k], float) else st[k])
                    for k in ("mean", "ci", "std", "n")]
        w.writerow(row)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINES = ("-", "--", "-.", ":")


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _settings(groups):
    return list(dict.fromkeys(g.setting for g in groups))


def plot_accuracy(groups: list[Group], path: Path) -> Path:
    settings = _settings(groups)
    fig, axes = _figure(len(settings), 1, 7.5, 4.8)
    dists = list(dict.fromkeys(g.distribution for g in groups if not g.dense))
    methods = list(dict.fromkeys(g.method for g in groups if not g.dense))
    colors = {d: f"C{i % 10}" for i, d in enumerate(dists)}
    for ax, setting in zip(axes[:, 0], settings):
        mine = [g for g in groups if g.setting == setting and g.stats["test_accuracy"]["n"]]
        ticks = []  # the x positions, those within 2% of each other merged
        for x in sorted(g.stats["final_density"]["mean"] or g.density for g in mine if not g.dense):
            if not ticks or x > ticks[-1] * 1.02:
                ticks.append(x)
        bottom, top = math.inf, -math.inf
        for g in (g for g in mine if g.dense):
            st = g.stats["test_accuracy"]
            bottom, top = min(bottom, st["mean"] - (st["ci"] or 0)), max(top, st["mean"] + (st["ci"] or 0))
            ax.axhline(st["mean"], color="black", ls="--", lw=1.2, label=f"dense (n={st['n']})")
            if st["ci"]:
                ax.axhspan(st["mean"] - st["ci"], st["mean"] + st["ci"], color="black", alpha=0.1, lw=0)
        for m_i, method in enumerate(methods):
            for dist in dists:
                line = sorted((g for g in mine if g.method == method and g.distribution == dist),
                              key=lambda g: -g.density)
                if not line:
                    continue
                x = [g.stats["final_density"]["mean"] or g.density for g in line]
                y = [g.stats["test_accuracy"]["mean"] for g in line]
                e = [g.stats["test_accuracy"]["ci"] or 0.0 for g in line]
                bottom, top = min([bottom] + [a - b for a, b in zip(y, e)]), max([top] + [a + b for a, b in zip(y, e)])
                ax.errorbar(x, y, yerr=e, color=colors[dist], marker=_MARKERS[m_i % len(_MARKERS)],
                            ls=_LINES[m_i % len(_LINES)], capsize=3, label=f"{method}, {dist}")
        if ticks:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{100 * (1 - d):.3g}%" for d in ticks])
            ax.minorticks_off()
            if len(ticks) == 1:
                ax.set_xlim(ticks[0] * 2, ticks[0] / 2)
            else:
                ax.set_xlim(max(ticks) * 1.5, min(ticks) / 1.5)  # inverted: sparsity grows to the right
        if bottom < top:  # confidence intervals of few seeds can leave [0, 100]
            pad = 0.05 * (top - bottom)
            ax.set_ylim(max(0.0, bottom - pad), min(100.0, top + pad))
        ax.set_xlabel("sparsity (log scale of the density; points at the achieved final density)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting or "test accuracy vs sparsity, mean ± 95% CI over seeds", fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _panel_method(groups: list[Group]) -> Optional[str]:
    """The method whose final layer densities a panel shows: one that keeps them fixed if present."""
    methods = list(dict.fromkeys(g.method for g in groups))
    for pref in ("static", "rigl", "set"):
        if pref in methods:
            return pref
    return methods[0] if methods else None


def plot_layer_densities(groups: list[Group], path: Path) -> Optional[Path]:
    panels = []
    for setting in _settings(groups):
        sparse = [g for g in groups if g.setting == setting and not g.dense]
        for density in sorted({g.density for g in sparse}, reverse=True):
            at = [g for g in sparse if g.density == density]
            method = _panel_method(at)
            panels.append((setting, density, method, [g for g in at if g.method == method]))
    if not panels:
        return None
    n_layers = max(len(g.runs[0].summary.get("layers") or []) for *_, gs in panels for g in gs)
    n_dists = max(len(gs) for *_, gs in panels)
    fig, axes = _figure(len(panels), 1, max(7.0, 0.22 * n_layers * max(2, n_dists) + 2), 3.6)
    for ax, (setting, density, method, gs) in zip(axes[:, 0], panels):
        names = [l["name"] for l in gs[0].runs[0].summary.get("layers") or []]
        width = 0.8 / len(gs)
        lowest = 1.0
        for i, g in enumerate(gs):
            per_layer = {}
            for r in g.runs:
                for l in r.summary.get("layers") or []:
                    per_layer.setdefault(l["name"], []).append(float(l.get("density") or 0.0))
            y = [sum(per_layer.get(n, [0.0])) / len(per_layer.get(n, [0.0])) for n in names]
            lowest = min([lowest] + [v for v in y if v > 0])
            ax.bar([j + (i - (len(gs) - 1) / 2) * width for j in range(len(names))], y, width,
                   label=g.distribution, color=f"C{i % 10}")
        if lowest < 0.05:
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("layer density")
        ax.set_title(f"{setting + ': ' if setting else ''}overall density {density:g} — final per-layer densities "
                     f"({method}, mean over seeds)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_structure(groups: list[Group], path: Path) -> Optional[Path]:
    rows = []
    for setting in _settings(groups):
        for method in dict.fromkeys(g.method for g in groups if g.setting == setting and not g.dense):
            tracks = []
            for g in groups:
                if g.setting == setting and g.method == method:
                    t = structure_track(g.runs[0].summary)
                    if len(t["step"]) > 1:
                        tracks.append((f"{g.distribution}, d={g.density:g}, seed {g.runs[0].seed}", t))
            if tracks:
                rows.append((f"{setting + ': ' if setting else ''}{method}", tracks))
    if not rows:
        return None
    fig, axes = _figure(len(rows), 2, 12.0, 3.6)
    for (title, tracks), (left, right) in zip(rows, axes):
        for i, (label, t) in enumerate(tracks):
            color = f"C{i % 10}"
            left.step(t["step"], t["density"], where="post", color=color, label=label)
            right.plot(t["step"][1:], [100 * v for v in t["dropped_fraction"][1:]], color=color, marker=".",
                       label=f"{label}: dropped")
            right.plot(t["step"][1:], [100 * v for v in t["grown_fraction"][1:]], color=color, ls="--",
                       label=f"{label}: grown")
        values = [v for _, t in tracks for v in t["density"] if v > 0]
        if values and max(values) / min(values) > 10:
            left.set_yscale("log")
        left.set_title(f"{title}: density of the sparse layers", fontsize=10)
        left.set_xlabel("step")
        left.set_ylabel("density")
        right.set_title(f"{title}: weights changed per update", fontsize=10)
        right.set_xlabel("step")
        right.set_ylabel("% of stored weights")
        for ax in (left, right):
            ax.grid(True, alpha=0.3)
        left.legend(fontsize=7)
        right.legend(fontsize=6, ncol=2)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- the report
def write_report(dirs, out=None, *, log: Callable[[str], None] = print) -> dict:
    """Write report.md, report.csv and the plots into ``out`` (default: the only DIR); returns what was written."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("report: give at least one DIR (a sweep directory or run directories)")
    if out is None:
        if len(dirs) > 1:
            raise ValueError(f"report: --out is required with several DIRs ({', '.join(map(str, dirs))})")
        out = dirs[0]
    out = Path(out)
    runs, notes = collect_runs(dirs, log=log)
    if not runs:
        raise ValueError(f"report: no finished run (summary.json) under {', '.join(map(str, dirs))}")
    groups, more = group_runs(runs)
    notes += more
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(groups)
    plots, plot_lines = [], []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_lines.append("Plots not written: matplotlib is not installed (pip install matplotlib).")
    else:
        for name, fn, what, why_not in (
                ("accuracy_vs_sparsity.png", plot_accuracy, "test accuracy vs sparsity", ""),
                ("layer_densities.png", plot_layer_densities, "per-layer densities", "no sparse run"),
                ("structure_history.png", plot_structure, "structure changes", "no run changed its structure")):
            p = fn(groups, out / name)
            if p is None:
                plot_lines.append(f"{name}: not written ({why_not}).")
            else:
                plots.append(p)
                plot_lines.append(f"![{what}]({name})")
    md = [f"# Report: {len(runs)} run(s) in {len(groups)} group(s)", "",
          f"From {', '.join(f'`{d}`' for d in dirs)}, {time.strftime('%Y-%m-%d %H:%M')}.", "",
          "Final-epoch test metrics; mean ± 95% confidence interval over seeds (Student t with n − 1 degrees of "
          "freedom, t·s/√n); a single seed shows its value, marked (n=1) in the first metric column. "
          "\"test acc. at best val. epoch\": the test accuracy of the epoch with the best validation accuracy. "
          "OoD AUROC and FGSM accuracy come from the final evaluation (absent with --no-final-eval). "
          "The dense baseline (density 1) has no distribution.", "", table, "", "## Plots", "", *plot_lines]
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "report.csv", _csv(groups))
    log(f"report: {len(runs)} run(s), {len(groups)} group(s) -> {out / 'report.md'}, {out / 'report.csv'}"
        f"{', ' + ', '.join(p.name for p in plots) if plots else ''}")
    return {"markdown": out / "report.md", "csv": out / "report.csv", "plots": plots, "groups": groups,
            "table": table, "notes": notes}


def register(sub) -> None:
    p = sub.add_parser("report", help="table (mean ± 95%% CI over seeds) and plots from finished runs",
                       description="Read every summary.json under the DIRs (sweep or run directories), group the "
                                   "runs by method, distribution and density over seeds, and write report.md, "
                                   "report.csv and plots (accuracy vs sparsity, layer densities, structure "
                                   "history). See docs/training.md.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep directories or run directories")
    p.add_argument("--out", metavar="REPORT_DIR", help="where to write (default: DIR when only one is given)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import error
    from .paths import DiskFullError, check_output_dir

    try:
        if args.out or len(args.dirs) == 1:  # checked before the runs are read: one line, not a traceback
            check_output_dir(args.out or args.dirs[0], "--out" if args.out else "--out (not given: the report goes "
                                                                               "into DIR)")
        res = write_report(args.dirs, args.out, log=lambda m: print(m))
    except ValueError as exc:
        return error("report", exc)
    except DiskFullError as exc:
        error("report", exc)
        return 1
    print(res["table"])
    return 0
