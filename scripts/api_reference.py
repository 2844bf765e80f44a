#!/usr/bin/env python3
"""Write docs/api.md, one page of API reference generated from the docstrings of sparsestart's public modules.

    python scripts/api_reference.py               # -> docs/api.md   (also: make api-docs)
    python scripts/api_reference.py --out -       # to stdout

The modules are ``sparsestart`` and the submodules its ``__all__`` names (a module or a package alike). Each
module's public names are its ``__all__`` (else the public names defined in it), in that order: classes and
functions with their signature (without annotations) and the first paragraph of their docstring, a class's own
public methods and properties likewise, constants with their value when it is short. A name re-exported from
another documented module points there. The output depends on the code only (no dates, no addresses), so
tests/test_api_docs.py can tell when docs/api.md is stale.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
REFRESH = "make api-docs"  # what the header and the staleness test tell the reader to run

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :func:`x`, :class:`~a.B` -> `x`, `a.B`
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # <function f at 0x7f..> -> <function f>
_SHORT_VALUE = 100  # longest constant value shown
_PACKAGE = "sparsestart"


def public_modules(package: str = _PACKAGE) -> list[str]:
    """``package`` and the submodules its ``__all__`` names, in that order."""
    pkg = importlib.import_module(package)
    subs = [f"{package}.{n}" for n in getattr(pkg, "__all__", []) if isinstance(getattr(pkg, n, None), types.ModuleType)]
    return [package] + subs


def first_paragraph(obj) -> str:
    """The first paragraph of ``obj``'s docstring on one line, reST roles and ``literals`` as markdown code."""
    doc = inspect.getdoc(obj) or ""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(line.strip() for line in para.splitlines())
    return _ROLE.sub(r"`\1`", text).replace("``", "`")


def signature(obj) -> str:
    """``(a, b=1, *, c=None)``: parameters without annotations, defaults without memory addresses."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    return _ADDRESS.sub("", text)


def _own_names(module: types.ModuleType) -> list[str]:
    """``__all__``, else the public names defined in ``module`` (or a module inside it), sorted."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    prefix = module.__name__
    return sorted(n for n, v in vars(module).items() if not n.startswith("_") and
                  (getattr(v, "__module__", "") or "").startswith(prefix) and
                  (inspect.isclass(v) or inspect.isfunction(v)))


def _home(obj, documented: Iterable[str]) -> Optional[str]:
    """The documented module ``obj`` is defined in (the longest one its ``__module__`` is inside), if any."""
    where = getattr(obj, "__module__", None) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
    if not where:
        return None
    inside = [m for m in documented if where == m or where.startswith(m + ".")]
    return max(inside, key=len) if inside else None


def _short_value(v) -> Optional[str]:
    """repr of a small constant made of numbers and strings (orderless sets are left out: not deterministic; flags
    too: NATIVE_AVAILABLE says what this installation has, not what the API is)."""
    if isinstance(v, bool):
        return None

    def plain(x):
        if isinstance(x, (bool, int, float, str, type(None))):
            return True
        if isinstance(x, (tuple, list)):
            return all(plain(y) for y in x)
        if isinstance(x, dict):
            return all(plain(k) and plain(y) for k, y in x.items())
        return False
    if not plain(v):
        return None
    text = repr(v)
    return text if len(text) <= _SHORT_VALUE else None


def _members(cls, package: str) -> list[str]:
    """Lines for the public methods and properties ``cls`` itself defines (in definition order)."""
    lines = []
    foreign = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] != package]
    for name, raw in vars(cls).items():
        if name.startswith("_") or any(name in vars(b) for b in foreign):
            continue  # private, or an override of a torch / Python method (forward, extra_repr): documented there
        if isinstance(raw, property):
            kind, sig, doc = "property", "", first_paragraph(raw)
        elif isinstance(raw, (classmethod, staticmethod)):
            kind, sig, doc = type(raw).__name__, signature(getattr(cls, name)), first_paragraph(raw.__func__)
        elif inspect.isfunction(raw):
            kind, sig, doc = "", signature(getattr(cls, name)), first_paragraph(raw)
        else:
            continue
        label = f"`{cls.__name__}.{name}{sig}`" + (f" *{kind}*" if kind else "")
        lines.append(f"- {label}" + (f": {doc}" if doc else ""))
    return lines


def render_module(modname: str, documented: list[str]) -> list[str]:
    module = importlib.import_module(modname)
    out = [f"## `{modname}`", ""]
    doc = first_paragraph(module)
    if doc:
        out += [doc, ""]
    constants = []
    for name in _own_names(module):
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            out.append(f"- module `{obj.__name__}`: {first_paragraph(obj)}".rstrip(": "))
            continue
        home = _home(obj, documented)
        if home is not None and home != modname:
            out.append(f"- `{name}`: see `{home}.{obj.__name__}`")
            continue
        if out[-1] != "":  # a heading after list items
            out.append("")
        if inspect.isclass(obj):
            out += [f"### class `{name}{signature(obj)}`", ""]
            doc = first_paragraph(obj)
            out += ([doc, ""] if doc else []) + _members(obj, modname.split(".")[0])
        elif callable(obj):
            out += [f"### `{name}{signature(obj)}`", ""]
            doc = first_paragraph(obj)
            out += [doc, ""] if doc else []
        else:
            value = _short_value(obj)
            constants.append(f"- `{name}`" + (f" = `{value}`" if value is not None else f" ({type(obj).__name__})"))
    if constants:
        out += ["", "Constants:", ""] + constants
    return out + [""]


def render(modules: Optional[list[str]] = None) -> str:
    """The whole page for ``modules`` (default: :func:`public_modules`)."""
    modules = public_modules() if modules is None else list(modules)
    head = ["# API reference", "",
            f"Generated from the docstrings by `scripts/api_reference.py`; do not edit by hand. Refresh it with "
            f"`{REFRESH}` (`python scripts/api_reference.py`). Signatures are shown without annotations; each entry "
            "gives the first paragraph of its docstring, the rest is in the code (`help(...)`).", "",
            "Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in modules) + ".", ""]
    body = []
    for m in modules:
        body += render_module(m, modules)
    text = "\n".join(head + body)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help="output file, '-' for stdout (default docs/api.md)")
    args = p.parse_args(argv)
    text = render()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout's sparsestart, as the tests import it
    sys.exit(main())
