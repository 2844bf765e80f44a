"""``sparsestart sweep``: a grid of training runs (method x distribution x density x seed), resumable.

Every cell of the grid is an ordinary run of :class:`~sparsestart.train.trainer.Trainer`
in ``OUT/<cell>/`` (``static-erk-d0.1-s0``; the dense baseline, density 1.0, is
one cell per seed: ``dense-s0``). Every other training option is shared by all
cells. Cells run one after the other; running the same command again (or
``sparsestart sweep --resume OUT``) skips finished cells (``summary.json``),
resumes interrupted ones (``checkpoint.pt``) and trains the rest. ``OUT/sweep.json``
holds the grid and the options. At the end :func:`sparsestart.train.report.write_report`
writes the table and plots into ``OUT``.

Method options (``--method-option KEY=VALUE``) go to every method but ``static``
(which takes none); ``METHOD:KEY=VALUE`` (``rigl:update_every=50``) to one method only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .checkpoint import CheckpointError, atomic_write_text, remove_stale_temp_files
from .config import RESUME_CHANGEABLE, TrainConfig, config_from_dict, distributions, resolve, validate
from .paths import DiskFullError, RunLock, RunLockedError, check_output_dir

__all__ = ["Cell", "SweepError", "SWEEP_FILE", "check_grid", "make_grid", "plan", "sweep", "register"]

SWEEP_FILE = "sweep.json"
FORMAT = "sparsestart-sweep"
#: The grid's axes: (TrainConfig field, sweep option).
GRID = (("method", "--methods"), ("distribution", "--distributions"), ("density", "--densities"), ("seed", "--seeds"))
#: Options of sparse runs only: the dense baseline cell does not get them.
SPARSE_ONLY = ("distribution_options", "format", "block_size", "exclude", "flow", "method_options")


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid, options that differ from the sweep in OUT, ...)."""


@dataclass(frozen=True)
class Cell:
    method: str
    distribution: Optional[str]  # None for the dense baseline
    density: float
    seed: int

    @property
    def dense(self) -> bool:
        return self.density == 1.0

    @property
    def name(self) -> str:
        if self.dense:
            return f"dense-s{self.seed}"
        return f"{self.method}-{self.distribution}-d{self.density:g}-s{self.seed}"


# ---------------------------------------------------------------------------------------------- the grid
def _items(values) -> list:
    """A list from a value, a list of values, or strings holding comma-separated values; duplicates dropped."""
    if values is None:
        return []
    if isinstance(values, (str, int, float)):
        values = [values]
    out = []
    for v in values:
        parts = [p.strip() for p in v.split(",")] if isinstance(v, str) else [v]
        for p in parts:
            if p == "":
                continue
            if p not in out:
                out.append(p)
    return out


def _density(v, option: str = "--densities") -> float:
    try:
        d = float(v)
    except (TypeError, ValueError):
        raise SweepError(f"{option}: {v!r} is not a number; densities are fractions of weights kept in (0, 1], "
                         f"1.0 = the dense baseline") from None
    if isinstance(v, bool) or not 0.0 < d <= 1.0:
        raise SweepError(f"{option}: {v!r} is outside the accepted range (0, 1]; densities are fractions of "
                         f"weights kept, 1.0 = the dense baseline")
    return d


def _seed(v) -> int:
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise SweepError(f"--seeds: {v!r} is not an integer; seeds are integers, e.g. --seeds 0 1 2") from None


def check_grid(methods, distributions_, densities, seeds) -> dict:
    """The grid's four lists, checked and normalised (names lower-case, numbers parsed, duplicates dropped).

    Errors name the option, the value and what is allowed.
    """
    from .methods import METHODS, check_method

    given = {"--methods": _items(methods), "--distributions": _items(distributions_),
             "--densities": _items(densities), "--seeds": _items(seeds)}
    allowed = {"--methods": f"one or more of {', '.join(METHODS)}",
               "--distributions": f"one or more of {', '.join(distributions())}",
               "--densities": "one or more numbers in (0, 1], e.g. --densities 0.1 0.01 1.0",
               "--seeds": "one or more integers, e.g. --seeds 0 1 2"}
    for option, values in given.items():
        if not values:
            raise SweepError(f"{option}: empty list, the grid would have no cells; give {allowed[option]}")
    meths = []
    for m in given["--methods"]:
        try:
            meths.append(check_method(str(m)))
        except ValueError as exc:
            raise SweepError(f"--methods: {exc}") from None
    for d in given["--distributions"]:
        if d not in distributions():
            raise SweepError(f"--distributions: unknown distribution {d!r}; valid names are: "
                             f"{', '.join(distributions())}")
    return {"methods": list(dict.fromkeys(meths)), "distributions": given["--distributions"],
            "densities": list(dict.fromkeys(_density(d) for d in given["--densities"])),
            "seeds": list(dict.fromkeys(_seed(s) for s in given["--seeds"]))}


def make_grid(grid: dict) -> list[Cell]:
    """The cells of a checked grid, seeds outermost (each seed completes the grid before the next), dense first."""
    cells = []
    for seed in grid["seeds"]:
        if 1.0 in grid["densities"]:
            cells.append(Cell("static", None, 1.0, seed))
        for density in (d for d in grid["densities"] if d != 1.0):
            for dist in grid["distributions"]:
                cells.extend(Cell(method, dist, density, seed) for method in grid["methods"])
    return cells


def _method_options(options: dict, method: str, methods: Iterable[str]) -> dict:
    """The options of ``method``: unprefixed keys (not for static) updated by ``method:key`` ones."""
    common, own = {}, {}
    for key, value in options.items():
        prefix, sep, name = str(key).partition(":")
        if not sep:
            common[key] = value
            continue
        if prefix not in methods:
            raise SweepError(f"--method-option {key}={value}: {prefix!r} is not one of --methods "
                             f"({', '.join(methods)}); use METHOD:KEY=VALUE with a method of the grid")
        if prefix == method:
            own[name] = value
    return {**({} if method == "static" else common), **own}


def _cell_config(cell: Cell, base: dict, explicit: set, methods) -> tuple[TrainConfig, frozenset]:
    values = dict(base)
    keys = set(explicit)
    if cell.dense:
        for k in SPARSE_ONLY:
            values.pop(k, None)
            keys.discard(k)
    else:
        values["method_options"] = _method_options(base.get("method_options") or {}, cell.method, methods)
        values["distribution"] = cell.distribution
    values.update(method=cell.method, density=cell.density, seed=cell.seed)
    keys |= {"method", "density", "seed"} | ({"distribution"} if not cell.dense else set())
    cfg = resolve(config_from_dict(values, where=f"cell {cell.name}"))
    try:
        validate(cfg, frozenset(keys))
    except ValueError as exc:
        raise SweepError(f"cell {cell.name}: {exc}") from None
    return cfg, frozenset(keys)


def _comparable(d: dict) -> dict:
    """The experiment keys of a configuration, as JSON would hold them (tuples -> lists)."""
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in RESUME_CHANGEABLE}, default=str))


def _differences(saved: dict, now: dict) -> list[str]:
    a, b = _comparable(saved), _comparable(now)
    return [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def plan(grid_given: dict, options: dict, explicit: set) -> tuple[dict, dict, set, list]:
    """The checked grid and the configuration of every cell, without running anything.

    ``grid_given``: methods/distributions/densities/seeds (None = the training default);
    ``options``: shared training options (may hold method/distribution/density/seed as single
    values); ``explicit``: which options the user set. Returns ``(grid, options, explicit,
    [(cell, config, explicit keys), ...])`` with the dataset resolved once, so that every cell and
    every invocation trains on the same data. Raises :class:`SweepError` on a bad grid or option.
    """
    grid_given, options, explicit = dict(grid_given), dict(options), set(explicit)
    # grid values given as single training options (e.g. `density: 0.1` in a config file)
    for key, axis in (("method", "methods"), ("distribution", "distributions"), ("density", "densities"),
                      ("seed", "seeds")):
        single = options.pop(key, None)
        explicit.discard(key)
        if grid_given.get(axis) is None and single is not None:
            grid_given[axis] = [single]
    resolved = resolve(config_from_dict({k: v for k, v in options.items() if k in ("data_dir", "dataset")}))
    options["dataset"] = resolved.dataset
    grid = check_grid(grid_given.get("methods") or [resolve(TrainConfig(density=0.1)).method],
                      grid_given.get("distributions") or [resolved.distribution],
                      grid_given.get("densities") or [TrainConfig.density],
                      grid_given["seeds"] if grid_given.get("seeds") is not None else [TrainConfig.seed])
    configs = [(cell, *_cell_config(cell, options, explicit, grid["methods"])) for cell in make_grid(grid)]
    return grid, options, explicit, configs


# ---------------------------------------------------------------------------------------------- running
def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _load_spec(out: Path) -> Optional[dict]:
    path = out / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SweepError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise SweepError(f"{path} is not a sparsestart sweep file")
    return spec


def sweep(out, *, methods=None, distributions=None, densities=None, seeds=None, resume: bool = False,
          report: bool = True, log: Callable[[str], None] = print, explicit: Optional[Iterable[str]] = None,
          **options) -> dict:
    """Run (or continue) the grid in ``out``; returns ``{"cells": [...], "failed": [...], "report": ...}``.

    ``options`` are training options (TrainConfig fields) shared by all cells;
    ``explicit``: which of them the user set (default: all given). With
    ``resume=True`` the grid and options come from ``out/sweep.json`` and only
    the runtime options (threads, progress, tensorboard, final_eval, data_dir,
    ood_dir) may be given. Grid values not given default to the training
    defaults (``options`` may hold ``method``/``distribution``/``density``/``seed``
    as single values instead). Raises :class:`SweepError` before anything is
    trained when the grid or an option is wrong.
    """
    from .data import DatasetNotFoundError
    from .trainer import CHECKPOINT, Trainer

    out = Path(out)
    grid_given = {"methods": methods, "distributions": distributions, "densities": densities, "seeds": seeds}
    saved = _load_spec(out)
    explicit = set(options) if explicit is None else set(explicit)
    if resume:
        if saved is None:
            raise SweepError(f"--resume {out}: no {SWEEP_FILE} there; start the sweep with --out {out} and the grid")
        extra = [k for k, v in grid_given.items() if v is not None] + \
                [k for k in options if k not in RESUME_CHANGEABLE]
        if extra:
            raise SweepError(f"--resume {out} takes the grid and options from {out / SWEEP_FILE}; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in extra)} (only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUME_CHANGEABLE)} may change)")
        grid_given = dict(saved["grid"])
        options = {**saved["options"], **options}
        explicit = set(saved["explicit"]) | explicit
    grid, options, explicit, configs = plan(grid_given, options, explicit)
    cells = [cell for cell, _, _ in configs]
    if saved is not None and not resume:
        diffs = _differences(config_from_dict(saved["options"]).to_dict(), config_from_dict(options).to_dict())
        if diffs:
            raise SweepError(f"--out {out} holds a sweep with other training options ({'; '.join(diffs)}); use the "
                             f"same options (the grid may change), or another --out")
    check_output_dir(out, "--resume" if resume else "--out")  # before the first cell trains, not after it
    out.mkdir(parents=True, exist_ok=True)
    # One sweep process per OUT (each cell is locked by its trainer too). Released before returning; on an
    # exception when the frame, and with it the lock, is dropped.
    lock = RunLock(out)
    lock.acquire(f"sweep {'--resume' if resume else '--out'} {out}")
    remove_stale_temp_files(out, (SWEEP_FILE,))  # of a sweep killed while saving sweep.json
    spec = {"format": FORMAT, "version": 1, "grid": grid, "options": options, "explicit": sorted(explicit),
            "cells": [c.name for c in cells]}
    atomic_write_text(out / SWEEP_FILE, json.dumps(spec, indent=2, default=str) + "\n")

    n = len(configs)
    log(f"sweep {out}: {n} cell(s): methods {', '.join(grid['methods'])}; distributions "
        f"{', '.join(grid['distributions'])}; densities {', '.join(f'{d:g}' for d in grid['densities'])}"
        f"{' (1 = the dense baseline, once per seed)' if 1.0 in grid['densities'] else ''}; seeds "
        f"{', '.join(map(str, grid['seeds']))}")
    results, failed, trained_seconds, trained = [], [], 0.0, 0
    for i, (cell, cfg, keys) in enumerate(configs, 1):
        d = out / cell.name
        head = f"[{i}/{n}] {cell.name}"
        summary_path = d / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            diffs = _differences(summary.get("config", {}), cfg.to_dict())
            if diffs:
                failed.append(cell.name)
                log(f"{head}: FAILED: {d} holds a finished run with other settings ({'; '.join(diffs)})")
                continue
            results.append({"name": cell.name, "status": "skipped", "summary": summary})
            log(f"{head}: finished before, skipped")
            continue
        t0 = time.perf_counter()
        indent = (lambda m: log(f"    {m}"))
        try:
            if (d / CHECKPOINT).is_file():
                trainer = Trainer(None, d, resume=True, overrides=cfg.to_dict(), log=indent)
                status = "resumed"
                log(f"{head}: resuming at epoch {trainer.epoch}")
            else:
                trainer = Trainer(cfg, d, explicit=keys, log=indent)
                status = "trained"
                log(f"{head}: training")
            summary = trainer.fit()
        except DatasetNotFoundError:
            raise
        except KeyboardInterrupt:
            log(f"{head}: interrupted (its last completed epoch is saved); continue the sweep with: "
                f"sparsestart sweep --resume {out}")
            raise
        except (ValueError, TypeError, CheckpointError) as exc:
            failed.append(cell.name)
            log(f"{head}: FAILED: {exc}")
            continue
        seconds = time.perf_counter() - t0
        trained_seconds += seconds
        trained += 1
        left = [c for c, _, _ in configs[i:] if not (out / c.name / "summary.json").is_file()]
        eta = f", about {_duration(trained_seconds / trained * len(left))} left for {len(left)} cell(s)" if left else ""
        acc = ((summary or {}).get("final", {}).get("test", {}) or {}).get("accuracy")
        log(f"{head}: {status}, test accuracy {acc:.4f} in {_duration(seconds)}{eta}" if acc is not None
            else f"{head}: {status} in {_duration(seconds)}{eta}")
        results.append({"name": cell.name, "status": status, "summary": summary})
    counts = {s: sum(r["status"] == s for r in results) for s in ("trained", "resumed", "skipped")}
    log(f"sweep {out}: {counts['trained']} trained, {counts['resumed']} resumed, {counts['skipped']} finished before"
        f"{f', {len(failed)} FAILED: ' + ', '.join(failed) if failed else ''}")
    written = None
    if report:
        from .report import write_report

        written = write_report([out], out, log=log)
    lock.release()
    return {"cells": results, "failed": failed, "report": written}


# ---------------------------------------------------------------------------------------------- command line
def register(sub) -> None:
    from .cli import add_options

    p = sub.add_parser("sweep", help="train a grid of runs (methods x distributions x densities x seeds), resumable",
                       description="Train every cell of the grid (one run each in OUT/<cell>/, sequentially), "
                                   "skipping finished cells and resuming interrupted ones, then write the report "
                                   "(sparsestart report). Every other `sparsestart train` option applies to every "
                                   "cell; --method-option KEY=VALUE goes to every method but static, "
                                   "METHOD:KEY=VALUE (rigl:update_every=50) to that method only. "
                                   "See docs/training.md.")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="training methods (space or comma separated; "
                                                                "default rigl if available, else static)")
    p.add_argument("--distributions", nargs="+", metavar="NAME", help="layer-wise density rules (default erk if "
                                                                      "available, else uniform)")
    p.add_argument("--densities", nargs="+", metavar="D", help="overall densities in (0, 1]; 1.0 = the dense "
                                                                "baseline, one cell per seed (default 0.1)")
    p.add_argument("--seeds", nargs="+", metavar="N", help="seeds (default 0)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (a cell per subdirectory)")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR with its saved grid and options")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of training options (command line wins)")
    p.add_argument("--no-report", dest="report", action="store_false", help="do not write the report at the end")
    add_options(p, skip={key for key, _ in GRID})
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import error, gather_options
    from .data import DatasetNotFoundError

    try:
        if not args.out and not args.resume:
            raise SweepError("--out DIR is required (or --resume DIR to continue a sweep)")
        if args.out and args.resume and Path(args.out) != Path(args.resume):
            raise SweepError(f"--out {args.out} and --resume {args.resume} name different directories")
        if args.resume and args.config:
            raise SweepError("--resume takes the options from the sweep's sweep.json; drop --config")
        values, explicit = gather_options(args)
        result = sweep(args.resume or args.out, methods=args.methods, distributions=args.distributions,
                       densities=args.densities, seeds=args.seeds, resume=bool(args.resume), report=args.report,
                       explicit=explicit, **values)
    except (ValueError, TypeError, DatasetNotFoundError, CheckpointError, RunLockedError) as exc:
        return error("sweep", exc)
    except DiskFullError as exc:
        error("sweep", f"{exc}; continue the sweep with: sparsestart sweep --resume {args.resume or args.out}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 1 if result["failed"] else 0
