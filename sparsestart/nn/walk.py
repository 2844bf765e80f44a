"""Walking a model: which of its layers can be masked, under which names, and what input it takes.

Only torch here: densities (``sparsestart.init``) and conversion (``sparsestart.nn.convert``)
both walk models, and conversion builds on densities, so the walk sits below both.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Union

from torch import nn

__all__ = ["MASKABLE_TYPES", "is_maskable", "module_paths", "maskable_layers", "check_exclude", "infer_input_shape"]

#: The dense layers sparsify replaces. Exact types: a subclass (e.g. MultiheadAttention's out_proj)
#: may be used in ways a sparse layer does not support (its ``.weight`` read directly).
MASKABLE_TYPES = (nn.Linear, nn.Conv2d)


def is_maskable(m: nn.Module) -> bool:
    return type(m) in MASKABLE_TYPES


def _patterns(exclude: Union[str, Iterable[str]]) -> tuple[str, ...]:
    return (exclude,) if isinstance(exclude, str) else tuple(exclude)


def _excluded(names: Iterable[str], patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for name in names for p in patterns)


def module_paths(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every distinct module of ``model`` with all the qualified names it is registered under,
    in registration order of its first name (a module registered twice, e.g. one Linear applied
    at two places, is one entry with two names)."""
    paths: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), (m, []))[1].append(name)
    return list(paths.values())


def maskable_layers(model: nn.Module, exclude: Union[str, Iterable[str]] = ()) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every nn.Linear / nn.Conv2d not matched by ``exclude``.

    Order is registration order (``named_modules``), which is forward order for
    sequentially built models. ``exclude`` takes qualified names or glob
    patterns ("classifier", "features.0", "*.downsample.*"). A module registered
    under several names is listed once, under its first name, and is excluded
    when ``exclude`` matches any of its names (it is one layer: it cannot be
    sparse at one place and dense at another).
    """
    patterns = _patterns(exclude)
    return [(names[0], m) for m, names in module_paths(model)
            if is_maskable(m) and not _excluded(names, patterns)]


def check_exclude(model: nn.Module, exclude: Union[str, Iterable[str]], option: str = "--exclude",
                  model_name: str = "") -> None:
    """ValueError for an ``exclude`` pattern that matches none of the model's Linear/Conv2d layers
    (a typo would otherwise leave every layer sparse without a word)."""
    names = [name for m, all_names in module_paths(model) if is_maskable(m) for name in all_names]
    for pattern in _patterns(exclude):
        if not _excluded(names, (pattern,)):
            of = f" of {model_name}" if model_name else ""
            raise ValueError(f"{option} {pattern!r} matches no Linear/Conv2d layer{of}; its layers are: "
                             f"{', '.join(names) or '(none)'}")


def infer_input_shape(model: nn.Module) -> Optional[tuple[int, ...]]:
    """Per-sample input shape of a sparsestart.models model (None when unknown)."""
    sizes = getattr(model, "sizes", None)
    if isinstance(sizes, tuple) and sizes and isinstance(sizes[0], int):
        return (sizes[0],)
    c, s = getattr(model, "in_channels", None), getattr(model, "input_size", None)
    if isinstance(c, int) and isinstance(s, int) and not isinstance(model, MASKABLE_TYPES):
        return (c, s, s)
    return None
