"""The GPU suites of ``python -m bench --device cuda`` (bench/gpu_suites.py, bench/gpu_report.py).

On CPU: a dry run of the same code at tiny shapes (``--gpu-dry-run --tiny``: CPU tensors, perf_counter
instead of CUDA events), the failure isolation and the partial result file, the CLI's defaults, and the
GPU sections of the markdown report. With CUDA: the quick GPU run at tiny shapes, end to end, in a
subprocess (its Triton and environment settings stay out of this process). No timing is asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsestart import ops
from tests.util import threads

ROOT = Path(__file__).resolve().parents[2]
needs_native = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")

CPU_DOC = "# CPU benchmarks\n\nsome CPU tables\n"


def _dry_run(tmp_path, *argv):
    from bench import __main__ as cli

    md = tmp_path / "benchmarks.md"
    if not md.exists():
        md.write_text(CPU_DOC)
    with threads(torch.get_num_threads()):
        result = cli.main(["--gpu-dry-run", "--tiny", "--threads", "1", "--out-dir", str(tmp_path), "--docs", str(md),
                           *argv])
    saved = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())
    return result, saved, md.read_text()


@needs_native
def test_dry_run_all_suites(tmp_path):
    from bench import gpu_report

    _, saved, md = _dry_run(tmp_path, "--train-models", "mlp", "--densities", "0.1", "--train-densities", "0.1",
                            "--reps", "2", "--warmup", "1", "--algo-reps", "2")
    meta = saved["meta"]
    assert meta["kind"] == "gpu-suites" and meta["device_type"] == "cpu" and meta["settings"]["formats"] == [
        "csr", "bsr32"]
    assert list(saved) == ["meta", "training", "layers", "algorithms"]
    errors = {s: saved[s]["errors"] for s in ("training", "layers", "algorithms")}
    # fp32 must run everywhere; a bf16 case may fail only by recording why (autocast support of the ops)
    for s, errs in errors.items():
        for e in errs:
            assert e["precision"] == "bf16" and e["status"] == "error" and e["error"], (s, e)
    train = saved["training"]["records"]
    fp32 = [r for r in train if r["precision"] == "fp32"]
    assert {(r["model"], r["format"]) for r in fp32} == {("mlp", "csr"), ("mlp", "bsr32")}
    for r in train:
        assert r["check"]["ok"], r["check"]
        for k in ("sparse", "dense", "masked"):
            assert r["times"][k]["device"]["median"] > 0 and r["times"][k]["host"]["n"] == 2
            assert r["memory"][k]["resident"] > 0 and "training_peak" not in r["memory"][k]  # no CUDA peak on CPU
        assert r["memory"]["sparse"]["index"] > 0 and r["memory"]["dense"]["index"] == 0
        assert r["memory"]["sparse"]["resident"] < r["memory"]["dense"]["resident"]
    bsr = next(r for r in fp32 if r["format"] == "bsr32")
    assert bsr["layer_formats"] == {"fc1": "bsr32", "fc2": "bsr32", "fc3": "csr"}  # 10 outputs: not a multiple of 32
    lay = saved["layers"]["records"]
    over = [r for r in lay if r.get("kind") == "op_overhead"]
    assert {(r["format"], r["precision"]) for r in over} >= {("csr", "fp32"), ("bsr32", "fp32")}
    for r in over:
        assert set(r["ops"]) == {"spmm", "spmm_t", "sddmm", "layer forward"}
        assert all(v["host_us"] > 0 for impls in r["ops"].values() for v in impls.values())
    layer_recs = [r for r in lay if r.get("kind") != "op_overhead" and r["precision"] == "fp32"]
    assert {(r["layer"], r["format"], r["pass"]) for r in layer_recs} == {
        (name, f, p) for name in ("linear 64->64", "conv3x3 32->32 @6x6") for f in ("csr", "bsr32")
        for p in ("forward", "forward+backward")}
    assert all(r["check"]["ok"] and r["check"]["input_grad"]["ok"] for r in layer_recs)
    algos = [r for r in saved["algorithms"]["records"]]
    assert {(r["model"], r["format"], r["precision"]) for r in algos} == {("mlp", "csr", "fp32"),
                                                                          ("mlp", "bsr32", "fp32")}
    for r in algos:
        assert r["check"]["rigl"]["changed_positions"] > 0 and r["check"]["idle"]["changed_positions"] == 0
    # the markdown: the CPU part kept, one GPU section for this device, rendered from the JSON
    assert md.startswith(CPU_DOC.rstrip("\n"))
    assert gpu_report.gpu_blocks(md) == [gpu_report.render(saved, source=str(tmp_path / "gpu-cpu-dry-run.json"))]
    for section in ("# GPU benchmarks:", "## Training step", "#### MLP 64-96-96-10, batch 16", "## Layers",
                    "## Per-op host overhead", "## Structure updates (RigL, SET)"):
        assert section in md


@needs_native
def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from bench import gpu_suites

    real = gpu_suites.bench_training
    seen = []

    def flaky(cfg, density, distribution, fmt, block, precision, *a, **kw):
        # the result file already holds every case done before this one
        done = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())["training"]
        seen.append(len(done["records"]) + len(done["errors"]))
        if fmt == "csr":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(cfg, density, distribution, fmt, block, precision, *a, **kw)

    monkeypatch.setattr(gpu_suites, "bench_training", flaky)
    _, saved, md = _dry_run(tmp_path, "--suites", "training", "--train-models", "mlp", "--train-densities", "0.1",
                            "--precisions", "fp32", "--reps", "1", "--warmup", "0")
    assert seen == [0, 1]
    (err,) = saved["training"]["errors"]
    assert err["format"] == "csr" and err["oom"] and "out of memory" in err["error"] and "flaky" in err["traceback"]
    (rec,) = saved["training"]["records"]
    assert rec["format"] == "bsr32"
    assert "## Failed or skipped cases" in md and "CUDA out of memory" in md


@needs_native
def test_time_budget_and_merge(tmp_path):
    _, first, _ = _dry_run(tmp_path, "--suites", "layers", "--densities", "0.1", "--formats", "csr",
                           "--precisions", "fp32", "--reps", "1", "--warmup", "0")
    assert first["layers"]["records"] and not first["layers"]["errors"]
    _, saved, md = _dry_run(tmp_path, "--suites", "training", "--time-budget", "0")
    assert saved["meta"]["kept_from_previous"] == ["layers"]
    assert saved["layers"] == first["layers"]
    errs = saved["training"]["errors"]
    assert errs and all(e["status"] == "skipped" for e in errs) and not saved["training"]["records"]
    assert md.count("gpu-benchmarks:") == 2  # one section (begin and end markers), rewritten in place


def test_cli_defaults():
    from bench import __main__ as cli

    cpu = cli.parse([])
    assert cpu.device == "cpu" and not cpu.gpu and cpu.threads == 2
    assert cpu.suites == list(cli.SUITES) and cpu.name == "cpu"
    assert cpu.train_models == ["mlp", "vgg11", "resnet20", "resnet18"] and cpu.algo_models == ["mlp", "vgg11"]
    assert cpu.train_malloc == "both" and cli.parse(["--quick"]).train_malloc == "process"
    quick = cli.parse(["--device", "cuda", "--quick"])
    assert quick.gpu and quick.suites == ["training", "layers", "algorithms"]
    assert quick.train_models == ["mlp", "vgg11"] and quick.train_densities == [0.1, 0.01]
    assert quick.precisions == ["fp32", "bf16"] and quick.formats == ["csr", "bsr32"]
    assert (quick.reps, quick.warmup, quick.algo_precisions) == (10, 3, ["fp32"])
    assert quick.docs.endswith("docs/benchmarks.md") and quick.layer_set == "quick"
    assert quick.autotune is (os.environ.get("SPARSESTART_TRITON_AUTOTUNE", "0") != "0")
    full = cli.parse(["--device", "cuda:0", "--no-autotune"])
    assert full.train_models == ["mlp", "vgg11", "resnet18"] and full.reps == 30 and full.layer_set == "full"
    assert full.autotune is False and full.algo_precisions == ["fp32", "bf16"]
    for bad in (["--precisions", "bf16"], ["--train-models", "resnet18"], ["--device", "tpu"],
                ["--device", "cuda", "--train-models", "resnet20"], ["--device", "cuda", "--train-malloc", "both"],
                ["--device", "cuda", "--suites", "kernels"], ["--device", "cuda", "--formats", "coo"]):
        with pytest.raises(SystemExit):
            cli.parse(bad)


def test_timing_falls_back_to_perf_counter_on_cpu():
    from bench import gpu_suites

    dev = torch.device("cpu")
    d, h = gpu_suites.time_call(lambda: sum(range(1000)), dev)
    assert d == h > 0
    stats = gpu_suites.interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, 3, 1, dev)
    assert set(stats) == {"a", "b"} and stats["b"]["device"]["n"] == 3
    assert gpu_suites.peak_step_memory(lambda: None, dev) is None
    oh = gpu_suites.per_call(lambda: None, dev, calls=4, rounds=2)
    assert oh["host_us"] == oh["device_us"] >= 0
    assert gpu_suites.parse_format("bsr32") == ("bsr", 32) and gpu_suites.parse_format("CSR") == ("csr", None)
    assert gpu_suites.slug("NVIDIA H200") == "nvidia-h200"


def test_cpu_report_keeps_gpu_sections(tmp_path):
    from bench import gpu_report

    def result(dev, ms):
        return {"meta": {"device": dev, "command": "python -m bench --device cuda"},
                "layers": {"records": [{"kind": "op_overhead", "format": "csr", "precision": "fp32",
                                        "shape": [8, 8, 8], "ops": {"spmm": {"public op": {"host_us": ms,
                                                                                          "device_us": 1.0}}}}],
                           "errors": []}}

    md = tmp_path / "benchmarks.md"
    md.write_text(CPU_DOC)
    gpu_report.update_docs(md, result("NVIDIA H200", 11.0))
    gpu_report.update_docs(md, result("NVIDIA A100-SXM4-80GB", 22.0))
    gpu_report.update_docs(md, result("NVIDIA H200", 33.0))  # replaces the H200 section in place
    text = md.read_text()
    blocks = gpu_report.gpu_blocks(text)
    assert len(blocks) == 2 and "33.0" in blocks[0] and "11.0" not in text and "22.0" in blocks[1]
    gpu_report.write_cpu_docs(md, "# CPU benchmarks\n\nnew CPU tables\n")
    text2 = md.read_text()
    assert text2.startswith("# CPU benchmarks\n\nnew CPU tables\n") and gpu_report.gpu_blocks(text2) == blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_gpu_run_tiny(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bench", "--device", "cuda", "--quick", "--tiny", "--out-dir", str(tmp_path),
           "--docs", str(tmp_path / "benchmarks.md"), "--reps", "2", "--warmup", "1", "--no-autotune"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = [p for p in tmp_path.glob("gpu-*.json")]
    saved = json.loads(path.read_text())
    assert saved["meta"]["device_type"] == "cuda" and saved["meta"]["triton_autotune"] in (False, None)
    errors = [e for s in ("training", "layers", "algorithms") for e in saved[s]["errors"]]
    assert not errors, json.dumps(errors, indent=1)[:6000]
    for r in saved["training"]["records"]:
        assert r["check"]["ok"], r["check"]
        assert r["memory"]["sparse"]["training_peak"] > 0 and r["peak_memory_ratio_vs_dense"] > 0
        if r["precision"] == "bf16":
            assert r["check"]["sparse_layer_dtypes"] == ["bfloat16"], "bf16 autocast did not reach the sparse ops"
    assert "# GPU benchmarks: " in (tmp_path / "benchmarks.md").read_text()
