"""``sparsestart.info()`` and ``sparsestart info`` report what this installation really has.

Each fact is checked against the thing it describes: versions against the imported packages, the
extension's SIMD level against /proc/cpuinfo and its compile flags, backends against the registry,
datasets against files made here.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsestart
from sparsestart import ops, runtime
from sparsestart.ops import gpu, registry

info_module = sys.modules["sparsestart.info"]  # `sparsestart.info` itself is the function
needs_extension = pytest.mark.skipif(not ops.NATIVE_AVAILABLE, reason="the C++ extension sparsestart._C is not built")
REPO = Path(__file__).resolve().parent.parent

SECTIONS = ["sparsestart", "python", "platform", "torch", "extension", "triton", "backends", "allocator", "datasets"]


@pytest.fixture(scope="module")
def report():
    return sparsestart.info()


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_sections_versions_and_json(report):
    assert list(report) == SECTIONS
    assert all("error" not in report[s] for s in SECTIONS if s not in ("extension", "triton")), report
    assert report["sparsestart"]["version"] == sparsestart.__version__
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda"] == torch.version.cuda
    assert report["torch"]["threads"] == torch.get_num_threads()
    assert report["python"]["version"] == platform.python_version()
    assert json.loads(json.dumps(report)) == report  # plain values only


@needs_extension
def test_extension_build_facts_match_this_machine(report):
    ext = report["extension"]
    assert ext["loaded"] and "error" not in ext, ext
    assert Path(ext["path"]).resolve() == Path(importlib.import_module("sparsestart._C").__file__).resolve()
    assert ext["torch_version"] == torch.__version__.split("+")[0]
    assert ext["python_version"] == platform.python_version()
    assert ext["build_system"] == "setuptools"
    flags = ext["flags"]
    assert "-O3" in flags and ext["optimized"]
    assert ("-fopenmp" in flags) == (ext["openmp"] is not None)
    assert ext["intraop_threads"] == torch.get_num_threads() and ext["omp_max_threads"] >= 1

    # The level simd.h picked follows from the macros the flags enabled ...
    macros = ext["isa_macros"]
    expected = "avx512" if macros["avx512f"] else "avx2" if macros["avx2"] and macros["fma"] else "scalar"
    assert ext["simd"] == expected
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        assert ext["cpu_supports"] == {f: f in cpu for f in ("avx512f", "avx2", "fma")}
        if "-march=native" in flags:  # built here for this CPU: the best level it has
            best = "avx512" if "avx512f" in cpu else "avx2" if {"avx2", "fma"} <= cpu else "scalar"
            assert ext["simd"] == best
        elif not any(f.startswith(("-march", "-mavx", "-mfma")) for f in flags):
            assert ext["simd"] == "scalar"  # the x86-64 baseline has neither AVX2 nor AVX-512
    assert ext["simd_used"] == ext["simd"] and ext["simd_note"] is None

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx):
        version = subprocess.run([cxx, "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
        assert version and version in ext["compiler"]

    # CUDA kernels compiled in exactly when they are registered with the dispatcher.
    assert ext["cuda"]["compiled"] == gpu.cuda_extension_available()
    assert (ext["cuda"]["archs"] is None) == (not ext["cuda"]["compiled"])
    if ext["cuda"]["compiled"]:
        assert all(a.startswith("sm_") for a in ext["cuda"]["archs"])


def test_simd_used_on_a_cpu_without_the_compiled_level():
    facts = {"simd": "avx512", "cpu_supports": {"avx512f": False, "avx2": True, "fma": True}}
    used, note = info_module._simd_used(facts)
    assert used is None and "SIGILL" in note and "avx512f" in note
    used, note = info_module._simd_used({"simd": "scalar", "cpu_supports": facts["cpu_supports"]})
    assert used == "scalar" and "could run avx2" in note
    assert info_module._simd_used({"simd": "scalar", "cpu_supports": None}) == ("scalar", None)


def test_extension_that_does_not_load_is_reported(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "sparsestart._C":
            raise ImportError("libc10.so: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(info_module.importlib, "import_module", fake)
    ext = sparsestart.info()["extension"]
    assert ext["loaded"] is False and "libc10.so" in ext["error"] and "pip install" in ext["hint"]


def test_triton_matches_the_installation(report):
    tri = report["triton"]
    assert tri["installed"] == (importlib.util.find_spec("triton") is not None)
    if not tri["installed"]:
        assert not tri["kernels_import"] and "triton is not installed" in tri["error"]
        return
    assert tri["version"] == importlib.metadata.version("triton")
    assert tri["kernels_import"] and tri["error"] is None
    assert "sparsestart.kernels.launch" in sys.modules


def test_triton_kernels_that_fail_to_import_are_reported(monkeypatch):
    if gpu.triton_unavailable_reason():
        pytest.skip(f"triton backend unavailable here: {gpu.triton_unavailable_reason()}")
    real = importlib.import_module

    def fake(name, *args):
        if name == "sparsestart.kernels.launch":
            raise RuntimeError("no usable libcuda")
        return real(name, *args)

    monkeypatch.setattr(info_module.importlib, "import_module", fake)
    tri = sparsestart.info()["triton"]
    assert tri["kernels_import"] is False and "no usable libcuda" in tri["error"]


def test_backends_match_the_registry(report, monkeypatch):
    listed = report["backends"]["backends"]
    assert set(listed) == set(registry.backends())
    for name, backend in registry.backends().items():
        assert listed[name]["available"] == backend.is_available()
        assert listed[name]["priority"] == backend.priority
        assert (listed[name]["reason"] is None) == listed[name]["available"]
    assert listed["cpu"]["available"] == ops.NATIVE_AVAILABLE

    cpu = registry.backends()["cpu"]
    monkeypatch.setattr(cpu, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", "the C++ extension sparsestart._C is not built")
    again = sparsestart.info()["backends"]["backends"]["cpu"]
    assert again == {"priority": cpu.priority, "available": False,
                     "reason": "the C++ extension sparsestart._C is not built"}

    monkeypatch.setenv("SPARSESTART_BACKEND", "reference")
    assert sparsestart.info()["backends"]["forced"] == "reference"


def test_allocator_policy_follows_the_process(report):
    assert {k: v for k, v in report["allocator"].items() if k not in ("glibc", "note")} == runtime.malloc_settings()


def test_datasets_found_where_they_are(tmp_path, monkeypatch):
    from sparsestart.train import data

    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for which, n in (("train", 3), ("t10k", 2)):
        data.write_idx(folder / f"{which}-images-idx3-ubyte.gz", torch.zeros(n, 28, 28, dtype=torch.uint8))
        data.write_idx(folder / f"{which}-labels-idx1-ubyte.gz", torch.zeros(n, dtype=torch.uint8))
    monkeypatch.setenv("SPARSESTART_DATA", str(tmp_path))
    monkeypatch.setenv("SPARSESTART_SYSTEM_DATA", "0")
    ds = sparsestart.info()["datasets"]
    assert ds["SPARSESTART_DATA"] == str(tmp_path)
    assert ds["fashion-mnist"]["found"] == str(folder)
    assert ds["cifar10"]["found"] is None and str(tmp_path) in ds["cifar10"]["looked"]

    monkeypatch.delenv("SPARSESTART_DATA")
    ds = sparsestart.info()["datasets"]
    assert ds["fashion-mnist"] == {"found": None, "looked": []}
    assert (ds["digits"]["found"] is not None) == (importlib.util.find_spec("sklearn") is not None)


def test_a_failing_section_does_not_hide_the_others(monkeypatch):
    def broken():
        raise OSError("disk gone")

    monkeypatch.setattr(info_module, "_datasets", broken)
    out = sparsestart.info()
    assert out["datasets"] == {"error": "OSError: disk gone"}
    assert out["torch"]["version"] == torch.__version__


def test_cli_prints_text_and_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparsestart", "info", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
    res = run("--json")
    assert res.returncode == 0, res.stderr
    parsed = json.loads(res.stdout)
    assert list(parsed) == SECTIONS and parsed["torch"]["version"] == torch.__version__

    res = run()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "torch:" in lines and f"  version: {torch.__version__}" in lines
    if parsed["extension"]["loaded"] and "simd" in parsed["extension"]:
        assert f"  simd: {parsed['extension']['simd']}" in lines
        assert f"  flags: {', '.join(parsed['extension']['flags'])}" in lines
    assert "      available: yes" in lines  # a backend (the reference one at least)


def test_info_name_stays_the_function_after_the_cli_imports_the_module():
    code = ("import sparsestart, sparsestart.cli; sparsestart.cli.build_parser(); import sparsestart.info; "
            "print(callable(sparsestart.info), sorted(sparsestart.info()) == sorted(%r))" % SECTIONS)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]
