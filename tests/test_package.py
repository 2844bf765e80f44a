"""``import sparsestart`` exposes every public submodule, lazily (PEP 562): checked in fresh interpreters."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_submodules_reachable_from_a_plain_import():
    out = _run("""
        import sys
        import sparsestart
        lazy = ("models", "theory", "train", "selection", "demo", "cli")
        # selection is imported by init and algorithms anyway; the others only on first access
        print("before", [m for m in lazy if f"sparsestart.{m}" in sys.modules and m != "selection"])
        net = sparsestart.models.get("mlp", sizes=[784, 32, 10])
        print("model", type(net).__name__)
        print("theory", sparsestart.theory.__name__)
        print("train", callable(sparsestart.train.train), sparsestart.selection.__name__, sparsestart.demo.__name__,
              sparsestart.cli.__name__)
        print("dir", all(m in dir(sparsestart) for m in lazy))
        print("cached", "models" in vars(sparsestart))
        try:
            sparsestart.no_such_module
        except AttributeError as exc:
            print("missing", exc)
    """)
    assert "before []" in out  # nothing lazy is imported by `import sparsestart`
    assert "model " in out and "theory sparsestart.theory" in out
    assert "train True sparsestart.selection sparsestart.demo sparsestart.cli" in out
    assert "dir True" in out and "cached True" in out
    assert "missing module 'sparsestart' has no attribute 'no_such_module'" in out


def test_star_import_and_eager_submodules():
    out = _run("""
        from sparsestart import *
        names = set(globals())
        print(sorted(n for n in ("models", "theory", "train", "formats", "ops", "algorithms") if n in names))
        print(callable(sparsify), __import__("sparsestart").__version__)
    """)
    assert "['algorithms', 'formats', 'models', 'ops', 'theory', 'train']" in out and "True 0.1.0" in out


def test_kernels_lazily_when_triton_is_installed():
    pytest.importorskip("triton")
    out = _run("""
        import sys, sparsestart
        print("sparsestart.kernels" in sys.modules, sparsestart.kernels.__name__)
    """)
    assert out.split() == ["False", "sparsestart.kernels"]
