"""``sparsestart experiment run|status|estimate|report NAME``: named, versioned experiments over sweeps.

An experiment is a YAML spec (``experiments/NAME.yaml``) that names a finding of the papers and
the sweeps (:mod:`sparsestart.train.sweep`) that test it::

    name: table1-ordering        # = the file name
    version: 1                   # a new version trains into a new directory
    title: Layer-wise densities at high sparsity
    paper: "Gadhikar et al. 2023, Table 1: ..."   # what the paper reports (free text)
    finding: "balanced and pyramidal >= ERK > uniform at density 0.01"
    options: {dataset: fashion-mnist, model: resnet20, epochs: 10}   # training options of every run
    sweeps:
      main:
        methods: [static]
        distributions: [uniform, erk, balanced, pyramidal]
        densities: [1.0, 0.01]
        seeds: [0, 1, 2]
        options: {}              # more options for this sweep only

``run`` prints a budget estimate (CPU-hours) and trains every sweep into
``ROOT/NAME/vVERSION/SWEEP/`` (default ROOT ``runs/experiments``); it is resumable like a sweep:
the same command skips finished runs and continues interrupted ones. ``report`` copies the runs'
``summary.json`` files into ``docs/experiments/NAME/`` (small, committed: the evidence) and
generates from them, never by hand, ``docs/experiments/NAME.md``: the finding, the protocol, the
exact commands, the code versions that trained the runs, the CPU time spent, and per sweep the
table (mean ± 95% CI over seeds) and plots of :func:`sparsestart.train.report.write_report`.

Besides training sweeps (``kind: train``, the default), a spec may be of ``kind: flow``: flow repair
measured on untrained networks (``flow:`` models, densities, distributions, seeds, the paper's
flag counts; :mod:`sparsestart.init.flow_study`), run, resumed and reported by the same commands
into ``ROOT/NAME/vVERSION/flow/results.json`` and ``docs/experiments/NAME/results.json``
(:mod:`sparsestart.train.experiment_flow`); or of
``kind: reference``: a finding measured elsewhere (``link:`` a page), listed for
``docs/reproduction.md`` only. Every spec may carry ``verdict:`` (the claims that decide its row of
``docs/reproduction.md``, written by ``sparsestart experiment reproduction``; see
:mod:`sparsestart.train.reproduction`), ``row:`` (short texts for that row), ``order:`` (its
position) and ``testable: false`` with ``why:``.

The budget estimate times a few training steps of every distinct (sweep, model, method, density)
on this machine (or uses the measured time of finished runs) and scales it to the whole run; it
is an estimate, typically within a factor of 1.5 (evaluation, augmentation and cache effects are
not modelled).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import atomic_write_text
from ..init.flow_study import flow_cell_key
from .experiment_flow import flow_estimate, flow_report, flow_run, flow_status
from .experiment_spec import (DOC_ROOT, KINDS, RUN_ROOT, SPEC_DIR, VERSIONS_FILE, ExperimentError,  # noqa: F401
                              ExperimentSpec, FlowSpec, SweepSpec, _GRID, code_version, hours, load_spec,
                              report_header, tally)
from .sweep import SweepError, sweep

__all__ = ["ExperimentSpec", "FlowSpec", "ExperimentError", "load_spec", "estimate", "run", "status", "report",
           "reproduction", "flow_cell_key", "register", "KINDS", "SPEC_DIR", "RUN_ROOT", "DOC_ROOT"]

# ---------------------------------------------------------------------------------------------- estimate
CALIBRATION_BATCHES = 6  # training steps timed per distinct cost of a spec

def _threads(cfg) -> int:
    import torch

    return int(cfg.threads or torch.get_num_threads())


def _cost_key(cfg) -> tuple:
    # What the time of a run depends on, beyond the number of epochs and samples.
    return (cfg.dataset, cfg.model, json.dumps(cfg.model_options, sort_keys=True), cfg.method,
            json.dumps(cfg.method_options, sort_keys=True, default=str), cfg.density, cfg.distribution,
            cfg.format, cfg.batch_size, cfg.augment, cfg.device)


def _train_samples(cfg) -> int:
    from .data import load_dataset

    data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                        train_limit=cfg.train_limit, test_limit=1)
    return len(data.train)


def _calibrate(cfg, log) -> float:
    """Seconds per training sample of ``cfg`` on this machine: a short run over a few batches."""
    from .trainer import Trainer

    n = CALIBRATION_BATCHES * cfg.batch_size
    short = dataclasses.replace(cfg, epochs=1, train_limit=n, test_limit=cfg.eval_batch_size, final_eval=False,
                                progress=False, tensorboard=False)
    from ..nn import autotune

    # The layers' algorithm choice is timed on the first call of each shape; in a few calibration steps
    # that one-time cost (about 40 steps' worth per run of a VGG-16 at density 0.001, a few % of a run)
    # would count as if every step paid it, so the calibration computes with the threshold rule.
    tuning = autotune.enabled()
    autotune.set_enabled(False)
    try:
        with tempfile.TemporaryDirectory(prefix="sparsestart-estimate-") as tmp:
            trainer = Trainer(short, Path(tmp) / "run", log=lambda m: None)
            summary = trainer.fit()
    finally:
        autotune.set_enabled(tuning)
    seconds = float(summary.get("train_seconds") or summary.get("wall_time_seconds"))
    return seconds / max(1, n)


def estimate(spec: ExperimentSpec, root=None, *, log: Callable[[str], None] = print) -> dict:
    """``{"cells", "done", "left_seconds", "left_cpu_hours", "done_cpu_hours"}``: what the rest will cost."""
    _runnable(spec)
    if spec.kind == "flow":
        return flow_estimate(spec, root, log)
    per_sample: dict = {}
    samples: dict = {}
    totals = {"cells": 0, "done": 0, "left_seconds": 0.0, "left_cpu_hours": 0.0, "done_cpu_hours": 0.0}
    for s in spec.sweeps:
        sdir = spec.run_dir(root) / s.name
        for cell, cfg, _ in spec.planned(s):
            totals["cells"] += 1
            summary = _summary(sdir / cell.name)
            key = _cost_key(cfg)
            if summary is not None:
                totals["done"] += 1
                wall = float(summary.get("wall_time_seconds") or 0.0)
                totals["done_cpu_hours"] += wall * int(summary.get("threads") or _threads(cfg)) / 3600
                n = summary.get("epochs") or cfg.epochs
                data_key = (cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.val_fraction)
                if data_key not in samples:
                    samples[data_key] = _train_samples(cfg)
                per_sample.setdefault(key, wall / max(1, n * samples[data_key]))
                continue
            if key not in per_sample:
                log(f"estimate: timing {CALIBRATION_BATCHES} steps of {cell.name} ({cfg.model}, {s.name})")
                per_sample[key] = _calibrate(cfg, log)
            data_key = (cfg.dataset, cfg.data_dir, cfg.train_limit, cfg.val_fraction)
            if data_key not in samples:
                samples[data_key] = _train_samples(cfg)
            seconds = per_sample[key] * samples[data_key] * cfg.epochs
            totals["left_seconds"] += seconds
            totals["left_cpu_hours"] += seconds * _threads(cfg) / 3600
    return totals


# ---------------------------------------------------------------------------------------------- running
def _summary(run_dir: Path) -> Optional[dict]:
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _record_versions(spec: ExperimentSpec, root) -> None:
    """Stamp every finished run that has no code version yet with this process's version.

    Called after each sweep (also when it is interrupted), so a run's stamp is the code that
    finished it; a run finished by a process killed with SIGKILL is stamped by the next invocation.
    """
    base = spec.run_dir(root)
    path = base / VERSIONS_FILE
    versions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    version = code_version()
    changed = False
    for s in spec.sweeps:
        for cell, _, _ in spec.planned(s):
            key = f"{s.name}/{cell.name}"
            if key not in versions and (base / s.name / cell.name / "summary.json").is_file():
                versions[key] = version
                changed = True
    if changed:
        atomic_write_text(path, json.dumps(versions, indent=1, sort_keys=True) + "\n")


def _restore_archived(spec: ExperimentSpec, root, docs_root, sweeps, log: Callable[[str], None]) -> int:
    """Copy the archived summary (and code version) of every planned run that has neither a summary nor a
    checkpoint under ``root`` back into its run directory, so a fresh checkout does not train again what
    the report already holds; the sweep then checks each restored summary's settings against the spec
    (a run archived with other settings is reported, never reused). Returns how many were restored."""
    from .trainer import CHECKPOINT

    base, docs = spec.run_dir(root), Path(docs_root or DOC_ROOT) / spec.name
    archived_versions = docs / VERSIONS_FILE
    old = json.loads(archived_versions.read_text(encoding="utf-8")) if archived_versions.is_file() else {}
    path = base / VERSIONS_FILE
    versions = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    restored = 0
    for s in sweeps:
        for cell, _, _ in spec.planned(s):
            d, src = base / s.name / cell.name, docs / "runs" / s.name / cell.name / "summary.json"
            if src.is_file() and not (d / "summary.json").exists() and not (d / CHECKPOINT).exists():
                d.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, d / "summary.json")
                key = f"{s.name}/{cell.name}"
                if key in old:
                    versions[key] = old[key]
                restored += 1
    if restored:
        base.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(versions, indent=1, sort_keys=True) + "\n")
        log(f"experiment {spec.tag}: {restored} run(s) finished before are archived in {docs}; their summaries "
            f"are restored under {base} and not trained again")
    return restored


def run(spec: ExperimentSpec, root=None, *, runtime: Optional[dict] = None, estimate_first: bool = True,
        only: Optional[list] = None, docs_root=None, log: Callable[[str], None] = print) -> dict:
    """Train (or continue) every sweep of ``spec``; ``runtime``: options that never change results (threads, ...).

    ``only``: names of the sweeps to run (default all), so that separate processes can run different sweeps of one
    experiment side by side (each sweep directory is locked by the process that runs it). Runs archived in
    ``docs_root`` (default docs/experiments) whose run directory is gone are restored, not trained again."""
    _runnable(spec)
    if spec.kind == "flow":
        return flow_run(spec, root, runtime=dict(runtime or {}), estimate_first=estimate_first, log=log)
    runtime = dict(runtime or {})
    names = [s.name for s in spec.sweeps]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ExperimentError(f"experiment {spec.tag}: --sweep {', '.join(unknown)}: no such sweep; "
                              f"the spec has {', '.join(names)}")
    sweeps = [s for s in spec.sweeps if not only or s.name in only]
    base = spec.run_dir(root)
    _restore_archived(spec, root, docs_root, sweeps, log)
    if estimate_first:
        est = estimate(spec, root, log=log)
        log(f"experiment {spec.tag}: {est['done']} of {est['cells']} run(s) finished "
            f"({est['done_cpu_hours']:.2f} CPU-hours spent); the rest needs about {hours(est['left_seconds'])} "
            f"of wall time, {est['left_cpu_hours']:.2f} CPU-hours, on this machine")
    base.mkdir(parents=True, exist_ok=True)
    atomic_write_text(base / "spec.yaml", spec.path.read_text(encoding="utf-8") if spec.path else "")
    results, failed = {}, []
    for s in sweeps:
        log(f"experiment {spec.tag}: sweep {s.name}")
        try:
            res = sweep(base / s.name, report=False, log=log, explicit=set(spec.sweep_options(s)),
                        **s.grid, **spec.sweep_options(s), **runtime)
        finally:
            _record_versions(spec, root)
        results[s.name] = res
        failed += [f"{s.name}/{c}" for c in res["failed"]]
    log(f"experiment {spec.tag}: done{f', {len(failed)} FAILED: ' + ', '.join(failed) if failed else ''}; "
        f"write the report with: sparsestart experiment report {spec.name}")
    return {"sweeps": results, "failed": failed}


def status(spec: ExperimentSpec, root=None) -> list[dict]:
    """One row per run: sweep, cell, state (finished / interrupted / pending), test accuracy, wall seconds."""
    from .trainer import CHECKPOINT

    _runnable(spec)
    base = spec.run_dir(root)
    rows = []
    if spec.kind == "flow":
        return flow_status(spec, root)
    for s in spec.sweeps:
        for cell, _, _ in spec.planned(s):
            d = base / s.name / cell.name
            summary = _summary(d)
            if summary is not None:
                acc = ((summary.get("final") or {}).get("test") or {}).get("accuracy")
                rows.append(dict(sweep=s.name, cell=cell.name, state="finished", accuracy=acc,
                                 seconds=summary.get("wall_time_seconds")))
            else:
                rows.append(dict(sweep=s.name, cell=cell.name,
                                 state="interrupted" if (d / CHECKPOINT).is_file() else "pending",
                                 accuracy=None, seconds=None))
    return rows


# ---------------------------------------------------------------------------------------------- the report
def _archive(spec: ExperimentSpec, root, docs: Path) -> dict:
    """Copy every finished run's summary.json into ``docs/NAME/runs/SWEEP/CELL/``; returns {sweep: archived runs}."""
    base = spec.run_dir(root)
    counts = {}
    for s in spec.sweeps:
        n = 0
        for cell, _, _ in spec.planned(s):
            src = base / s.name / cell.name / "summary.json"
            dst = docs / "runs" / s.name / cell.name / "summary.json"
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            n += dst.is_file()  # archived now or before (the runs themselves may be gone)
        counts[s.name] = n
    versions = base / VERSIONS_FILE
    if versions.is_file():
        shutil.copyfile(versions, docs / VERSIONS_FILE)
    return counts


def _command_line(s: SweepSpec, options: dict, out: Path) -> str:
    parts = ["sparsestart sweep", f"--out {out}"]
    for k in _GRID:
        parts.append(f"--{k} " + " ".join(str(v) for v in s.grid[k]))
    for k, v in sorted(options.items()):
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, dict):
            opt = {"method_options": "--method-option", "distribution_options": "--distribution-option",
                   "model_options": "--model-option"}.get(k, flag)
            parts.extend(f"{opt} {kk}={vv}" for kk, vv in v.items())
        elif isinstance(v, (list, tuple)):
            parts.append(f"{flag} " + " ".join(map(str, v)))
        elif v is not None:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def report(spec: ExperimentSpec, root=None, docs_root=None, *, log: Callable[[str], None] = print) -> Path:
    """Write ``docs/experiments/NAME.md`` (and NAME/ with the archived summaries, tables and plots)."""
    from .report import write_report

    _runnable(spec)
    docs_root = Path(docs_root or DOC_ROOT)
    docs = docs_root / spec.name
    if spec.kind == "flow":
        return flow_report(spec, root, docs_root, log)
    docs.mkdir(parents=True, exist_ok=True)
    counts = _archive(spec, root, docs)
    if not any(counts.values()):
        raise ExperimentError(f"experiment {spec.tag}: no finished run under {spec.run_dir(root)}; "
                              f"run: sparsestart experiment run {spec.name}")
    versions = json.loads((docs / VERSIONS_FILE).read_text()) if (docs / VERSIONS_FILE).is_file() else {}
    cpu_hours, runs = 0.0, 0
    for summary_path in sorted((docs / "runs").glob("*/*/summary.json")):
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        cpu_hours += float(summary.get("wall_time_seconds") or 0.0) * int(summary.get("threads") or 1) / 3600
        runs += 1
    planned = sum(len(spec.planned(s)) for s in spec.sweeps)
    md = [f"# {spec.title}", "",
          f"Experiment `{spec.tag}` (spec: [`experiments/{spec.name}.yaml`](../../experiments/{spec.name}.yaml)). "
          f"Generated by `sparsestart experiment report {spec.name}` from the runs' summaries archived in "
          f"[`{spec.name}/runs/`]({spec.name}/runs/); do not edit by hand.", ""]
    md += report_header(spec)
    md += [f"**Runs:** {runs} of {planned} planned finished; {cpu_hours:.2f} CPU-hours (wall time × threads).",
           "", "**Code versions** (git describe of the checkout that finished the runs): "
           + (", ".join(f"`{v}` ({n} runs)" for v, n in tally(versions.values())) or "not recorded"), "",
           "**Commands:** `sparsestart experiment run " + spec.name + "` runs every sweep (resumable); "
           "each sweep alone is:", ""]
    for s in spec.sweeps:
        # The default run folder, not the one these runs happened to use: the commands are for a reader's checkout.
        md += ["```", _command_line(s, spec.sweep_options(s), spec.run_dir() / s.name), "```"]
    for s in spec.sweeps:
        if not counts.get(s.name):
            md += ["", f"## Sweep `{s.name}`", "", "No finished run yet."]
            continue
        res = write_report([docs / "runs" / s.name], docs / s.name, log=lambda m: None)
        md += ["", f"## Sweep `{s.name}`", "",
               "Final-epoch test metrics, mean ± 95% CI over seeds (Student t, n − 1 degrees of freedom); "
               f"the full table with every metric and the plots: [{s.name}/report.md]({s.name}/report.md).", "",
               res["table"], ""]
        md += [f"![{p.name}]({s.name}/{p.name})" for p in res["plots"] if p.name == "accuracy_vs_sparsity.png"]
    if spec.verdict is not None:
        from .reproduction import evaluate

        r = evaluate(spec, docs_root)
        md += ["", "## Verdict", "", f"**{r['verdict']}** (rule: see [docs/reproduction.md](../reproduction.md)).", "",
               "| claim | a | b | outcome |", "|---|---|---|---|"]
        md += [f"| {c['text']} | {c['a'] or '-'} | {c['b'] or '-'} | {c['outcome']} |" for c in r["claims"]]
    path = docs_root / f"{spec.name}.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    log(f"experiment {spec.tag}: report -> {path}; refresh docs/reproduction.md with: "
        f"sparsestart experiment reproduction")
    return path


# ---------------------------------------------------------------------------------------------- shared checks
def _runnable(spec: ExperimentSpec) -> None:
    if spec.kind == "reference":
        raise ExperimentError(f"experiment {spec.tag} is of kind reference: nothing to run here; it points to "
                              f"{spec.link} (measured elsewhere). See: sparsestart experiment reproduction")


def reproduction(docs_root=None, out=None, spec_dir=None, *, log: Callable[[str], None] = print) -> Path:
    """Write docs/reproduction.md from every spec in ``spec_dir`` and the runs archived under ``docs_root``."""
    from .reproduction import write_reproduction

    spec_dir = Path(spec_dir or SPEC_DIR)
    docs_root = Path(docs_root or DOC_ROOT)
    specs = [load_spec(p) for p in sorted(spec_dir.glob("*.yaml"))]
    if not specs:
        raise ExperimentError(f"experiment reproduction: no spec in {spec_dir} (run from the checkout's root)")
    return write_reproduction(specs, docs_root, Path(out) if out else docs_root.parent / "reproduction.md", log=log)


# ---------------------------------------------------------------------------------------------- command line
def register(sub) -> None:
    p = sub.add_parser("experiment", help="run, check or report a named experiment (experiments/NAME.yaml)",
                       description="Named, versioned experiments: each spec in experiments/ names a finding of the "
                                   "papers and the sweeps that test it. run: print a budget estimate and train "
                                   "(resumable); status: what is finished; estimate: the budget only; report: "
                                   "write docs/experiments/NAME.md from the runs; reproduction: write "
                                   "docs/reproduction.md (a verdict per finding) from every spec and the archived "
                                   "runs.")
    p.add_argument("action", choices=("run", "status", "estimate", "report", "list", "reproduction"))
    p.add_argument("name", nargs="?", help="experiment name (experiments/NAME.yaml) or a spec file")
    p.add_argument("--root", metavar="DIR", help=f"where runs live (default {RUN_ROOT})")
    p.add_argument("--docs", metavar="DIR", help=f"where reports go (default {DOC_ROOT})")
    p.add_argument("--threads", type=int, help="CPU threads per run (never changes results)")
    p.add_argument("--sweep", action="append", metavar="NAME",
                   help="run: only this sweep of the spec (repeatable; default all). Lets two processes share the work")
    p.add_argument("--no-estimate", dest="estimate", action="store_false", help="run without the budget estimate")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import error

    try:
        if args.action == "list":
            for p in sorted(SPEC_DIR.glob("*.yaml")) if SPEC_DIR.is_dir() else []:
                spec = load_spec(p)
                print(f"{spec.name:28s} v{spec.version}  {spec.kind:9s} {spec.title}")
            return 0
        if args.action == "reproduction":
            reproduction(args.docs)
            return 0
        if not args.name:
            raise ExperimentError(f"experiment {args.action}: give NAME (see: sparsestart experiment list)")
        spec = load_spec(args.name)
        if args.action == "run":
            runtime = {"threads": args.threads} if args.threads else {}
            res = run(spec, args.root, runtime=runtime, estimate_first=args.estimate, only=args.sweep,
                      docs_root=args.docs)
            return 1 if res["failed"] else 0
        if args.action == "estimate":
            est = estimate(spec, args.root)
            print(f"experiment {spec.tag}: {est['done']} of {est['cells']} run(s) finished "
                  f"({est['done_cpu_hours']:.2f} CPU-hours spent); the rest: about {hours(est['left_seconds'])} "
                  f"wall, {est['left_cpu_hours']:.2f} CPU-hours")
            return 0
        if args.action == "status":
            rows = status(spec, args.root)
            for r in rows:
                acc = f"{r['accuracy']:.4f}" if isinstance(r["accuracy"], (int, float)) else ""
                secs = f"{r['seconds']:.0f}s" if isinstance(r["seconds"], (int, float)) else ""
                print(f"{r['sweep']:12s} {r['cell']:32s} {r['state']:11s} {acc:>7s} {secs:>7s}")
            done = sum(r["state"] == "finished" for r in rows)
            print(f"experiment {spec.tag}: {done}/{len(rows)} finished")
            return 0
        report(spec, args.root, args.docs)
        return 0
    except (ExperimentError, SweepError, ValueError) as exc:
        return error("experiment", exc)
    except KeyboardInterrupt:
        return 130
