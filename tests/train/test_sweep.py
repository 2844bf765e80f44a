"""``sparsestart sweep`` and ``sparsestart report`` on a tiny generated dataset and on hand-written summaries."""
from __future__ import annotations

import csv
import json
import math

import pytest

from sparsestart.cli import main
from sparsestart.train import trainer as T
from sparsestart.train.config import TrainConfig
from sparsestart.train.report import structure_track

# Student t quantiles t_{0.975, dof}, from tables (not computed by the code under test)
T975 = {1: 12.706204736174698, 2: 4.302652729911275}
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_args(data_dir, out, *extra):
    return ["sweep", "--out", str(out), "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--model", "mlp",
            "--model-option", "hidden=[16]", "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
            "--no-final-eval", "--no-progress", "--threads", "1", *extra]


@pytest.fixture
def count_trainers(monkeypatch):
    """Records (run directory name, resume) of every Trainer built."""
    built = []
    real = T.Trainer.__init__

    def spy(self, cfg, out_dir, **kw):
        built.append((str(out_dir).rsplit("/", 1)[-1], kw.get("resume", False)))
        real(self, cfg, out_dir, **kw)

    monkeypatch.setattr(T.Trainer, "__init__", spy)
    return built


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grid_cells_skip_on_rerun_and_report(fmnist_dir, tmp_path, capsys, count_trainers):
    out = tmp_path / "sw"
    grid = ["--methods", "static,rigl", "--distributions", "uniform", "erk", "--densities", "0.3", "1.0",
            "--method-option", "rigl:update_every=2"]
    args = sweep_args(fmnist_dir, out, *grid, "--seeds", "0", "1")
    assert main(args) == 0, capsys.readouterr().err
    expected = {"dense-s0", "dense-s1"} | {f"{m}-{d}-d0.3-s{s}" for m in ("static", "rigl")
                                           for d in ("uniform", "erk") for s in (0, 1)}
    assert {p.name for p in out.iterdir() if p.is_dir()} == expected
    assert sorted(name for name, _ in count_trainers) == sorted(expected)  # the dense baseline once per seed
    for name in expected:
        cfg = json.loads((out / name / "summary.json").read_text())["config"]
        assert cfg["seed"] == int(name[-1]) and cfg["epochs"] == 2 and cfg["model_options"] == {"hidden": [16]}
        if name.startswith("dense"):
            assert cfg["density"] == 1.0 and cfg["method"] == "static" and cfg["method_options"] == {}
        else:
            method, dist, _, _ = name.split("-")
            assert (cfg["method"], cfg["distribution"], cfg["density"]) == (method, dist, 0.3)
            assert cfg["method_options"] == ({"update_every": 2} if method == "rigl" else {})
    rigl = json.loads((out / "rigl-erk-d0.3-s0" / "summary.json").read_text())
    assert rigl["method"]["history"], "rigl changed no structure; the structure plot would be empty"
    spec = json.loads((out / "sweep.json").read_text())
    assert spec["grid"] == {"methods": ["static", "rigl"], "distributions": ["uniform", "erk"],
                            "densities": [0.3, 1.0], "seeds": [0, 1]}
    assert sorted(spec["cells"]) == sorted(expected)
    printed = capsys.readouterr().out
    assert "[1/10] dense-s0" in printed and "[10/10] rigl-erk-d0.3-s1" in printed
    for f in ("accuracy_vs_sparsity.png", "layer_densities.png", "structure_history.png"):
        assert (out / f).read_bytes()[:8] == PNG, f
    md = (out / "report.md").read_text()
    assert "| dense | - | 1 | 2 |" in md and "| rigl | erk | 0.3 | 2 |" in md
    with open(out / "report.csv") as f:
        groups = {(r["method"], r["distribution"]): r for r in csv.DictReader(f)}
    assert set(groups) == {("dense", "-"), ("static", "uniform"), ("static", "erk"), ("rigl", "uniform"),
                           ("rigl", "erk")}
    accs = [json.loads((out / f"static-erk-d0.3-s{s}" / "summary.json").read_text())["final"]["test"]["accuracy"]
            for s in (0, 1)]
    assert float(groups[("static", "erk")]["test_accuracy_mean"]) == pytest.approx(50 * sum(accs))

    # the same command again: nothing is trained, nothing rewritten
    stamps = {n: ((out / n / "summary.json").stat().st_mtime_ns, (out / n / "checkpoint.pt").stat().st_mtime_ns)
              for n in expected}
    count_trainers.clear()
    assert main(args) == 0
    assert count_trainers == []
    assert stamps == {n: ((out / n / "summary.json").stat().st_mtime_ns,
                          (out / n / "checkpoint.pt").stat().st_mtime_ns) for n in expected}
    assert capsys.readouterr().out.count("finished before, skipped") == 10
    # ... and a grid with one more seed trains only the new cells
    assert main(sweep_args(fmnist_dir, out, *grid, "--seeds", "0", "1", "2")) == 0
    assert sorted(n for n, _ in count_trainers) == sorted(n.replace("s0", "s2") for n in expected if n.endswith("s0"))


def test_interrupted_cell_is_resumed(fmnist_dir, tmp_path, capsys, monkeypatch, count_trainers):
    out = tmp_path / "sw"
    args = sweep_args(fmnist_dir, out, "--methods", "static", "--distributions", "uniform", "--densities", "0.3",
                      "--seeds", "0", "1", "--no-report")
    real_fit = T.Trainer.fit

    def interrupted(self, stop_after=None):
        if self.out.name == "static-uniform-d0.3-s1":
            real_fit(self, stop_after=1)
            raise KeyboardInterrupt
        return real_fit(self, stop_after)

    monkeypatch.setattr(T.Trainer, "fit", interrupted)
    assert main(args) == 130
    assert "sparsestart sweep --resume" in capsys.readouterr().out
    cell = out / "static-uniform-d0.3-s1"
    assert (cell / "checkpoint.pt").is_file() and not (cell / "summary.json").exists()
    before = rows(cell)
    assert [r["epoch"] for r in before] == [1]
    monkeypatch.setattr(T.Trainer, "fit", real_fit)
    count_trainers.clear()
    assert main(["sweep", "--resume", str(out), "--threads", "1"]) == 0
    assert count_trainers == [("static-uniform-d0.3-s1", True)]  # s0 skipped, s1 resumed, not restarted
    after = rows(cell)
    assert [r["epoch"] for r in after] == [1, 2] and after[0] == before[0]
    assert "resuming at epoch 1" in capsys.readouterr().out
    # the resumed cell equals the same run trained straight through
    cfg = TrainConfig(**json.loads((cell / "summary.json").read_text())["config"])
    T.Trainer(cfg, tmp_path / "straight").fit()
    def untimed(rs):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "elapsed_seconds")} for r in rs]

    assert untimed(after) == untimed(rows(tmp_path / "straight"))


# ---------------------------------------------------------------------------------------------- report
def fake_summary(acc, *, method="static", distribution="erk", density=0.1, seed=0, nll=0.5, ece=0.05, ood=None,
                 fgsm=None, history=(), layers=None, **cfg):
    config = TrainConfig(dataset="fashion-mnist", model="mlp", method=method, distribution=distribution,
                         density=density, seed=seed, **cfg).to_dict()
    test = {"accuracy": acc, "nll": nll, "ece": ece}
    if ood is not None:
        test["ood_auroc"] = dict(zip(("gaussian", "uniform", "shifted"), ood))
    if fgsm is not None:
        test["fgsm_accuracy"] = fgsm
    layers = layers or [{"name": "fc1", "type": "SparseLinear", "numel": 1000, "nnz": int(1000 * density),
                         "density": density}, {"name": "fc2", "type": "Linear", "numel": 100, "nnz": 100,
                                               "density": 1.0}]
    return {"config": config, "final": {"epoch": 2, "test": test}, "best_val": {"epoch": 1, "test": {"accuracy": acc}},
            "layers": layers, "density": density, "flops": {"forward_per_sample": 2.5e6},
            "method": {"name": method, "history": list(history)}, "train_seconds": 10.0, "wall_time_seconds": 12.0}


def write_runs(base, runs):
    for name, s in runs.items():
        (base / name).mkdir(parents=True)
        (base / name / "summary.json").write_text(json.dumps(s))


def test_report_table_equals_hand_computed_mean_and_ci(tmp_path, capsys):
    accs, nlls = [0.90, 0.92, 0.88], [0.30, 0.36, 0.33]
    dense_acc, dense_ood = [0.95, 0.93], [(0.90, 0.80, 0.70), (0.94, 0.84, 0.76)]
    runs = {f"static-erk-s{i}": fake_summary(a, seed=i, nll=n) for i, (a, n) in enumerate(zip(accs, nlls))}
    runs |= {f"dense-s{i}": fake_summary(a, density=1.0, seed=i, ood=o, fgsm=0.5 + i / 10)
             for i, (a, o) in enumerate(zip(dense_acc, dense_ood))}
    runs["rigl-uniform-s0"] = fake_summary(0.85, method="rigl", distribution="uniform")
    write_runs(tmp_path / "runs", runs)
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    # static/erk: mean 90.00, s = 2.0, CI = t(0.975, 2) * 2 / sqrt(3) = 4.968...; NLL mean 0.33, s = 0.03
    ci = T975[2] * 2.0 / math.sqrt(3)
    nll_ci = T975[2] * 0.03 / math.sqrt(3)
    assert f"| static | erk | 0.1 | 3 | 90.00 ± {ci:.2f} | 90.00 ± {ci:.2f} | 0.330 ± {nll_ci:.3f} |" in md
    assert "| rigl | uniform | 0.1 | 1 | 85.00 (n=1) | 85.00 | 0.500 |" in md
    # dense: 94.00 ± t(0.975, 1) * sqrt(2) / sqrt(2); OoD and FGSM columns from the final evaluation
    assert f"| dense | - | 1 | 2 | 94.00 ± {T975[1] * 1.0:.2f} |" in md
    assert "OoD AUROC Gaussian" in md and "FGSM acc. (%)" in md
    dense_row = next(line for line in md.splitlines() if line.startswith("| dense"))
    assert f"0.920 ± {T975[1] * math.sqrt(0.0008) / math.sqrt(2):.3f}" in dense_row  # Gaussian AUROC 0.90, 0.94
    assert f"55.00 ± {T975[1] * math.sqrt(50) / math.sqrt(2):.2f}" in dense_row  # FGSM 50%, 60%: s = sqrt(50)
    # rows: dense first, then methods in the library's order
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:] == \
        ["| dense", "| static", "| rigl"]
    with open(tmp_path / "rep" / "report.csv") as f:
        got = {r["method"]: r for r in csv.DictReader(f)}
    assert float(got["static"]["test_accuracy_mean"]) == pytest.approx(90.0)
    assert float(got["static"]["test_accuracy_ci95"]) == pytest.approx(ci, rel=1e-9)
    assert float(got["static"]["test_accuracy_std"]) == pytest.approx(2.0)
    assert got["rigl"]["test_accuracy_ci95"] == "" and got["rigl"]["test_accuracy_n"] == "1"
    assert got["static"]["ood_auroc_gaussian_n"] == "0" and float(got["dense"]["ood_auroc_shifted_mean"]) == \
        pytest.approx(0.73)
    assert "| static | erk |" in capsys.readouterr().out  # the table is printed too
    for f in ("accuracy_vs_sparsity.png", "layer_densities.png"):
        assert (tmp_path / "rep" / f).read_bytes()[:8] == PNG
    assert not (tmp_path / "rep" / "structure_history.png").exists() and "no run changed its structure" in md


def test_report_keeps_other_options_apart_and_counts_a_seed_once(tmp_path):
    runs = {"a": fake_summary(0.8, epochs=1), "b": fake_summary(0.9, epochs=2), "c": fake_summary(0.7, epochs=2)}
    write_runs(tmp_path / "runs", runs)
    assert main(["report", str(tmp_path / "runs")]) == 0
    md = (tmp_path / "runs" / "report.md").read_text()
    assert "| setting | method |" in md
    assert "| epochs=1 | static | erk | 0.1 | 1 | 80.00 (n=1) |" in md
    assert "| epochs=2 | static | erk | 0.1 | 1 | 90.00 (n=1) |" in md  # c: same config and seed as b
    assert "counted once" in md


def test_structure_track_by_hand():
    # fc1 (100 weights) and fc2 (50) pruned at steps 5 and 10: 40 -> 30 -> 20 and 30 -> 25 -> 20 stored
    history = [{"step": 5, "layer": "fc1", "dropped": 10, "grown": 0, "density": 0.3},
               {"step": 5, "layer": "fc2", "dropped": 5, "grown": 0, "density": 0.5},
               {"step": 10, "layer": "fc1", "dropped": 10, "grown": 0, "density": 0.2},
               {"step": 10, "layer": "fc2", "dropped": 5, "grown": 0, "density": 0.4}]
    layers = [{"name": "fc1", "type": "SparseLinear", "numel": 100, "density": 0.2},
              {"name": "fc2", "type": "SparseLinear", "numel": 50, "density": 0.4},
              {"name": "head", "type": "Linear", "numel": 30, "density": 1.0}]
    t = structure_track({"config": {"format": "csr"}, "layers": layers, "method": {"history": history}})
    assert t["step"] == [0, 5, 10]
    assert t["density"] == pytest.approx([70 / 150, 55 / 150, 40 / 150])
    assert t["dropped"] == [0.0, 15.0, 15.0] and t["grown"] == [0.0, 0.0, 0.0]
    assert t["dropped_fraction"] == pytest.approx([0.0, 15 / 70, 15 / 55])
    assert structure_track({"layers": layers, "method": {"history": []}})["step"] == []


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, expected", [
    (["--methods", "magic"], ["--methods", "'magic'", "static, imp, str, rigl, set, gradual, edgepopup"]),
    (["--distributions", "uniform,zipf"], ["--distributions", "'zipf'", "uniform", "erk"]),
    (["--densities", "0"], ["--densities", "'0'", "(0, 1]"]),
    (["--densities", "0.1", "1.5"], ["--densities", "'1.5'", "(0, 1]"]),
    (["--densities", "ten"], ["--densities", "'ten'", "not a number"]),
    (["--densities", ","], ["--densities", "empty list", "(0, 1]"]),
    (["--seeds", "x"], ["--seeds", "'x'", "integer"]),
    (["--methods", "static", "rigl", "--method-option", "imp:levels=2"], ["imp:levels=2", "--methods", "static, rigl"]),
    (["--model", "resnet9000"], ["cell static-uniform-d0.1-s0", "unknown model", "convnet_small"]),
    (["--format", "bsr"], ["--block-size"]),
])
def test_bad_input_names_the_argument_and_what_is_allowed(args, expected, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "never"
    base = sweep_args(fmnist_dir, out, "--methods", "static", "--distributions", "uniform", "--densities", "0.1")
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsestart sweep: error:"), err
    for e in expected:
        assert e in err, (e, err)
    assert not out.exists()


def test_sweep_and_report_usage_errors(fmnist_dir, tmp_path, capsys):
    assert main(["sweep", "--methods", "static"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    out = tmp_path / "sw"
    grid = ["--methods", "static", "--distributions", "uniform", "--densities", "0.3", "--no-report"]
    (out / "sweep.json").parent.mkdir()
    (out / "sweep.json").write_text(json.dumps({"format": "sparsestart-sweep", "version": 1, "grid": {},
                                                "options": {"epochs": 5, "dataset": "fashion-mnist"},
                                                "explicit": [], "cells": []}))
    assert main(sweep_args(fmnist_dir, out, *grid)) == 2
    err = capsys.readouterr().err
    assert "other training options" in err and "epochs: saved 5, now 2" in err
    assert main(["sweep", "--resume", str(out), "--epochs", "3"]) == 2
    assert "takes the grid and options" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty"), str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err
