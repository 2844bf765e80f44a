"""Smoke test of the benchmark package: `python -m bench --quick` at tiny sizes.

Checks that the correctness gate, the interleaved timing, the JSON result and the
markdown report all run and fit together. No timing is asserted (DESIGN.md:
performance is measured in bench/, never asserted by timing inside a test).
"""
import json

import pytest
import torch

from sparsestart import ops


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")
def test_quick_run_writes_json_and_report(tmp_path, keep_threads):
    from bench import __main__ as cli
    from bench import report

    md_path = tmp_path / "benchmarks.md"
    result = cli.main(["--quick", "--suites", "kernels", "layers", "--shapes", "64x48x40", "--blocks", "1", "16", "--densities", "0.5", "0.05",
                       "--rounds", "2", "--layer-rounds", "2", "--threads", "2", "--name", "smoke",
                       "--out-dir", str(tmp_path), "--docs", str(md_path)])
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["meta"]["threads"] == 2 and saved["meta"]["cpu"]
    recs = saved["kernels"]["records"]
    assert {r["op"] for r in recs} == {"spmm", "spmm_t", "sddmm"}
    assert {r["format"] for r in recs} == {"csr", "bsr16"}
    for r in recs:
        assert r["times"]["sparsestart"]["median"] > 0 and r["times"]["dense"]["median"] > 0
        assert all(e <= 1e-4 for e in r["rel_error"].values())
        if r["format"] == "csr":
            assert "speedup_vs_torch" in r
    assert saved["kernels"]["fits"], "expected time-vs-nnz fits"
    layers = result["layers"]
    if "skipped" not in layers:
        assert {r["pass"] for r in layers["records"]} == {"forward", "forward+backward"}
    md = md_path.read_text()
    assert "## Kernels" in md and "spmm, CSR" in md and "break-even" in md
    assert report.render(saved, source=str(tmp_path / "smoke.json")) == md


@pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")
def test_host_overhead_runs_both_paths_and_restores_the_switch(tmp_path, keep_threads):
    from bench import host_overhead
    from sparsestart.ops import library

    out = tmp_path / "host.json"
    doc = host_overhead.main(["--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == doc["results"].keys()
    assert doc["run"]["command"].startswith("python -m bench.host_overhead")
    assert len(doc["results"]) == 8  # 2 layers x (fp32, bf16) x (forward, forward+backward)
    for r in doc["results"].values():
        assert set(r["us_per_call"]) == {"fast path", "dispatcher", "torch dense"}
        assert all(v > 0 for v in r["us_per_call"].values())
    assert library._FAST_PATH is True
