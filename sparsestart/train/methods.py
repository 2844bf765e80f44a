"""The sparse-training method of a run: sparsestart.algorithms when installed, else a local no-op "static".

``sparsestart.algorithms.get(name, model, optimizer, total_steps=..., **options)``
returns an object with ``step()`` (called after every ``optimizer.step()``),
``state_dict()``/``load_state_dict()`` and ``history``; IMP adds
``prune_and_rewind()``, which the trainer calls at the end of every level but
the last. As long as that package is missing (or has no ``get``), only
``static`` is available, implemented here; it switches to the package's
implementation as soon as the package provides one.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Optional

from torch import nn

__all__ = ["METHODS", "StaticAlgorithm", "library", "available_methods", "make_algorithm", "check_method"]

METHODS = ("static", "imp", "str", "rigl", "set", "gradual", "edgepopup")


class StaticAlgorithm:
    """Fixed structure: only the stored values train. Takes no options."""

    name = "static"

    def __init__(self, model: nn.Module, optimizer=None, total_steps: Optional[int] = None, **options):
        if options:
            raise ValueError(f"method 'static' takes no options, got {sorted(options)}")
        self.model, self.optimizer, self.total_steps = model, optimizer, total_steps
        self.history: list = []

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def library():
    """The ``sparsestart.algorithms`` module if it provides ``get``, else None."""
    try:
        mod = importlib.import_module("sparsestart.algorithms")
    except ImportError:
        return None
    return mod if callable(getattr(mod, "get", None)) else None


def available_methods() -> tuple[str, ...]:
    lib = library()
    if lib is None:
        return ("static",)
    names = getattr(lib, "names", None)
    if callable(names):
        return tuple(names())
    for attr in ("METHODS", "ALGORITHMS", "NAMES"):
        v = getattr(lib, attr, None)
        if isinstance(v, (tuple, list, dict)):
            return tuple(v)
    return METHODS


def check_method(method: str) -> str:
    """Validate a method name early, with the list of valid and of currently available names."""
    if not isinstance(method, str) or method.lower() not in METHODS + available_methods():
        raise ValueError(f"unknown method {method!r}; valid methods are: {', '.join(METHODS)}")
    method = method.lower()
    avail = available_methods()
    if method not in avail:
        raise ValueError(f"method {method!r} needs sparsestart.algorithms, which this installation does not "
                         f"provide yet; available now: {', '.join(avail)}")
    return method


def _accepted(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def make_algorithm(method: str, model: nn.Module, optimizer, total_steps: int, options: Optional[dict] = None, *,
                   seed: Optional[int] = None, lr_factor=None):
    """Build the method's algorithm for ``model``.

    ``total_steps``, ``seed`` and ``lr_factor`` (the learning-rate multiplier per
    step) are passed when the algorithm's constructor takes them and ``options``
    does not set them. A model without sparse layers
    (the dense baseline) gets the local no-op static algorithm.
    """
    from ..nn import SparseLayer

    method = check_method(method)
    options = dict(options or {})
    lib = library()
    has_sparse = any(isinstance(m, SparseLayer) for m in model.modules())
    if lib is None or not has_sparse:
        if method != "static":
            raise ValueError(f"method {method!r} needs sparse layers (density < 1)")
        return StaticAlgorithm(model, optimizer, total_steps=total_steps, **options)
    cls = (getattr(lib, "ALGORITHMS", None) or {}).get(method)
    if cls is None or _accepted(cls, "total_steps"):
        options.setdefault("total_steps", total_steps)
    if cls is not None and seed is not None and _accepted(cls, "seed"):
        options.setdefault("seed", seed)
    if cls is not None and lr_factor is not None and _accepted(cls, "lr_factor"):
        options.setdefault("lr_factor", lr_factor)
    return lib.get(method, model, optimizer, **options)
