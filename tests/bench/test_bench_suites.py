"""Smoke tests of the training, algorithms and sampling benchmark suites (tiny sizes) and of the layer
time-vs-nnz fits. They check the JSON shape, that the correctness checks ran and passed, and that the
markdown report renders the new sections; no timing is asserted (DESIGN.md)."""
import json
import math

import pytest
import torch

from sparsestart import ops
from tests.util import threads

needs_native = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")


def _run(tmp_path, *argv):
    from bench import __main__ as cli

    md_path = tmp_path / "smoke.md"
    with threads(torch.get_num_threads()):
        cli.main(["--quick", "--threads", "1", "--name", "smoke", "--out-dir", str(tmp_path), "--docs", str(md_path),
                  *argv])
    return json.loads((tmp_path / "smoke.json").read_text()), md_path.read_text()


def _layer_records(name, numel, intercept, slope, dense, densities=(0.5, 0.2, 0.1, 0.05, 0.01, 0.001)):
    """Layer-suite records whose sparse time is exactly intercept + slope * nnz and dense time constant."""
    recs = []
    for d in densities:
        nnz = round(d * numel)
        t = intercept + slope * nnz
        for p in ("forward", "forward+backward"):
            recs.append({"layer": name, "kind": "linear", "batch": 8, "format": "csr", "density": d,
                         "density_actual": nnz / numel, "nnz_elements": nnz, "pass": p,
                         "times": {"sparse": {"median": t}, "dense": {"median": dense}, "masked": {"median": dense}},
                         "speedup_vs_dense": dense / t, "speedup_vs_masked": dense / t})
    return recs


def test_layer_fits_slope_intercept_and_break_even():
    from bench import fit

    numel = 10**6
    recs = (_layer_records("crosses", numel, 1e-3, 1e-8, 2.5e-3)      # t = 1 ms + 10 ms * d: equal to dense at 0.15
            + _layer_records("always faster", numel, 1e-4, 1e-9, 1.0)
            + _layer_records("always slower", numel, 1.0, 1e-9, 1e-3))
    rows = {(f["layer"], f["pass"]): f for f in fit.layer_fits(recs)}
    assert len(rows) == 6
    f = rows[("crosses", "forward")]
    assert f["slope_ns_per_nnz"] == pytest.approx(10.0, rel=1e-6)
    assert f["intercept_ms"] == pytest.approx(1.0, rel=1e-6)
    assert f["r2"] == pytest.approx(1.0)
    assert f["numel"] == numel and f["points"] == 6
    assert f["break_even_fit"] == pytest.approx(0.15, rel=1e-6)
    assert f["break_even_measured"]["density"] == pytest.approx(0.15, rel=1e-6)
    assert fit.format_break_even(f["break_even_measured"]) == "0.15"
    assert fit.format_break_even(rows[("always faster", "forward+backward")]["break_even_measured"]) == "> 0.5"
    assert fit.format_break_even(rows[("always slower", "forward")]["break_even_measured"]) == "< 0.001"


@needs_native
def test_layer_free_bound_counts_only_the_time_outside_the_layers():
    """A sparse step of 100 ms whose profile spends 60 of 80 ms in layer ops (sparse kernels, their autograd
    functions, dense convolutions) leaves 25 ms elsewhere: against a 200 ms dense step at most 8x."""
    from bench import report

    ops_ = [{"op": "sparsestart::_native_conv2d", "self_ms": 30.0}, {"op": "_Conv2DFunctionBackward", "self_ms": 5.0},
            {"op": "aten::mkldnn_convolution", "self_ms": 25.0}, {"op": "aten::native_batch_norm", "self_ms": 15.0},
            {"op": "aten::max_pool2d_with_indices", "self_ms": 5.0}]
    rec = {"model": "vgg11", "density": 0.01, "malloc": "default", "title": "VGG", "distribution": "erk", "batch": 2,
           "times": {"sparse": {"median": 0.1}, "dense": {"median": 0.2}}, "speedup_vs_dense": 2.0,
           "profile": {"sparse": {"total_ms": 80.0, "ops": ops_}}}
    assert report.layer_free_bound(rec) == pytest.approx(8.0)
    (row,) = report._step_targets([rec])
    assert row[1] == "2.00x" and "missed" in row[2] and "allows 8.00x" in row[2]
    assert report.layer_free_bound({**rec, "profile": {}}) is None


def test_training_and_algorithm_suites(tmp_path):
    from bench import report

    saved, md = _run(tmp_path, "--suites", "training", "algorithms", "--train-densities", "0.1",
                     "--train-rounds", "2", "--algo-rounds", "2")
    assert set(saved) == {"meta", "training", "algorithms"}
    train = saved["training"]["records"]
    assert [(r["model"], r["density"], r["distribution"]) for r in train] == [
        (m, 0.1, "erk") for m in ("mlp", "vgg11", "resnet20", "resnet18")]
    assert {r["malloc"] for r in train} == {saved["meta"]["malloc"]["policy"]}  # --quick: this process only
    for r in train:
        c = r["check"]
        assert c["rel_error_loss"] <= 1e-4 and c["masked_outside_max"] == 0.0
        assert c["rel_error_grad_float64"] <= 1e-9 and c["rel_error_weight_after_step_float64"] <= 1e-9
        assert c["masked_outside_max_float64"] == 0.0
        assert set(c["losses"]) == {"sparse", "dense", "masked"}
        assert all(r["times"][k]["median"] > 0 and r["times"][k]["n"] == 2 for k in ("sparse", "dense", "masked"))
        assert set(r["phases"]["sparse"]) == {"forward", "backward", "optimizer"}
        assert any("sparsestart" in o["op"] for o in r["profile"]["sparse"]["ops"])
        assert r["density_actual"] == pytest.approx(0.1, abs=0.01)
        mem = r["memory"]
        for opt in ("sgd_momentum", "adamw"):
            s, d, m = (mem[k][opt] for k in ("sparse", "dense", "masked"))
            assert s["index"] > 0 and d["index"] == 0 and m["index"] == 0
            assert m["mask"] > 0 and s["mask"] == 0
            assert s["grads"] == s["params"] and d["grads"] == d["params"]
            assert s["total"] < d["total"] < m["total"] and d["ratio_vs_dense"] == 1.0
        assert mem["dense"]["adamw"]["optimizer_state"] >= 2 * mem["dense"]["adamw"]["params"]
        assert mem["dense"]["sgd_momentum"]["optimizer_state"] == mem["dense"]["sgd_momentum"]["params"]
    algos = saved["algorithms"]["records"]
    assert [r["model"] for r in algos] == ["mlp", "vgg11"]
    for r in algos:
        c = r["check"]
        assert c["idle"]["changed_positions"] == 0 and c["idle"]["rewire_events"] == 0
        for k in ("rigl", "set"):
            assert c[k]["nnz_kept"] and c[k]["changed_positions"] > 0 and c[k]["rewire_events"] > 0
            assert math.isfinite(r[k]["fraction"]) and r[k]["step_call_ms"] > 0
        assert r["update_interval"] == 100 and r["drop_fraction_used"] == pytest.approx(0.3)
    for section in ("## Training step", "training step >= 2.5x faster than masked-dense", "bytes kept between steps",
                    "where one step's time goes", "## Structure updates (RigL, SET)"):
        assert section in md
    assert "## Kernels" not in md
    assert report.render(saved, source=str(tmp_path / "smoke.json")) == md


@needs_native
def test_training_suite_under_both_allocator_policies(tmp_path):
    from bench import report

    saved, md = _run(tmp_path, "--suites", "training", "--train-models", "mlp", "--train-densities", "0.1", "0.01",
                     "--train-rounds", "1", "--train-malloc", "both")
    train = saved["training"]["records"]
    # This process retains freed memory (the bench's default); the child ran the same problems under glibc's.
    assert [(r["density"], r["malloc"]) for r in train] == [(0.1, "retain_freed_memory"), (0.01, "retain_freed_memory"),
                                                            (0.1, "default"), (0.01, "default")]
    assert all(r["check"]["rel_error_loss"] <= 1e-4 for r in train)
    assert saved["training"]["run"]["settings"]["train_malloc"] == "both"
    # Time rows for both policies; memory rows and profiles once; the step targets only on glibc's rows.
    assert md.count("| erk | 0.1 | 0.1000 | freed memory retained |") == 1
    assert md.count("| erk | 0.1 | 0.1000 | glibc default |") == 1
    assert md.count("| erk | 0.1 | sparse |") == 1 and md.count("state (+ index) <=") == 2
    assert md.count("glibc default malloc: training step >= 5x faster than dense") == 1
    assert md.count("glibc default malloc: training step >= 20x faster than dense") == 1
    assert md.count("where one step's time goes (freed memory retained)") == 2
    assert report.render(saved, source=str(tmp_path / "smoke.json")) == md


def test_training_suite_compiled(tmp_path):
    """--compile: every variant's step through torch.compile (inductor); the same correctness checks hold
    and the records and the run's settings say compiled."""
    saved, _ = _run(tmp_path, "--suites", "training", "--train-models", "mlp", "--train-densities", "0.1",
                    "--train-rounds", "1", "--compile")
    (r,) = saved["training"]["records"]
    assert r["compiled"] is True and saved["training"]["run"]["settings"]["train_compile"] is True
    c = r["check"]
    assert c["rel_error_loss"] <= 1e-4 and c["masked_outside_max"] == 0.0
    assert all(r["times"][k]["median"] > 0 for k in ("sparse", "dense", "masked"))


@needs_native
def test_sampling_suite_and_merge(tmp_path):
    # An earlier result file with a layer suite: the sampling run must keep it and its fits must render.
    earlier = {"meta": {"command": "earlier", "date": "2000-01-01", "threads": 1},
               "layers": {"records": _layer_records("linear 8->8", 64, 1e-3, 1e-5, 1.2e-3)}}
    (tmp_path / "smoke.json").write_text(json.dumps(earlier))
    saved, md = _run(tmp_path, "--suites", "sampling", "--sampling-size", "512",
                     "--sampling-variants", "csr-exact", "bsr16-bernoulli")
    assert list(saved) == ["meta", "layers", "sampling"]
    assert saved["meta"]["kept_from_previous"] == ["layers"]
    assert saved["layers"]["run"]["command"] == "earlier"
    recs = {r["variant"]: r for r in saved["sampling"]["records"]}
    assert set(recs) == {"csr-exact", "bsr16-bernoulli"}
    exact = recs["csr-exact"]
    assert exact["nnz_elements"] == [round(0.01 * 512 * 512)]
    assert exact["checks"][0]["ok"] and exact["checks"][0]["validate"]
    assert exact["result_bytes"] > 0 and exact["peak_bytes"]["median"] > 0 and exact["seconds"]["median"] > 0
    assert all(n % 256 == 0 for n in recs["bsr16-bernoulli"]["nnz_elements"])
    assert "## ER sampling of one large layer" in md and "### Layers: time against nnz" in md
    assert "| csr-exact | 512x512 |" in md


@needs_native
def test_conv_algorithm_suite(tmp_path):
    saved, md = _run(tmp_path, "--suites", "convalgo", "--train-densities", "0.5", "0.05", "--layer-rounds", "1")
    recs = saved["convalgo"]["records"]
    assert {r["model_density"] for r in recs} == {0.5, 0.05} and len(recs) == 16  # 8 convolutions of VGG-11
    for r in recs:
        assert r["auto"] in ("direct", "unfold", "dense") and r["fastest"] in r["times"]
        assert all(e <= 1e-4 for e in r["rel_error"].values())
        assert "dense nn.Conv2d" in r["times"] and r["auto"] in r["times"]
        # the suite runs with tuning off (tests/conftest.py): "auto" is the threshold rule
        assert r["autotuned"] is False and r["heuristic"] == r["auto"]
    assert "## Convolution algorithms per layer" in md and "auto picks" in md and "rule picks" in md
