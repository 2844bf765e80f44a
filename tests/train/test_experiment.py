"""The experiments layer: specs are checked before anything runs, runs resume, reports come from the runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsestart.train import experiment as ex

SPEC = """\
name: {name}
version: 1
title: Tiny check
paper: "A paper reports X."
finding: "sparse is close to dense"
options: {{dataset: digits, model: mlp, model_options: {{hidden: [32]}}, epochs: 1, batch_size: 64,
          final_eval: false, progress: false, threads: 1}}
sweeps:
  main:
    methods: [static]
    distributions: [erk]
    densities: [1.0, 0.3]
    seeds: [0, 1]
"""


def _spec(tmp_path: Path, text: str = SPEC, name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text.format(name=name))
    return p


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("version: 1", "version: 0"), "version"),
    (lambda s: s + "colour: blue\n", "unknown key(s) colour"),
    (lambda s: s.replace("name: tiny", "name: other"), "must equal the file name"),
    (lambda s: s.replace("    seeds: [0, 1]\n", ""), "give seeds explicitly"),
    (lambda s: s.replace("densities: [1.0, 0.3]", "densities: [1.0, 3]"), "outside the accepted range"),
    (lambda s: s.replace("methods: [static]", "methods: [magic]"), "--methods"),
    (lambda s: s.replace("epochs: 1,", "epochs: 1, colour: 2,"), "unknown key 'colour'"),
])
def test_bad_specs_are_refused_before_running(tmp_path, edit, message):
    p = tmp_path / "tiny.yaml"
    p.write_text(edit(SPEC.format(name="tiny")))
    with pytest.raises(ex.ExperimentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ex.load_spec(p)


def test_unknown_name_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    _spec(tmp_path / "experiments")
    with pytest.raises(ex.ExperimentError, match="known experiments: tiny"):
        ex.load_spec("nope")
    assert ex.load_spec("tiny").name == "tiny"


def test_run_status_resume_and_report(tmp_path):
    spec = ex.load_spec(_spec(tmp_path))
    root, docs = tmp_path / "runs", tmp_path / "docs"
    est = ex.estimate(spec, root, log=lambda m: None)
    assert est["cells"] == 4 and est["done"] == 0 and est["left_seconds"] > 0  # 2 densities x 2 seeds

    # interrupted after the first sweep cell: the rest resumes, finished runs are not trained again
    lines = []
    res = ex.run(spec, root, docs_root=docs, log=lines.append)
    assert res["failed"] == []
    assert any("CPU-hours" in line for line in lines)
    rows = ex.status(spec, root)
    assert [r["state"] for r in rows] == ["finished"] * 4
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    first = (root / "tiny" / "v1" / "main" / "dense-s0" / "summary.json").stat().st_mtime_ns
    lines.clear()
    ex.run(spec, root, docs_root=docs, log=lines.append)
    assert (root / "tiny" / "v1" / "main" / "dense-s0" / "summary.json").stat().st_mtime_ns == first
    assert sum("finished before, skipped" in line for line in lines) == 4
    assert ex.estimate(spec, root, log=lambda m: None)["left_seconds"] == 0

    versions = json.loads((root / "tiny" / "v1" / ex.VERSIONS_FILE).read_text())
    assert sorted(versions) == sorted(f"main/{r['cell']}" for r in rows)

    path = ex.report(spec, root, docs, log=lambda m: None)
    text = path.read_text()
    # the table comes from the runs: each group's mean test accuracy is the mean of its seeds
    for cell in ("dense", "static-erk-d0.3"):
        accs = [json.loads((root / "tiny/v1/main" / f"{cell}-s{s}" / "summary.json").read_text())["final"]["test"]
                ["accuracy"] for s in (0, 1)]
        assert f"{100 * sum(accs) / 2:.2f} ±" in text
    assert "sparsestart sweep --out" in text and "--densities 1.0 0.3" in text
    assert "4 of 4 planned finished" in text
    archived = sorted(p.parent.name for p in (docs / "tiny" / "runs" / "main").glob("*/summary.json"))
    assert archived == sorted(r["cell"] for r in rows)
    # regenerating from the archive alone (runs deleted) gives the same page
    import shutil
    shutil.rmtree(root)
    again = ex.report(spec, root, docs, log=lambda m: None).read_text()
    assert again.split("**Runs:**")[1] == text.split("**Runs:**")[1]

    # a fresh checkout runs the experiment again: the archived runs are restored, not trained again,
    # with the code versions that finished them
    (docs / "tiny" / ex.VERSIONS_FILE).write_text(json.dumps({k: "old-code" for k in versions}))
    lines.clear()
    res = ex.run(spec, root, estimate_first=False, docs_root=docs, log=lines.append)
    assert res["failed"] == [] and sum("finished before, skipped" in line for line in lines) == 4
    assert any("4 run(s) finished before are archived" in line for line in lines)
    assert json.loads((root / "tiny" / "v1" / ex.VERSIONS_FILE).read_text()) == {k: "old-code" for k in versions}
    # one archived with other settings is refused by name, never reused
    shutil.rmtree(root)
    changed = docs / "tiny" / "runs" / "main" / "dense-s1" / "summary.json"
    summary = json.loads(changed.read_text())
    summary["config"]["batch_size"] = 32
    changed.write_text(json.dumps(summary))
    res = ex.run(spec, root, estimate_first=False, docs_root=docs, log=lines.append)
    assert res["failed"] == ["main/dense-s1"]


def test_report_without_runs_says_how_to_run(tmp_path):
    spec = ex.load_spec(_spec(tmp_path))
    with pytest.raises(ex.ExperimentError, match="sparsestart experiment run tiny"):
        ex.report(spec, tmp_path / "runs", tmp_path / "docs")


def test_repository_specs_are_valid():
    specs = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))
    assert specs, "experiments/ holds the reproduction study's specs"
    root = Path(__file__).resolve().parents[2]
    for p in specs:
        spec = ex.load_spec(p)
        if spec.kind == "train":
            assert spec.sweeps and all(len(spec.planned(s)) > 0 for s in spec.sweeps)
        elif spec.kind == "flow":
            assert spec.flow.cells()
        # every finding decides its row of docs/reproduction.md, and its links lead somewhere
        assert spec.verdict is not None or not spec.testable, p
        assert not spec.link or (root / spec.link).is_file(), (p, spec.link)


FLOW_SPEC = """\
name: {name}
version: 1
kind: flow
title: Tiny flow check
paper: "A paper counts dead units."
finding: "repair adds edges"
flow:
  models:
    LeNet: {{model: lenet5, num_classes: 10}}
  input_shape: [1, 28, 28]
  densities: [0.05, 0.01]
  distributions: [uniform, erk]
  seeds: [0, 1]
  setup: exact
  paper_flags:
    LeNet: {{uniform: [0, 2], erk: [0, 1]}}
"""


def test_flow_experiment_runs_resumes_and_reports(tmp_path):
    # kind: flow is run, resumed, listed and reported by the same entry points as a training experiment.
    spec = ex.load_spec(_spec(tmp_path, FLOW_SPEC, name="tinyflow"))
    root, docs = tmp_path / "runs", tmp_path / "docs"
    logs = []
    ex.run(spec, root, estimate_first=False, log=logs.append)
    rows = ex.status(spec, root)
    assert len(rows) == 8 and all(r["state"] == "finished" for r in rows)
    results = json.loads((spec.run_dir(root) / "flow" / "results.json").read_text())
    assert set(results["cells"]) == {r["cell"] for r in rows}
    assert all(c["code_version"] and c["edges"] >= 0 for c in results["cells"].values())
    # A second run measures nothing again.
    logs.clear()
    ex.run(spec, root, estimate_first=False, log=logs.append)
    assert not any("edges added" in m for m in logs)
    path = ex.report(spec, root, docs, log=lambda m: None)
    text = path.read_text()
    assert "Tiny flow check" in text and "8 of 8 measured" in text and "| 0.01 |" in text
    assert json.loads((docs / "tinyflow" / "results.json").read_text()) == results
