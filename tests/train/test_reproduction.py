"""docs/reproduction.md: verdicts computed by the specs' rules from archived summaries (fabricated here), and
experiments of kind flow (flow repair, no training) run, resumed and reported by the experiments layer."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from sparsestart.train import experiment as ex
from sparsestart.train import reproduction as rp
from sparsestart.train.report import mean_ci
from sparsestart.train.sweep import Cell

SPEC = """\
name: {name}
version: 1
order: {order}
title: Finding {name}
paper: "The paper reports erk 90 > uniform 80."
finding: "erk beats uniform at density 0.1"
protocol: "digits, mlp"
row: {{paper: "erk 90 > uniform 80"}}
options: {{dataset: digits, model: mlp, model_options: {{hidden: [16]}}, epochs: 1, final_eval: false}}
sweeps:
  main:
    methods: [static]
    distributions: [erk, uniform]
    densities: [1.0, 0.1]
    seeds: [0, 1, 2]
verdict:
  claims:
{claims}
"""
ERK_GT_UNIFORM = '    - {a: {sweep: main, distribution: erk}, op: ">", b: {sweep: main, distribution: uniform}}'


def _spec(dir_: Path, name: str = "tiny", claims: str = ERK_GT_UNIFORM, order: int = 1, extra: str = ""):
    dir_.mkdir(parents=True, exist_ok=True)
    p = dir_ / f"{name}.yaml"
    p.write_text(SPEC.format(name=name, claims=claims, order=order) + extra)
    return ex.load_spec(p)


def _archive(docs: Path, spec, values: dict, metric: str = "accuracy") -> None:
    """Fabricated summaries: values = {(distribution or None, density): [value per seed]} in the archive layout."""
    for (dist, density), per_seed in values.items():
        for seed, v in enumerate(per_seed):
            cell = Cell("static", dist, density, seed)
            p = docs / spec.name / "runs" / "main" / cell.name / "summary.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"final": {"test": {metric: v}}, "wall_time_seconds": 36.0, "threads": 2,
                                     "config": {"seed": seed, "density": density}}))


# ---------------------------------------------------------------------------------------------- one claim
@pytest.mark.parametrize("op, a, b, margin, outcome", [
    (">", (90, 1), (80, 1), 0, "holds"),        # intervals apart, a above
    (">", (85, 6), (80, 6), 0, "weak"),         # means ordered, intervals overlap
    (">", (80, 1), (85, 1), 0, "fails"),        # reversed
    (">", (80, 0), (80, 0), 0, "fails"),        # equal is not greater
    ("<", (0.02, 0.001), (0.05, 0.001), 0, "holds"),
    ("<", (0.06, 0.001), (0.05, 0.001), 0, "fails"),
    (">=", (79.6, 1), (80, 1), 0.5, "holds"),   # within the margin
    (">=", (78, 1), (80, 1), 0.5, "weak"),      # below, intervals within the margin
    (">=", (70, 1), (80, 1), 0.5, "fails"),
    ("<=", (0.031, 0.0), (0.03, 0.0), 0.005, "holds"),
    ("~", (80.9, 0.1), (80, 0.1), 1.0, "holds"),
    ("~", (82, 1), (80, 0.5), 1.0, "weak"),     # 2 apart, intervals 0.5 apart
    ("~", (90, 1), (80, 1), 1.0, "fails"),
])
def test_decide_each_operator(op, a, b, margin, outcome):
    st = lambda m, c: {"mean": m, "ci": c, "n": 3}  # noqa: E731
    assert rp.decide(op, st(*a), st(*b), margin) == outcome


# ---------------------------------------------------------------------------------------------- whole findings
@pytest.mark.parametrize("erk, uniform, verdict", [
    ([90.0, 91.0, 90.5], [80.0, 81.0, 80.5], "reproduced"),
    ([84.0, 90.0, 87.0], [80.0, 86.0, 83.0], "partly"),        # ordered in the means only
    ([80.0, 81.0, 80.5], [90.0, 91.0, 90.5], "not reproduced"),  # reversed
])
def test_verdict_from_fabricated_summaries(tmp_path, erk, uniform, verdict):
    spec = _spec(tmp_path / "experiments")
    docs = tmp_path / "docs" / "experiments"
    _archive(docs, spec, {("erk", 0.1): [v / 100 for v in erk], ("uniform", 0.1): [v / 100 for v in uniform]})
    r = rp.evaluate(spec, docs)
    assert r["verdict"] == verdict
    # the numbers shown are the mean ± 95% CI of the fabricated values (in points)
    st = mean_ci(erk)
    assert r["claims"][0]["a"] == f"{st['mean']:.2f} ± {st['ci']:.2f} (n=3)"


def test_mixed_claims_not_run_incomplete_and_provisional(tmp_path):
    claims = "\n".join([ERK_GT_UNIFORM,
                        '    - {a: {sweep: main, distribution: erk}, op: "~", b: {sweep: main, density: 1.0}, margin: 1}'])
    spec = _spec(tmp_path / "experiments", claims=claims)
    docs = tmp_path / "docs" / "experiments"
    assert rp.evaluate(spec, docs)["verdict"] == "not run yet"
    _archive(docs, spec, {("erk", 0.1): [0.90, 0.91, 0.905], ("uniform", 0.1): [0.80, 0.81, 0.805]})
    r = rp.evaluate(spec, docs)
    assert r["verdict"] == "incomplete: 1 of 2 claims have runs"
    assert [c["outcome"] for c in r["claims"]] == ["holds", "no runs"]
    _archive(docs, spec, {(None, 1.0): [0.99, 0.995]})  # two seeds of the dense baseline, far above erk
    r = rp.evaluate(spec, docs)
    assert [c["outcome"] for c in r["claims"]] == ["holds", "fails"]
    assert r["verdict"] == "partly (provisional: fewer than 3 seeds)"


def test_seed_paired_difference(tmp_path):
    # gap = dense - erk per seed: 5, 6, 7 (mean 6) against a constant 10: the gap is smaller
    claims = ('    - {a: {diff: [{sweep: main, density: 1.0}, {sweep: main, distribution: erk}], label: gap}, op: "<", '
              'b: {value: 10}}')
    spec = _spec(tmp_path / "experiments", claims=claims)
    docs = tmp_path / "docs" / "experiments"
    _archive(docs, spec, {(None, 1.0): [0.95, 0.96, 0.97], ("erk", 0.1): [0.90, 0.90, 0.90]})
    r = rp.evaluate(spec, docs)
    assert r["verdict"] == "reproduced"
    st = mean_ci([5.0, 6.0, 7.0])
    assert r["claims"][0]["a"].startswith(f"{st['mean']:.2f} ± {st['ci']:.2f}")
    assert r["claims"][0]["text"] == "gap < 10"


@pytest.mark.parametrize("claims, message", [
    ('    - {a: {sweep: other, distribution: erk}, op: ">", b: {sweep: main, distribution: uniform}}',
     "sweep 'other' is not one of the spec's sweeps"),
    ('    - {a: {sweep: main}, op: ">", b: {sweep: main, distribution: uniform}}', "picks 3 groups"),
    ('    - {a: {sweep: main, distribution: erk}, op: "=>", b: {sweep: main, distribution: uniform}}', "op '=>'"),
    ('    - {a: {sweep: main, distribution: erk}, op: ">", b: {sweep: main, distribution: uniform}, metric: iq}',
     "metric 'iq'"),
    ('    - {a: {sweep: main, distribution: erk}, op: ">", b: {sweep: main, distribution: uniform}, margin: -1}',
     "margin -1"),
    ('    - {a: {value: 1}, op: ">", b: {value: 2}}', "at least one side must be measured"),
])
def test_bad_verdicts_are_refused_when_the_spec_is_read(tmp_path, claims, message):
    with pytest.raises(ex.ExperimentError, match=message):
        _spec(tmp_path, claims=claims)


def test_untestable_and_reference_specs(tmp_path):
    d = tmp_path / "experiments"
    untestable = _spec(d, "untestable", extra='testable: false\nwhy: "needs ImageNet-scale training"\n')
    assert rp.evaluate(untestable, tmp_path)["verdict"] == "not testable here: needs ImageNet-scale training"
    (d / "ref.yaml").write_text('name: ref\nversion: 1\nkind: reference\ntitle: Theorem\nfinding: "exists"\n'
                                'link: docs/theory.md\nverdict: {stated: "reproduced (by construction)"}\n')
    assert rp.evaluate(ex.load_spec(d / "ref.yaml"), tmp_path)["verdict"] == "reproduced (by construction)"
    (d / "bad.yaml").write_text('name: bad\nversion: 1\ntitle: T\nfinding: "f"\ntestable: false\n'
                                'sweeps: {main: {methods: [static], distributions: [erk], densities: [0.1], seeds: [0]}}\n')
    with pytest.raises(ex.ExperimentError, match="testable: false needs why"):
        ex.load_spec(d / "bad.yaml")
    (d / "bad.yaml").write_text('name: bad\nversion: 1\nkind: reference\ntitle: T\nfinding: "f"\nlink: x.md\n'
                                'verdict: {claims: []}\n')
    with pytest.raises(ex.ExperimentError, match="states the linked page's outcome"):
        ex.load_spec(d / "bad.yaml")
    with pytest.raises(ex.ExperimentError, match="nothing to run here"):
        ex.run(ex.load_spec(d / "ref.yaml"), tmp_path / "runs", log=lambda m: None)


def test_reproduction_page_has_a_row_per_finding_with_its_verdict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "experiments"
    docs = tmp_path / "docs" / "experiments"
    good = _spec(d, "good", order=2)
    bad = _spec(d, "bad", order=1)
    _spec(d, "later", order=3)  # nothing archived
    _spec(d, "untestable", order=4, extra='testable: false\nwhy: "no GPU"\n')
    _archive(docs, good, {("erk", 0.1): [0.90, 0.91, 0.905], ("uniform", 0.1): [0.80, 0.81, 0.805]})
    _archive(docs, bad, {("erk", 0.1): [0.80, 0.81, 0.805], ("uniform", 0.1): [0.90, 0.91, 0.905]})
    out = ex.reproduction(docs, tmp_path / "docs" / "reproduction.md", d, log=lambda m: None)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [Finding")]
    # sorted by order: bad (1), good (2), later (3), untestable (4)
    assert [r.split("]")[0] for r in rows] == ["| [Finding bad", "| [Finding good", "| [Finding later",
                                               "| [Finding untestable"]
    assert rows[0].endswith("**not reproduced** |") and rows[1].endswith("**reproduced** |")
    assert rows[2].endswith("**not run yet** |") and rows[3].endswith("**not testable here: no GPU** |")
    assert "erk 90 > uniform 80" in rows[1]  # row.paper
    assert f"{statistics.fmean([90.0, 91.0, 90.5]):.2f} ±" in rows[1]
    # 12 fabricated runs of 36 s on 2 threads
    assert f"{12 * 36 * 2 / 3600:.2f} CPU-hours" in text and "12 training runs" in text
    assert "## Finding good" in text and "| holds |" in text


# ---------------------------------------------------------------------------------------------- kind: flow
FLOW = """\
name: flowtiny
version: 1
kind: flow
title: Flow tiny
finding: "flags as printed"
flow:
  models:
    LeNet: {model: lenet5, num_classes: 10}
  input_shape: [1, 28, 28]
  densities: [0.02, 0.005]
  distributions: [uniform]
  seeds: [0, 1]
  paper_flags:
    LeNet: {uniform: [null, 7]}
verdict: {tolerance: 1, min_seeds: 2}
"""


def test_flow_experiment_runs_resumes_and_reports(tmp_path):
    p = tmp_path / "flowtiny.yaml"
    p.write_text(FLOW)
    spec = ex.load_spec(p)
    root, docs = tmp_path / "runs", tmp_path / "docs"
    assert [r["state"] for r in ex.status(spec, root)] == ["pending"] * 4
    ex.run(spec, root, estimate_first=False, log=lambda m: None)
    assert [r["state"] for r in ex.status(spec, root)] == ["finished"] * 4
    path = root / "flowtiny" / "v1" / "flow" / "results.json"
    first = path.read_text()
    lines = []
    ex.run(spec, root, estimate_first=False, log=lines.append)  # nothing left: no cell measured again
    assert path.read_text() == first and not any("edges added" in line for line in lines)
    cells = json.loads(first)["cells"]
    assert all(c["max_flags"] == 2 * 5 for c in cells.values())  # LeNet-5: 5 masked layers
    page = ex.report(spec, root, docs, log=lambda m: None).read_text()
    flags = [cells[ex.flow_cell_key("LeNet", "uniform", 0.005, s)]["flags"] for s in (0, 1)]
    st = mean_ci(flags)
    assert f"| 0.005 | {st['mean']:.2f} ± {st['ci']:.2f} / 7 |" in page
    verdict = rp.evaluate(spec, docs)
    assert len(verdict["claims"]) == 1  # the null paper value is no claim
    outcome = rp.decide("~", st, {"mean": 7.0, "ci": 0.0}, 1.0)
    assert verdict["verdict"] == {"holds": "reproduced", "weak": "partly", "fails": "not reproduced"}[outcome]
    assert f"**{verdict['verdict']}**" in page


def test_flow_spec_errors_name_the_key(tmp_path):
    p = tmp_path / "flowtiny.yaml"
    p.write_text(FLOW.replace("densities: [0.02, 0.005]", "densities: [0.02, 1.0]"))
    with pytest.raises(ex.ExperimentError, match="1.0 has nothing to repair"):
        ex.load_spec(p)
    p.write_text(FLOW.replace("uniform: [null, 7]", "uniform: [7]"))
    with pytest.raises(ex.ExperimentError, match="one value"):
        ex.load_spec(p)
    p.write_text(FLOW.replace("kind: flow\n", ""))
    with pytest.raises(ex.ExperimentError, match="missing key 'sweeps'"):
        ex.load_spec(p)


def test_claims_between_two_groups_at_chance_decide_nothing(tmp_path):
    """ERK 10.5% vs uniform 10.0% on ten classes orders two untrained networks: 'at chance', not 'holds'."""
    extra = "  chance: 10\n"
    spec = _spec(tmp_path / "experiments", claims=ERK_GT_UNIFORM + "\n" +
                 '    - {a: {sweep: main, distribution: erk}, op: ">", b: {sweep: main, density: 1.0}}',
                 extra=extra)
    docs = tmp_path / "docs" / "experiments"
    _archive(docs, spec, {("erk", 0.1): [0.105, 0.106, 0.104], ("uniform", 0.1): [0.10, 0.10, 0.10],
                          (None, 1.0): [0.90, 0.91, 0.92]})
    r = rp.evaluate(spec, docs)
    # the first claim would "hold" (intervals apart) without the chance rule; the second compares with a
    # trained network and is decided as usual
    assert [c["outcome"] for c in r["claims"]] == ["at chance", "fails"]
    assert r["verdict"] == "not reproduced"
    only = _spec(tmp_path / "experiments2", extra=extra)
    _archive(tmp_path / "docs2", only, {("erk", 0.1): [0.105, 0.106, 0.104], ("uniform", 0.1): [0.10, 0.10, 0.10]})
    assert rp.evaluate(only, tmp_path / "docs2")["verdict"].startswith("not testable here")
    # a margin of 0 puts 10.5 above chance: decided again
    sharp = _spec(tmp_path / "experiments3", extra="  chance: 10\n  chance_margin: 0\n")
    _archive(tmp_path / "docs3", sharp, {("erk", 0.1): [0.105, 0.106, 0.104], ("uniform", 0.1): [0.10, 0.10, 0.10]})
    assert rp.evaluate(sharp, tmp_path / "docs3")["claims"][0]["outcome"] == "holds"


@pytest.mark.parametrize("extra, message", [("  chance: -1\n", "chance -1 must be a number"),
                                            ("  chance_margin: 2\n", "chance_margin needs chance")])
def test_bad_chance_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        _spec(tmp_path / "experiments", extra=extra)


def test_claim_text_names_a_metric_other_than_the_findings(tmp_path):
    claims = "\n".join([ERK_GT_UNIFORM,
                        '    - {a: {sweep: main, distribution: erk}, op: "<=", b: {sweep: main, density: 1.0}, '
                        'metric: ece, margin: 0.005}'])
    spec = _spec(tmp_path / "experiments", claims=claims)
    texts = [c["text"] for c in rp.evaluate(spec, tmp_path / "docs" / "experiments")["claims"]]
    assert not texts[0].endswith(" in test_accuracy") and " in " not in texts[0]
    assert texts[1].endswith(" in ece")
