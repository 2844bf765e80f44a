"""docs/api.md is what scripts/api_reference.py generates from the docstrings now; the generator on a made-up package."""
from __future__ import annotations

import difflib
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_api_md_is_current(gen, tmp_path):
    out = tmp_path / "api.md"
    assert gen.main(["--out", str(out)]) == 0
    fresh, committed = out.read_text(), (ROOT / "docs" / "api.md").read_text()
    if fresh != committed:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), "docs/api.md",
                                                 "generated now"))[:40])
        pytest.fail(f"docs/api.md is stale: refresh it with `{gen.REFRESH}` "
                    f"(.venv/bin/python scripts/api_reference.py)\n{diff}")


def test_every_public_module_has_a_section(gen):
    import sparsestart

    text = (ROOT / "docs" / "api.md").read_text()
    for name in ("formats", "ops", "nn", "init", "algorithms", "models", "train", "theory", "selection", "runtime"):
        assert f"## `sparsestart.{name}`" in text, name
        assert isinstance(getattr(sparsestart, name), type(sparsestart))
    assert "### `sparsify(model, density, distribution='erk'" in text  # documented where it is defined (nn)
    assert "- `sparsify`: see `sparsestart.nn.sparsify`" in text  # and pointed to from the top level


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    """A package with a subpackage without __all__, a re-export, a class hierarchy and constants."""
    root = tmp_path / "fakepkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text(textwrap.dedent('''
        """Fake package.

        Second paragraph, not shown."""
        from . import sub
        from .sub.impl import helper
        __all__ = ["sub", "helper", "LIMIT", "FLAG", "NAMES"]
        LIMIT = 3
        FLAG = True
        NAMES = frozenset({"a", "b"})
    '''))
    (root / "sub" / "__init__.py").write_text('"""Sub package: :func:`helper` and ``Thing``."""\n'
                                              "from .impl import Thing, helper\n")
    (root / "sub" / "impl.py").write_text(textwrap.dedent('''
        import torch

        _SENTINEL = object()

        def helper(x, y: int = 2, *, z=_SENTINEL) -> int:
            """Add things.

            Details."""
            return x

        class Base(torch.nn.Module):
            def grow(self, n):
                """Grow by ``n``."""

        class Thing(Base):
            """A thing
            over two lines."""
            def __init__(self, size):
                super().__init__()

            @property
            def size(self):
                """The size."""

            @classmethod
            def make(cls, n=1):
                """Make one."""

            def grow(self, n):
                """Grow, overriding the package's own Base."""

            def forward(self, x):
                return x

            def _private(self):
                """Hidden."""
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakepkg"
    for name in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
        del sys.modules[name]


def test_generator_on_a_package(gen, fakepkg):
    modules = gen.public_modules(fakepkg)
    assert modules == ["fakepkg", "fakepkg.sub"]
    text = gen.render(modules)
    assert text == gen.render(modules)  # deterministic
    lines = text.splitlines()
    # the top level: the first paragraph only, a re-export pointing to its documented module, constants
    assert "Fake package." in lines and "Second paragraph, not shown." not in text
    assert "- module `fakepkg.sub`: Sub package: `helper` and `Thing`." in lines
    assert "- `helper`: see `fakepkg.sub.helper`" in lines
    assert "- `LIMIT` = `3`" in lines
    assert "- `FLAG` (bool)" in lines and "- `NAMES` (frozenset)" in lines  # no installation-dependent / orderless values
    # the subpackage without __all__: public classes and functions defined inside it, sorted
    assert "### `helper(x, y=2, *, z=<object object>)`" in lines  # no annotations, no memory address
    assert "Add things." in lines and "Details." not in text
    assert "### class `Thing(size)`" in lines and "A thing over two lines." in lines
    assert lines.index("### class `Thing(size)`") < lines.index("### `helper(x, y=2, *, z=<object object>)`")
    assert "- `Thing.size` *property*: The size." in lines
    assert "- `Thing.make(n=1)` *classmethod*: Make one." in lines
    assert "- `Thing.grow(self, n)`: Grow, overriding the package's own Base." in lines
    assert "forward" not in text and "_private" not in text and "Base" not in text.replace("own Base", "")
