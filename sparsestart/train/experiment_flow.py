"""Experiments of ``kind: flow``: flow repair measured on untrained networks, no training.

A flow spec (``flow:`` models, densities, distributions, seeds, the paper's flag counts; see
:mod:`sparsestart.train.experiment` for the spec format) is run, resumed and reported by the same
``sparsestart experiment run|status|report NAME`` commands as a training experiment: every cell
(network, rule, density, seed) is one :func:`sparsestart.init.flow_study.measure_cell`, appended to
``ROOT/NAME/vVERSION/flow/results.json`` as it finishes (so an interrupted run resumes at the next
cell), and the report copies that file to ``docs/experiments/NAME/results.json`` and tabulates flags
(what the paper's Tables 6-7 count) and edges added, mean ± 95% CI over seeds.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..init.flow_study import flow_cell_key
from .checkpoint import atomic_write_text
from .experiment_spec import ExperimentError, ExperimentSpec, code_version, hours, report_header, tally

__all__ = ["FLOW_FILE", "flow_results", "flow_estimate", "flow_run", "flow_status", "flow_report"]

FLOW_FILE = "results.json"


def flow_results(base: Path) -> dict:
    p = base / "flow" / FLOW_FILE
    if not p.is_file():
        return {"cells": {}, "cpu_seconds": 0.0}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"{p}: unreadable ({type(exc).__name__}: {exc}); delete it to measure again") from None


def _flow_cell(spec: ExperimentSpec, dense: dict, model: str, dist: str, density: float, seed: int) -> dict:
    import torch

    from ..init.flow_study import build_network, measure_cell

    if model not in dense:
        m = spec.flow.models[model]
        dense[model] = build_network(m["model"], m["num_classes"], seed=0)
    t0 = time.perf_counter()
    out = measure_cell(dense[model], density, dist, seed, setup=spec.flow.setup, input_shape=spec.flow.input_shape)
    out["seconds"] = time.perf_counter() - t0
    out["threads"] = torch.get_num_threads()
    return out


def flow_estimate(spec: ExperimentSpec, root, log) -> dict:
    done = flow_results(spec.run_dir(root))
    cells = spec.flow.cells()
    left = [c for c in cells if flow_cell_key(*c) not in done["cells"]]
    per_model: dict = {}
    dense: dict = {}
    for model, dist, density, seed in left:
        if model not in per_model:  # one timed cell per network (the densest: the slowest to sample)
            log(f"estimate: timing one flow-repair cell of {model}")
            _flow_cell(spec, dense, model, dist, max(spec.flow.densities), seed)  # warm-up (first call builds)
            per_model[model] = _flow_cell(spec, dense, model, dist, max(spec.flow.densities), seed)
    import torch

    seconds = sum(per_model[m]["seconds"] for m, _, _, _ in left)
    return {"cells": len(cells), "done": len(cells) - len(left), "left_seconds": seconds,
            "left_cpu_hours": seconds * torch.get_num_threads() / 3600,
            "done_cpu_hours": float(done.get("cpu_seconds") or 0.0) / 3600}


def flow_run(spec: ExperimentSpec, root, *, runtime: dict, estimate_first: bool, log) -> dict:
    import torch

    from .paths import RunLock

    if runtime.get("threads"):
        torch.set_num_threads(int(runtime["threads"]))
    base = spec.run_dir(root)
    (base / "flow").mkdir(parents=True, exist_ok=True)
    atomic_write_text(base / "spec.yaml", spec.path.read_text(encoding="utf-8") if spec.path else "")
    lock = RunLock(base / "flow")
    lock.acquire(f"experiment {spec.tag}")
    try:
        if estimate_first:
            est = flow_estimate(spec, root, log)
            log(f"experiment {spec.tag}: {est['done']} of {est['cells']} cell(s) measured; the rest needs about "
                f"{hours(est['left_seconds'])} of wall time, {est['left_cpu_hours']:.3f} CPU-hours")
        results = flow_results(base)
        results.setdefault("cells", {})
        version = code_version()
        dense: dict = {}
        for model, dist, density, seed in spec.flow.cells():
            key = flow_cell_key(model, dist, density, seed)
            if key in results["cells"]:
                continue
            cell = _flow_cell(spec, dense, model, dist, density, seed)
            cell["code_version"] = version
            results["cells"][key] = cell
            results["cpu_seconds"] = float(results.get("cpu_seconds") or 0.0) + cell["seconds"] * cell["threads"]
            atomic_write_text(base / "flow" / FLOW_FILE, json.dumps(results, indent=1, sort_keys=True) + "\n")
            log(f"experiment {spec.tag}: {key}: {cell['edges']} edges added, {cell['flags']} flags "
                f"({cell['seconds']:.1f} s)")
    finally:
        lock.release()
    log(f"experiment {spec.tag}: done; write the report with: sparsestart experiment report {spec.name}")
    return {"sweeps": {}, "failed": []}


def flow_status(spec: ExperimentSpec, root=None) -> list[dict]:
    """One row per cell of a flow spec: finished (measured) or pending."""
    done = flow_results(spec.run_dir(root)).get("cells", {})
    rows = []
    for model, dist, density, seed in spec.flow.cells():
        key = flow_cell_key(model, dist, density, seed)
        cell = done.get(key)
        rows.append(dict(sweep="flow", cell=key, state="finished" if cell else "pending", accuracy=None,
                         seconds=cell.get("seconds") if cell else None))
    return rows


def _pm(values, fmt: str = "{:.1f}") -> str:
    from .report import mean_ci

    st = mean_ci(values)
    if st["mean"] is None:
        return "-"
    text = fmt.format(st["mean"])
    return text + (" ± " + fmt.format(st["ci"]) if st["ci"] is not None else f" (n={st['n']})")


def flow_report(spec: ExperimentSpec, root, docs_root: Path, log) -> Path:
    import platform

    import torch

    docs = docs_root / spec.name
    src = spec.run_dir(root) / "flow" / FLOW_FILE
    dst = docs / FLOW_FILE
    if src.is_file():
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    if not dst.is_file():
        raise ExperimentError(f"experiment {spec.tag}: nothing measured under {src.parent}; "
                              f"run: sparsestart experiment run {spec.name}")
    results = json.loads(dst.read_text(encoding="utf-8"))
    cells = results.get("cells", {})
    f = spec.flow
    versions = tally(c.get("code_version", "not recorded") for c in cells.values())
    measured = sum(flow_cell_key(*c) in cells for c in f.cells())
    md = [f"# {spec.title}", "",
          f"Experiment `{spec.tag}` (spec: [`experiments/{spec.name}.yaml`](../../experiments/{spec.name}.yaml), "
          f"kind flow: no training). Generated by `sparsestart experiment report {spec.name}` from the measurements "
          f"archived in [`{spec.name}/{FLOW_FILE}`]({spec.name}/{FLOW_FILE}); do not edit by hand.", ""]
    md += report_header(spec)
    setup = ("exactly round(p_l N_l) weights per layer, budget-exact balanced, one edge removed per edge added "
             "(`keep_budget=True`)" if f.setup == "exact" else
             "the released code's choices: Bernoulli masks, the budget-losing balanced rule, no edge removed")
    md += [f"**Setup:** `{f.setup}`: {setup}; input {tuple(f.input_shape)}; seeds {', '.join(map(str, f.seeds))}; "
           f"`repair_flow(method=\"random_addition\")`.", "",
           f"**Cells:** {measured} of {len(f.cells())} measured; "
           f"{float(results.get('cpu_seconds') or 0.0):.0f} CPU-seconds; code versions: "
           + ", ".join(f"`{v}` ({n} cells)" for v, n in versions) + f"; {platform.machine()}, torch {torch.__version__}.",
           "", f"**Command:** `sparsestart experiment run {spec.name} && sparsestart experiment report {spec.name}`"
           + (f"; see also [{spec.link}]({os.path.relpath(spec.link, docs_root)})" if spec.link else "") + ".", "",
           "Mean ± 95% CI over seeds (Student t, n − 1 degrees of freedom). *Flags*: (layer, direction) pairs "
           "with any dead unit before repair, the count the paper's Tables 6-7 print (their released code sums "
           "`(degree == 0).any()`); *paper*: the tables' value (mean of 3 runs); *edges*: weights really added.", ""]
    for label, m in f.models.items():
        mx = next((cells[flow_cell_key(label, d, x, s)]["max_flags"] for d in f.distributions for x in f.densities
                   for s in f.seeds if flow_cell_key(label, d, x, s) in cells), None)
        md += [f"## {label} ({m['model']}, {m['num_classes']} classes)", "",
               f"Flags (at most {mx if mx is not None else '?'}): ours / paper.", "",
               "| density | " + " | ".join(f"{d} flags" for d in f.distributions) + " |",
               "|---|" + "---:|" * len(f.distributions)]
        for i, x in enumerate(f.densities):
            row = []
            for d in f.distributions:
                vals = [cells[k]["flags"] for s in f.seeds if (k := flow_cell_key(label, d, x, s)) in cells]
                paper = (f.paper_flags.get(label, {}).get(d) or [None] * len(f.densities))[i]
                row.append(f"{_pm(vals, '{:.2f}')} / {'-' if paper is None else f'{paper:g}'}")
            md.append(f"| {x:g} | " + " | ".join(row) + " |")
        md += ["", "Edges (weights) added / dead units before repair:", "",
               "| density | " + " | ".join(f.distributions) + " |", "|---|" + "---:|" * len(f.distributions)]
        for x in f.densities:
            row = []
            for d in f.distributions:
                got = [cells[k] for s in f.seeds if (k := flow_cell_key(label, d, x, s)) in cells]
                row.append(f"{_pm([c['edges'] for c in got], '{:.0f}')} / {_pm([c['dead'] for c in got], '{:.0f}')}")
            md.append(f"| {x:g} | " + " | ".join(row) + " |")
        md.append("")
    if spec.verdict is not None:
        from .reproduction import evaluate

        r = evaluate(spec, docs_root)
        md += ["## Verdict", "", f"**{r['verdict']}** (rule: see [docs/reproduction.md](../reproduction.md)).", "",
               "| cell | ours (flags) | paper | outcome |", "|---|---|---|---|"]
        md += [f"| {c['text'].split(' ~ ')[0]} | {c['a'] or '-'} | {c['b'] or '-'} | {c['outcome']} |"
               for c in r["claims"]]
        md.append("")
    path = docs_root / f"{spec.name}.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    log(f"experiment {spec.tag}: report -> {path}; refresh docs/reproduction.md with: "
        f"sparsestart experiment reproduction")
    return path
