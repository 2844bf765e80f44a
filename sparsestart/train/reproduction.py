"""``docs/reproduction.md``: one row per finding of the papers, with a verdict computed from archived runs.

Every experiment spec (``experiments/NAME.yaml``, :mod:`sparsestart.train.experiment`) names one
finding. Its ``verdict:`` states the rule that decides it, as *claims* over groups of runs::

    verdict:
      metric: test_accuracy        # a column of sparsestart.train.report.METRICS (default test_accuracy)
      min_seeds: 3                 # fewer seeds in a group: the verdict is marked provisional
      claims:
        - {a: {sweep: high, distribution: balanced}, op: ">=", b: {sweep: high, distribution: erk}}
        - {a: {sweep: high, distribution: erk}, op: ">", b: {sweep: high, distribution: uniform}}
        - {a: {diff: [{sweep: w1, density: 1.0}, {sweep: w1, distribution: erk}]}, op: ">",
           b: {diff: [{sweep: w4, density: 1.0}, {sweep: w4, distribution: erk}]}, label: "gap shrinks"}

A group is the runs of one (method, distribution, density) of one sweep, over its seeds (the keys
``method``/``distribution``/``density`` pick it; together they must name exactly one); ``diff: [A, B]``
is A - B paired by seed; ``value: X`` is a constant. Specs of ``kind: flow`` need no claims: every
cell of ``paper_flags`` becomes ``ours ~ paper`` with margin ``tolerance`` (default 1 flag).

A claim is decided on the means and 95% confidence intervals (Student t over seeds,
:func:`sparsestart.train.report.mean_ci`) of its two sides:

* ``a > b``: *holds* when the intervals do not overlap (a above), *weak* when only the means are
  ordered, *fails* otherwise (reversed or equal). ``a < b`` likewise.
* ``a >= b`` (``margin`` m, default 0; "matches or beats"): *holds* when mean a >= mean b - m, *weak*
  when below that but the intervals come within m, *fails* when a's whole interval is more than m
  below b's. ``a <= b`` likewise.
* ``a ~ b`` (margin m): *holds* when |mean a - mean b| <= m, *weak* when the intervals come within m,
  *fails* otherwise.

A finding is **reproduced** when every claim holds, **not reproduced** when every claim fails,
**partly** otherwise; **not run yet** when no claim has runs, **incomplete** when only some have;
a verdict resting on a group of fewer than ``min_seeds`` seeds is marked *provisional*.
``chance: X`` (the metric of a network that learnt nothing, e.g. 10 points of accuracy for ten
classes) with ``chance_margin: m`` (default 5): a claim whose two measured groups both have a mean
below X + m is **at chance** and decides nothing (an ordering of two untrained networks is noise);
it is left out of the verdict, and a finding whose every claim is at chance is not testable here. Specs with
``testable: false`` show "not testable here" and their ``why``; ``kind: reference`` specs point to a
page measured elsewhere (``link``, a path from the checkout's root) and state its outcome
(``verdict: {stated: TEXT}``).

Everything is read from what ``sparsestart experiment report`` archived under
``docs/experiments/NAME/`` (committed), not from the run directories, so the page can be
regenerated from the repository alone: ``sparsestart experiment reproduction``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["Ref", "Claim", "VerdictSpec", "load_verdict", "evaluate", "write_reproduction", "OPS",
           "RULE_TEXT"]

OPS = (">", ">=", "~", "<", "<=")
_CLAIM_KEYS = {"a", "op", "b", "margin", "metric", "label"}
_REF_KEYS = {"sweep", "method", "distribution", "density", "label", "diff", "value"}
_VERDICT_KEYS = {"metric", "min_seeds", "claims", "tolerance", "stated", "chance", "chance_margin"}

RULE_TEXT = (
    "A claim `a > b` **holds** when the 95% confidence intervals over seeds do not overlap (a above), is "
    "**weak** when only the means are ordered, and **fails** otherwise; `a >= b` (margin m) holds when mean a "
    ">= mean b - m, is weak when below that but the intervals come within m, fails when a's whole interval "
    "is more than m below b's; `a ~ b` (margin m) holds when the means differ by at most m, is weak when the "
    "intervals come within m, fails otherwise. A finding is **reproduced** when every claim holds, **not "
    "reproduced** when every claim fails, **partly** otherwise; *provisional* when a group has fewer seeds "
    "than the spec's `min_seeds` (default 3). A claim whose two groups are both within the spec's "
    "`chance_margin` of chance level (`chance`, e.g. 10% accuracy for ten classes) is **at chance**: it "
    "compares two networks that learnt nothing, so it is left out of the verdict.")


@dataclass
class Ref:
    """One side of a claim: a group of runs, the seed-paired difference of two, or a constant."""
    label: str
    sweep: Optional[str] = None
    method: Optional[str] = None
    distribution: Optional[str] = None  # None: the dense baseline
    density: Optional[float] = None
    seeds: list = field(default_factory=list)
    diff: Optional[tuple] = None  # (Ref, Ref)
    value: Optional[float] = None
    flow_cell: Optional[tuple] = None  # (model label, distribution, density) of a flow experiment

    def cell_name(self, seed: int) -> str:
        from .sweep import Cell

        return Cell(self.method, self.distribution, self.density, seed).name


@dataclass
class Claim:
    a: Ref
    op: str
    b: Ref
    margin: float
    metric: str
    label: str = ""


@dataclass
class VerdictSpec:
    claims: list
    min_seeds: int = 3
    metric: str = "test_accuracy"
    stated: str = ""  # kind reference: the outcome of the linked page
    chance: Optional[float] = None  # the metric at chance level; claims between two groups near it decide nothing
    chance_margin: float = 5.0


# ---------------------------------------------------------------------------------------------- reading the spec
def _metrics() -> dict:
    from .report import METRICS

    return {m.key: m for m in METRICS}


def _ref(spec, body, where: str) -> Ref:
    if not isinstance(body, dict) or set(body) - _REF_KEYS:
        raise ValueError(f"{where}: a group is a mapping with keys among {', '.join(sorted(_REF_KEYS))}, got {body!r}")
    if "value" in body:
        v = body["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: value {v!r} must be a number")
        return Ref(label=str(body.get("label", f"{v:g}")), value=float(v))
    if "diff" in body:
        pair = body["diff"]
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"{where}: diff must be a list of two groups [A, B] (A - B, paired by seed)")
        x, y = _ref(spec, pair[0], where + ".diff[0]"), _ref(spec, pair[1], where + ".diff[1]")
        return Ref(label=str(body.get("label", f"({x.label}) - ({y.label})")), diff=(x, y))
    if spec.kind != "train":
        raise ValueError(f"{where}: groups of runs need a spec of kind train, this one is {spec.kind}")
    sweeps = {s.name: s for s in spec.sweeps}
    name = body.get("sweep")
    if name not in sweeps:
        raise ValueError(f"{where}: sweep {name!r} is not one of the spec's sweeps ({', '.join(sweeps)})")
    combos = []
    for cell, _, _ in spec.planned(sweeps[name]):
        c = (cell.method if not cell.dense else "static", cell.distribution, cell.density)
        if c not in combos:
            combos.append(c)
    want_density = body.get("density")
    picked = [c for c in combos
              if ("method" not in body or c[0] == body["method"] or (c[2] == 1.0 and body["method"] == "dense"))
              and ("distribution" not in body or c[1] == body["distribution"])
              and (want_density is None or c[2] == float(want_density))]
    if len(picked) != 1:
        listing = ", ".join(f"method {m} distribution {d or '-'} density {x:g}" for m, d, x in combos)
        raise ValueError(f"{where}: {body!r} picks {len(picked)} groups of sweep {name!r}, not one; it has: {listing}")
    m, d, x = picked[0]
    seeds = [cell.seed for cell, _, _ in spec.planned(sweeps[name])
             if (cell.method if not cell.dense else "static", cell.distribution, cell.density) == picked[0]]
    default = "dense" if x == 1.0 else f"{m} {d} d={x:g}"
    return Ref(label=str(body.get("label", f"{default} ({name})")), sweep=name, method=m, distribution=d,
               density=x, seeds=seeds)


def load_verdict(spec, body) -> VerdictSpec:
    """The checked ``verdict:`` of ``spec`` (an :class:`~sparsestart.train.experiment.ExperimentSpec`)."""
    if not isinstance(body, dict) or set(body) - _VERDICT_KEYS:
        raise ValueError(f"a mapping with keys among {', '.join(sorted(_VERDICT_KEYS))}, got {body!r}")
    metric = body.get("metric", "test_accuracy")
    metrics = _metrics()
    if spec.kind == "train" and metric not in metrics:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(metrics)}")
    min_seeds = body.get("min_seeds", 3)
    if isinstance(min_seeds, bool) or not isinstance(min_seeds, int) or min_seeds < 1:
        raise ValueError(f"min_seeds {min_seeds!r} must be an integer >= 1")
    out = VerdictSpec(claims=[], min_seeds=min_seeds, metric=metric, stated=str(body.get("stated") or ""))
    for key in ("chance", "chance_margin"):
        if key in body and (isinstance(body[key], bool) or not isinstance(body[key], (int, float))
                            or body[key] < 0):
            raise ValueError(f"{key} {body[key]!r} must be a number >= 0 (in the metric's unit)")
    if "chance_margin" in body and "chance" not in body:
        raise ValueError("chance_margin needs chance: the metric's value at chance level")
    if "chance" in body:
        out.chance, out.chance_margin = float(body["chance"]), float(body.get("chance_margin", 5.0))
    if spec.kind == "reference":
        if not out.stated or "claims" in body:
            raise ValueError("a spec of kind reference states the linked page's outcome: verdict: {stated: TEXT}")
        return out
    if "stated" in body:
        raise ValueError("stated: belongs to specs of kind reference; this spec's verdict comes from its runs")
    if spec.kind == "flow":
        tol = body.get("tolerance", 1.0)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"tolerance {tol!r} must be a number >= 0 (flags)")
        f = spec.flow
        for model, rules in f.paper_flags.items():
            for rule, values in rules.items():
                for density, v in zip(f.densities, values):
                    if v is None:
                        continue
                    a = Ref(label=f"{model} {rule} d={density:g}", flow_cell=(model, rule, density), seeds=f.seeds)
                    out.claims.append(Claim(a, "~", Ref(label=f"{v:g}", value=float(v)), float(tol), "flags"))
        if not out.claims:
            raise ValueError("a flow verdict compares with flow.paper_flags, which is empty")
        return out
    claims = body.get("claims")
    if not isinstance(claims, list) or not claims:
        raise ValueError("claims must be a non-empty list of {a: GROUP, op: OP, b: GROUP}")
    for i, c in enumerate(claims):
        where = f"claims[{i}]"
        if not isinstance(c, dict) or set(c) - _CLAIM_KEYS or not {"a", "op", "b"} <= set(c):
            raise ValueError(f"{where}: give a, op and b (and optionally margin, metric, label), got {c!r}")
        if c["op"] not in OPS:
            raise ValueError(f"{where}: op {c['op']!r} is not one of {', '.join(OPS)}")
        margin = c.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"{where}: margin {margin!r} must be a number >= 0 (in the metric's unit)")
        m = c.get("metric", metric)
        if m not in metrics:
            raise ValueError(f"{where}: metric {m!r} is not one of {', '.join(metrics)}")
        a, b = _ref(spec, c["a"], where + ".a"), _ref(spec, c["b"], where + ".b")
        if a.value is not None and b.value is not None:
            raise ValueError(f"{where}: at least one side must be measured")
        out.claims.append(Claim(a, c["op"], b, float(margin), m, str(c.get("label", ""))))
    return out


# ---------------------------------------------------------------------------------------------- deciding
def _values(ref: Ref, metric: str, docs: Path, flow_results: dict) -> dict:
    """{seed: value} of a group from the archive (no entry for seeds without a run)."""
    if ref.diff is not None:
        x, y = (_values(r, metric, docs, flow_results) for r in ref.diff)
        return {s: x[s] - y[s] for s in x if s in y}
    if ref.flow_cell is not None:
        from ..init.flow_study import flow_cell_key

        model, dist, density = ref.flow_cell
        out = {}
        for seed in ref.seeds:
            cell = flow_results.get(flow_cell_key(model, dist, density, seed))
            if cell is not None and metric in cell:
                out[seed] = float(cell[metric])
        return out
    get = _metrics()[metric].get
    out = {}
    for seed in ref.seeds:
        p = docs / "runs" / ref.sweep / ref.cell_name(seed) / "summary.json"
        if p.is_file():
            v = get(json.loads(p.read_text(encoding="utf-8")))
            if v is not None:
                out[seed] = float(v)
    return out


def _stats(ref: Ref, metric: str, docs: Path, flow_results: dict) -> dict:
    from .report import mean_ci

    if ref.value is not None:
        return {"mean": ref.value, "ci": 0.0, "n": None, "constant": True}
    return mean_ci(list(_values(ref, metric, docs, flow_results).values()))


def decide(op: str, a: dict, b: dict, margin: float = 0.0) -> str:
    """"holds", "weak" or "fails" for ``a OP b`` from two ``mean_ci`` dicts (a missing CI counts as 0)."""
    if op in ("<", "<="):
        return decide(op.replace("<", ">"), b, a, margin)
    ma, mb = a["mean"], b["mean"]
    ca, cb = a.get("ci") or 0.0, b.get("ci") or 0.0
    if op == ">":
        if ma - ca > mb + cb:
            return "holds"
        return "weak" if ma > mb else "fails"
    if op == ">=":
        if ma >= mb - margin:
            return "holds"
        return "weak" if ma + ca >= mb - cb - margin else "fails"
    if op == "~":
        if abs(ma - mb) <= margin:
            return "holds"
        gap = max(ma - ca - (mb + cb), mb - cb - (ma + ca), 0.0)
        return "weak" if gap <= margin else "fails"
    raise ValueError(f"op {op!r} is not one of {', '.join(OPS)}")


def _fmt(st: dict, metric: str) -> str:
    if st.get("constant"):
        return f"{st['mean']:g}"
    m = _metrics().get(metric)
    fmt = m.fmt if m is not None else "{:.3g}"
    text = fmt.format(st["mean"])
    if st.get("ci") is not None:
        text += " ± " + (m.ci_fmt or m.fmt if m is not None else "{:.2g}").format(st["ci"])
    return text + f" (n={st['n']})"


def evaluate(spec, docs_root) -> dict:
    """``{"verdict", "claims": [{"text", "outcome", "a", "b"}], "provisional"}`` of one spec from its archive."""
    if not spec.testable:
        return {"verdict": f"not testable here: {spec.why.strip()}", "claims": [], "provisional": False}
    v = spec.verdict
    if v is None:
        return {"verdict": "no verdict rule in the spec", "claims": [], "provisional": False}
    if spec.kind == "reference":
        return {"verdict": v.stated, "claims": [], "provisional": False}
    docs = Path(docs_root) / spec.name
    flow_results = {}
    if spec.kind == "flow" and (docs / "results.json").is_file():
        flow_results = json.loads((docs / "results.json").read_text(encoding="utf-8")).get("cells", {})
    rows, provisional = [], False
    for c in v.claims:
        sa, sb = (_stats(r, c.metric, docs, flow_results) for r in (c.a, c.b))
        op = {">=": "≥", "<=": "≤"}.get(c.op, c.op) + (f" (margin {c.margin:g})" if c.margin else "")
        # A claim on another metric than the finding's says which: four rows of one finding on ECE,
        # two AUROCs and FGSM accuracy would otherwise read as the same claim four times.
        on = f" in {c.metric}" if c.metric != v.metric else ""
        text = (c.label + ": " if c.label else "") + f"{c.a.label} {op} {c.b.label}{on}"
        if sa["mean"] is None or sb["mean"] is None:
            rows.append({"text": text, "outcome": "no runs", "a": None, "b": None})
            continue
        few = any(s.get("n") is not None and s["n"] < v.min_seeds for s in (sa, sb))
        provisional |= few
        # only plain groups: a seed-paired difference near the chance value says nothing about chance
        at_chance = v.chance is not None and all(
            r.diff is None and r.value is None and s["mean"] < v.chance + v.chance_margin
            for r, s in ((c.a, sa), (c.b, sb)))
        outcome = "at chance" if at_chance else decide(c.op, sa, sb, c.margin)
        rows.append({"text": text, "outcome": outcome, "a": _fmt(sa, c.metric),
                     "b": _fmt(sb, c.metric), "few_seeds": few})
    outcomes = [r["outcome"] for r in rows]
    measured = [o for o in outcomes if o != "no runs"]
    decided = [o for o in measured if o != "at chance"]
    if not measured:
        verdict = "not run yet"
    elif len(measured) < len(outcomes):
        verdict = f"incomplete: {len(measured)} of {len(outcomes)} claims have runs"
    elif not decided:
        verdict = "not testable here: every claim compares groups at chance level"
    elif all(o == "holds" for o in decided):
        verdict = "reproduced"
    elif all(o == "fails" for o in decided):
        verdict = "not reproduced"
    else:
        verdict = "partly"
    if provisional and decided:
        verdict += f" (provisional: fewer than {v.min_seeds} seeds)"
    return {"verdict": verdict, "claims": rows, "provisional": provisional}


# ---------------------------------------------------------------------------------------------- the page
def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _cpu_hours(docs: Path) -> tuple[float, int]:
    hours, runs = 0.0, 0
    for p in sorted(docs.glob("runs/*/*/summary.json")):
        s = json.loads(p.read_text(encoding="utf-8"))
        hours += float(s.get("wall_time_seconds") or 0.0) * int(s.get("threads") or 1) / 3600
        runs += 1
    if (docs / "results.json").is_file():
        hours += float(json.loads((docs / "results.json").read_text()).get("cpu_seconds") or 0.0) / 3600
    return hours, runs


def write_reproduction(specs: list, docs_root, out, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out`` (docs/reproduction.md): the table of findings and a section per finding."""
    from .checkpoint import atomic_write_text

    docs_root, out = Path(docs_root), Path(out)
    rel = Path(_relpath(docs_root, out.parent))
    specs = sorted(specs, key=lambda s: (s.order, s.name))
    results = {s.name: evaluate(s, docs_root) for s in specs}
    md = ["# Reproduction of the papers' findings", "",
          "Generated by `sparsestart experiment reproduction` from the experiment specs in "
          "[`experiments/`](../experiments/) and the runs archived under "
          f"[`{rel.as_posix()}/`]({rel.as_posix()}/); do not edit by hand. Each finding's verdict follows the "
          "rule of its spec (`verdict:`):", "", RULE_TEXT, "",
          "| finding | paper | our protocol | ours | verdict |", "|---|---|---|---|---|"]
    total_hours, total_runs = 0.0, 0
    for s in specs:
        r = results[s.name]
        page = docs_root / f"{s.name}.md"
        title = f"[{_one_line(s.title)}](#{_anchor(s.title)})"
        finding = _one_line(s.row.get("finding") or s.finding)
        paper = _one_line(s.row.get("paper") or s.paper)
        protocol = _one_line(s.row.get("protocol") or s.protocol)
        decided = [c for c in r["claims"] if c["outcome"] != "no runs"]
        if decided:
            counts = {o: sum(c["outcome"] == o for c in decided) for o in ("holds", "weak", "fails", "at chance")}
            ours = f"{len(decided)} claims: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n)
            if len(decided) <= 3:
                ours += "; " + "; ".join(f"{c['a']} vs {c['b']}" for c in decided)
        elif s.kind == "reference" and s.link:
            ours = f"see [{s.link}]({_relpath(s.link, out.parent)})"
        else:
            ours = "-"
        hours, runs = _cpu_hours(docs_root / s.name)
        total_hours, total_runs = total_hours + hours, total_runs + runs
        md.append(f"| {title}: {finding} | {paper} | {protocol} | {_one_line(ours)} | **{_one_line(r['verdict'])}** |")
    md += ["", f"Compute archived so far: {total_hours:.2f} CPU-hours (wall time x threads): {total_runs} training "
               "runs and the flow-repair measurements.", ""]
    for s in specs:
        r = results[s.name]
        page = docs_root / f"{s.name}.md"
        md += [f"## {s.title}", "", f"Spec: [`experiments/{s.name}.yaml`](../experiments/{s.name}.yaml) "
               f"(kind {s.kind}, version {s.version})"
               + (f"; report: [{(rel / page.name).as_posix()}]({(rel / page.name).as_posix()})" if page.is_file() else
                  "; no report yet" if s.kind != "reference" else "")
               + (f"; see [{s.link}]({_relpath(s.link, out.parent)})" if s.link else "") + ".", ""]
        md += [f"**Finding:** {s.finding.strip()}", ""]
        if s.paper:
            md += [f"**The paper:** {s.paper.strip()}", ""]
        if s.protocol:
            md += [f"**Our protocol:** {s.protocol.strip()}", ""]
        md += [f"**Verdict:** {r['verdict']}", ""]
        if r["claims"]:
            md += ["| claim | a | b | outcome |", "|---|---|---|---|"]
            for c in r["claims"]:
                md.append(f"| {_one_line(c['text'])} | {c['a'] or '-'} | {c['b'] or '-'} | {c['outcome']} |")
            md.append("")
    atomic_write_text(out, "\n".join(md) + "\n")
    log(f"reproduction: {len(specs)} findings -> {out}")
    return out


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(target).resolve(), Path(start).resolve())


def _anchor(title: str) -> str:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens.
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")
