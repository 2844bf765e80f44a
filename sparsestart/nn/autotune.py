"""Measured choice of the algorithm a sparse layer computes with (``conv_algorithm="auto"``,
``linear_algorithm="auto"``).

On the first call for a key -- the layer kind, weight shape and geometry, input shape, dtype,
device, autocast dtype, format, density bucket, torch thread count and which gradients the call
needs -- every algorithm valid for the call runs on detached copies of the layer's values and
input (forward, plus backward when the call needs gradients), one warm-up then the median of
:data:`REPEATS` timed runs; the fastest is kept in an in-memory cache that every later call with
that key reads. Every algorithm computes the same function (each is tested against the dense
reference), so a choice changes speed and floating-point rounding only, never what is computed.

Reproducibility: a measured choice can differ between two processes (timing noise), and with it
the rounding. A forced choice (``conv_algorithm="direct"`` ...), the threshold rule
(``"heuristic"``), or a choice from the cache (loaded from a file with :func:`load`, or restored
from a training checkpoint, which stores :func:`state_dict`) is deterministic. Timing draws no
random numbers, and the global RNG states are restored after it anyway, so tuning never shifts a
training run's random stream.

Switches:
  ``SPARSESTART_AUTOTUNE=0``        tuning off: "auto" uses the threshold rule ("heuristic");
                                    :func:`set_enabled` overrides it from Python.
  ``SPARSESTART_AUTOTUNE_CACHE=F``  read the cache from JSON file F on first use (when F exists),
                                    and write it back to F after each new measurement.

Under ``torch.compile`` nothing is timed: the traced call takes the cached choice when the cache
has one for its key, else the threshold rule. The same holds while a dispatch mode (FLOP
counters, fake tensors), ``torch.jit`` tracing or a functorch transform is active, and for meta
tensors: the measured runs would be recorded or could not run.

The file (:func:`save`) is JSON: ``{"format": "sparsestart-autotune", "version": 1, "entries":
[{"key": {...}, "choice": "direct", "seconds": {"direct": ..., "unfold": ...}}, ...]}``, one entry
per key, the key as named fields (``density_bucket`` k means density in [2^(k/2), 2^((k+1)/2)),
None for a layer without stored weights).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["ALGORITHMS", "AutotuneCacheError", "REPEATS", "enabled", "set_enabled", "clear", "entries", "save",
           "load", "state_dict", "load_state_dict", "density_bucket", "bucket_density"]

FORMAT = "sparsestart-autotune"
VERSION = 1
#: The algorithms the tuner may choose from, per layer kind (``op`` field of a key).
ALGORITHMS = {"conv2d": ("direct", "unfold", "dense"), "linear": ("sparse", "dense")}
#: The fields of a key, per layer kind, in the order the in-memory key holds them.
KEY_FIELDS = {
    "conv2d": ("op", "weight", "stride", "padding", "dilation", "padding_mode", "input", "dtype", "device",
               "autocast", "format", "density_bucket", "threads", "grad"),
    "linear": ("op", "weight", "input", "dtype", "device", "autocast", "format", "density_bucket", "threads",
               "grad"),
}
#: Layers whose dense weight has more elements never get the "dense" candidate: the weight would be
#: materialised to time it. The same bound as sparsestart.nn.convert.LARGE_LAYER_NUMEL, above which a
#: layer is built without ever holding its dense weight (tests/nn/test_autotune.py checks they agree).
DENSE_MAX_NUMEL = 1 << 26
#: Timed runs per candidate (after one warm-up run); the median is compared.
REPEATS = 5
#: A candidate whose warm-up run takes more than this many times the best median so far is not
#: timed further (its warm-up time stands for it): at density 0.001 the "dense" candidate of a
#: VGG-16 layer costs a dense convolution, and timing it REPEATS more times made the first training
#: step of every new shape cost as much as ~100 sparse steps (the budget estimate of a VGG-16 run
#: went from 4.7 to 39 CPU-hours). First calls pay for one run of each hopeless candidate only.
GIVE_UP_FACTOR = 3.0
ENV_SWITCH = "SPARSESTART_AUTOTUNE"
ENV_CACHE = "SPARSESTART_AUTOTUNE_CACHE"


class AutotuneCacheError(ValueError):
    """An autotuning cache (a file or a checkpoint's entries) cannot be used; it names where it came from."""


# key (a tuple of plain values, KEY_FIELDS order) -> {"choice": str, "seconds": {algorithm: float}}
_cache: dict = {}
_env_cache_loaded = False


def _env_enabled() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes", ""):
        raise ValueError(f"{ENV_SWITCH} must be 0/1 (or false/true, off/on, no/yes), got {value!r}")
    return value not in ("0", "false", "off", "no")


# Read when sparsestart is imported (and by set_enabled(None)), not per call: a plain bool is what a
# compiled forward can read.
_enabled: bool = _env_enabled()


def enabled() -> bool:
    """Whether "auto" measures (True) or uses the threshold rule, as "heuristic" does (False); default from
    SPARSESTART_AUTOTUNE when sparsestart was imported."""
    return _enabled


def set_enabled(flag: Optional[bool]) -> None:
    """Turn tuning on or off for this process (None: back to what SPARSESTART_AUTOTUNE says now)."""
    global _enabled
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_enabled takes True, False or None, got {flag!r}")
    _enabled = _env_enabled() if flag is None else flag


def clear() -> None:
    """Forget every cached choice (the next call of each key measures again)."""
    _cache.clear()


def density_bucket(density: float) -> Optional[int]:
    """floor(2 log2(density)): half-octave buckets, so 1.0 (saturated) has a bucket of its own (0) and a
    layer of density 0.75 shares one (-1) only with 0.71..0.99; None for a layer without stored weights."""
    return None if density <= 0 else math.floor(2 * math.log2(density))


def bucket_density(density: float) -> float:
    """The middle of ``density``'s bucket (``2 ** ((k + 0.5) / 2)`` for bucket k; 0.0 for no bucket): a density
    that changes only when the bucket does, for the choices made under torch.compile (a compiled graph guards
    on the float it read, so the exact density would recompile at every structure update that changes nnz).
    ``density_bucket(bucket_density(d)) == density_bucket(d)``."""
    k = density_bucket(density)
    return 0.0 if k is None else 2.0 ** ((k + 0.5) / 2)


@torch.compiler.assume_constant_result
def _threads() -> int:
    # torch.get_num_threads cannot be traced by dynamo; read at trace time, the compiled graph keeps the
    # choice it found (a later change of the thread count changes speed, never the result).
    return torch.get_num_threads()


def grad_mode(values: torch.Tensor, x: torch.Tensor) -> str:
    """Which gradients the call will compute: "none", "values", "input" or "values+input"."""
    if not torch.is_grad_enabled():
        return "none"
    parts = [n for n, t in (("values", values), ("input", x)) if t.requires_grad]
    return "+".join(parts) if parts else "none"


def make_key(op: str, **fields) -> tuple:
    """The in-memory key: the values of KEY_FIELDS[op] in order (plain Python values and torch dtypes, so
    that dynamo can build and look it up while tracing)."""
    fields["op"] = op
    fields["threads"] = _threads()
    return tuple(fields[f] for f in KEY_FIELDS[op])


def lookup(key: tuple) -> Optional[str]:
    """The cached choice for ``key``, or None."""
    if not torch.compiler.is_compiling():  # a traced call reads what eager calls loaded
        _load_env_cache()
    entry = _cache.get(key)
    return None if entry is None else entry["choice"]


def can_time(*tensors: torch.Tensor) -> bool:
    """Whether candidates may be run and timed now (eager, on real tensors, nothing recording the calls)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t.is_meta or type(t) not in (torch.Tensor, torch.nn.Parameter) or \
                torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def choose(key: tuple, candidates: dict, device: torch.device) -> str:
    """The cached choice for ``key``, else time ``candidates`` ({algorithm: run()}), cache the fastest and
    return it. The caller checks :func:`enabled` and :func:`can_time` first."""
    choice = lookup(key)
    if choice is not None:
        if choice not in candidates:  # only a hand-edited or foreign cache can hold one (keys fix validity)
            raise AutotuneCacheError(f"autotune cache entry {_readable(key)} chooses {choice!r}, which cannot "
                                     f"compute this call (possible: {sorted(candidates)}); remove the entry or "
                                     f"the file it came from")
        return choice
    devices = [device] if device.type == "cuda" else []
    # No candidate draws random numbers; fork_rng makes sure that a kernel that ever did could not shift
    # the training run's streams. The candidates' own autograd graphs are shielded from saved-tensor
    # hooks around the call: under torch.utils.checkpoint(use_reentrant=False) the timed runs' saved
    # tensors were counted as the checkpointed forward's, and the recomputation (which finds the
    # choice cached and times nothing) failed its metadata check on a layer's first call.
    with torch.random.fork_rng(devices=devices), _own_saved_tensors():
        seconds: dict = {}
        for name, run in candidates.items():
            best = min(seconds.values(), default=None)
            limit = None if best is None else GIVE_UP_FACTOR * best
            seconds[name] = float(_time_candidate(name, run, device, limit=limit))
    choice = min(seconds, key=lambda n: (seconds[n], tuple(candidates).index(n)))
    _cache[key] = {"choice": choice, "seconds": seconds}
    path = os.environ.get(ENV_CACHE)
    if path:
        save(path)
    return choice


def _time_candidate(name: str, run: Callable[[], None], device: torch.device, *,
                    limit: Optional[float] = None) -> float:
    """Median wall time of ``run()`` over REPEATS runs after one warm-up; when the warm-up alone takes
    longer than ``limit`` seconds, its time (the candidate cannot win). Tests replace this function to
    choose the winner; ``name`` is for them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    run()
    sync()
    warm = time.perf_counter() - t0
    if limit is not None and warm > limit:
        return warm
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _own_saved_tensors():
    """Identity saved-tensor hooks when other hooks are active (they apply to the innermost only), so
    that what the timed candidates save stays theirs; nothing otherwise (hooks cost a call per
    saved tensor, which would tilt the timing of small layers)."""
    if torch._C._autograd._saved_tensors_hooks_is_enabled() and \
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    return contextlib.nullcontext()


def candidate_runner(compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], values: torch.Tensor,
                     x: torch.Tensor, grad: str) -> Callable[[], None]:
    """A run() for :func:`choose`: ``compute(values, x)`` on detached copies (the layer's tensors and the
    autograd graph of the real call are never touched), then the backward that ``grad`` names with a
    fixed (all-ones) output gradient: no random numbers."""
    v = values.detach().requires_grad_("values" in grad)
    xi = x.detach().requires_grad_("input" in grad)
    inputs = [t for t in (v, xi) if t.requires_grad]

    def run() -> None:
        if not inputs:
            with torch.no_grad():
                compute(v, xi)
            return
        with torch.enable_grad():
            y = compute(v, xi)
            torch.autograd.grad(y, inputs, torch.ones_like(y))
    return run


# ------------------------------------------------------------------------------------------- persistence
def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _readable(key: tuple) -> dict:
    return {f: _jsonable(v) for f, v in zip(KEY_FIELDS[key[0]], key)}


def entries() -> list:
    """Every cached choice as ``{"key": {field: value}, "choice": ..., "seconds": {...}}`` (JSON-ready)."""
    return [{"key": _readable(k), "choice": e["choice"], "seconds": dict(e["seconds"])} for k, e in _cache.items()]


def state_dict() -> dict:
    """The cache as plain containers (what :func:`save` writes and a training checkpoint stores)."""
    return {"format": FORMAT, "version": VERSION, "entries": entries()}


_DTYPE_FIELDS = ("dtype", "autocast")
_TUPLE_FIELDS = ("weight", "stride", "padding", "dilation", "input")


def _parse_entry(item, where: str) -> tuple:
    """(key, entry) from one JSON entry; AutotuneCacheError naming ``where`` when anything is off."""
    if not isinstance(item, dict) or set(item) - {"key", "choice", "seconds"} or "key" not in item \
            or "choice" not in item:
        raise AutotuneCacheError(f"{where}: expected an object with 'key' and 'choice' (and 'seconds'), got "
                                 f"{str(item)[:120]}")
    raw, choice = item["key"], item["choice"]
    op = raw.get("op") if isinstance(raw, dict) else None
    if op not in KEY_FIELDS:
        raise AutotuneCacheError(f"{where}: key.op must be one of {sorted(KEY_FIELDS)}, got {op!r}")
    if set(raw) != set(KEY_FIELDS[op]):
        raise AutotuneCacheError(f"{where}: a {op} key has the fields {list(KEY_FIELDS[op])}, got {sorted(raw)}")
    if choice not in ALGORITHMS[op]:
        raise AutotuneCacheError(f"{where}: choice must be one of {ALGORITHMS[op]} for {op}, got {choice!r}")
    values = []
    for f in KEY_FIELDS[op]:
        v = raw[f]
        if f in _DTYPE_FIELDS:
            if v is None and f == "autocast":
                values.append(v)
                continue
            dt = getattr(torch, v, None) if isinstance(v, str) else None
            if not isinstance(dt, torch.dtype):
                raise AutotuneCacheError(f"{where}: key.{f} must be a torch dtype name, got {v!r}")
            v = dt
        elif f in _TUPLE_FIELDS:
            if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
                raise AutotuneCacheError(f"{where}: key.{f} must be a list of ints, got {v!r}")
            v = tuple(v)
        elif f == "density_bucket" or f == "threads":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise AutotuneCacheError(f"{where}: key.{f} must be an int, got {v!r}")
        elif not isinstance(v, str):
            raise AutotuneCacheError(f"{where}: key.{f} must be a string, got {v!r}")
        values.append(v)
    seconds = item.get("seconds", {})
    if not isinstance(seconds, dict) or any(not isinstance(s, (int, float)) or isinstance(s, bool)
                                            for s in seconds.values()):
        raise AutotuneCacheError(f"{where}: seconds must map algorithms to numbers, got {str(seconds)[:120]}")
    return tuple(values), {"choice": choice, "seconds": {str(k): float(s) for k, s in seconds.items()}}


def load_state_dict(state, where: str = "autotune state") -> None:
    """Add the entries of :func:`state_dict` output to the cache (replacing those of equal keys). Every
    entry is checked before any is added: a bad one raises :class:`AutotuneCacheError` naming ``where``
    and the entry, and leaves the cache as it was."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AutotuneCacheError(f"{where}: not a sparsestart autotune cache (expected format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise AutotuneCacheError(f"{where}: version {state.get('version')!r}, this sparsestart reads {VERSION}")
    items = state.get("entries")
    if not isinstance(items, list):
        raise AutotuneCacheError(f"{where}: 'entries' must be a list, got {type(items).__name__}")
    parsed = [_parse_entry(item, f"{where}, entry {i}") for i, item in enumerate(items)]
    _cache.update(parsed)


def save(path) -> None:
    """Write the cache to ``path`` as JSON (atomically: a temporary file in the same folder, then a rename)."""
    path = Path(path)
    # One line per entry: a file of many keys stays readable and diffs line by line.
    state = state_dict()
    lines = ",\n".join("  " + json.dumps(e) for e in state["entries"])
    text = (f'{{"format": {json.dumps(FORMAT)}, "version": {VERSION}, "entries": [\n{lines}\n]}}\n'
            if lines else json.dumps(state) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path) -> None:
    """Add the choices saved in ``path`` (see :func:`save`) to the cache; :class:`AutotuneCacheError`
    naming the file when it is not a readable cache (nothing is added then)."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutotuneCacheError(f"autotune cache {path} cannot be read: {type(exc).__name__}: {exc}") from None
    load_state_dict(state, where=f"autotune cache {path}")


def _load_env_cache() -> None:
    global _env_cache_loaded
    if _env_cache_loaded:
        return
    _env_cache_loaded = True
    path = os.environ.get(ENV_CACHE)
    if path and Path(path).exists():
        load(path)
