"""The experiment specs: ``experiments/NAME.yaml`` read and checked before anything runs.

The format is described in :mod:`sparsestart.train.experiment`, which runs and reports specs;
this module turns a file into an :class:`ExperimentSpec` (or an :class:`ExperimentError`
naming the file, the key and what is allowed), so that :mod:`sparsestart.train.reproduction`
can read specs without the runner, and holds the few helpers both runners share (training
experiments in :mod:`sparsestart.train.experiment`, flow-repair ones in
:mod:`sparsestart.train.experiment_flow`): the code version stamped on results, durations and
the header of a report.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .sweep import SweepError, check_grid, plan

if TYPE_CHECKING:  # reproduction.py reads specs through this module
    from .reproduction import VerdictSpec

#: Where specs, runs and reports live, relative to the working directory (the checkout).
SPEC_DIR = Path("experiments")
RUN_ROOT = Path("runs/experiments")
DOC_ROOT = Path("docs/experiments")
VERSIONS_FILE = "code_versions.json"
_SPEC_KEYS = {"name", "version", "title", "paper", "finding", "protocol", "options", "sweeps", "kind", "flow", "verdict",
              "testable", "why", "link", "row", "order"}
#: What an experiment does: train sweeps, measure flow repair (no training), or point to a page measured elsewhere.
KINDS = ("train", "flow", "reference")
_FLOW_KEYS = {"models", "densities", "distributions", "seeds", "setup", "input_shape", "paper_flags"}
_ROW_KEYS = {"finding", "paper", "protocol"}
_SWEEP_KEYS = {"methods", "distributions", "densities", "seeds", "options"}
_GRID = ("methods", "distributions", "densities", "seeds")


class ExperimentError(ValueError):
    """A spec that cannot be read or run as written."""


@dataclass
class SweepSpec:
    name: str
    grid: dict
    options: dict


@dataclass
class FlowSpec:
    """``kind: flow``: flow repair measured on untrained networks, one cell per (model, rule, density, seed)."""
    models: dict  # label -> {"model": name, "num_classes": int}
    densities: list
    distributions: list
    seeds: list
    setup: str = "exact"
    input_shape: tuple = (3, 32, 32)
    paper_flags: dict = field(default_factory=dict)  # label -> rule -> [value per density] (None: not printed)

    def cells(self) -> list:
        """``[(model label, distribution, density, seed)]`` in run order."""
        return [(m, dist, d, seed) for m in self.models for d in self.densities for dist in self.distributions
                for seed in self.seeds]


@dataclass
class ExperimentSpec:
    name: str
    version: int
    title: str
    paper: str
    finding: str
    protocol: str
    options: dict
    sweeps: list = field(default_factory=list)  # [SweepSpec]
    path: Optional[Path] = None
    kind: str = "train"
    flow: Optional[FlowSpec] = None
    verdict: Optional["VerdictSpec"] = None
    testable: bool = True
    why: str = ""
    link: str = ""
    row: dict = field(default_factory=dict)  # short texts for docs/reproduction.md: finding, paper, protocol
    order: int = 100

    @property
    def tag(self) -> str:
        return f"{self.name}/v{self.version}"

    def run_dir(self, root=None) -> Path:
        return Path(root or RUN_ROOT) / self.name / f"v{self.version}"

    def sweep_options(self, s: SweepSpec) -> dict:
        return {**self.options, **s.options}

    def planned(self, s: SweepSpec) -> list:
        """``[(cell, config, explicit keys)]`` of one sweep (checks the grid and options)."""
        options = self.sweep_options(s)
        try:
            return plan(s.grid, options, set(options))[3]
        except (SweepError, ValueError) as exc:
            raise ExperimentError(f"{self.where}: sweep {s.name!r}: {exc}") from None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else self.name


# ---------------------------------------------------------------------------------------------- the spec
def _spec_path(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ExperimentError(f"experiment {name_or_path}: no such file")
        return p
    candidate = SPEC_DIR / f"{p.name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in SPEC_DIR.glob("*.yaml")) if SPEC_DIR.is_dir() else []
    raise ExperimentError(f"experiment {name_or_path!r}: no spec {candidate} (run from the checkout's root); "
                          f"known experiments: {', '.join(known) or 'none'}")


def load_spec(name_or_path) -> ExperimentSpec:
    """The checked spec of an experiment: a name (``experiments/NAME.yaml``) or a path to a YAML file."""
    import yaml

    path = _spec_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"{path}: cannot read the spec ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: a spec is a mapping with keys {', '.join(sorted(_SPEC_KEYS))}")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ExperimentError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_SPEC_KEYS))}")
    kind = data.get("kind", "train")
    if kind not in KINDS:
        raise ExperimentError(f"{path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    need = {"train": ("sweeps",), "flow": ("flow",), "reference": ("link",)}[kind]
    for key in ("name", "version", "title", "finding") + need:
        if key not in data:
            raise ExperimentError(f"{path}: missing key {key!r}" + (f" (kind {kind})" if key in need else ""))
    for key in sorted({"sweeps", "flow"} - set(need)):
        if key in data:
            raise ExperimentError(f"{path}: key {key!r} does not belong to a spec of kind {kind!r}")
    if data["name"] != path.stem:
        raise ExperimentError(f"{path}: name {data['name']!r} must equal the file name {path.stem!r}")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExperimentError(f"{path}: version {version!r} must be an integer >= 1")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ExperimentError(f"{path}: options must be a mapping of training options, got {type(options).__name__}")
    testable = data.get("testable", True)
    if not isinstance(testable, bool):
        raise ExperimentError(f"{path}: testable {testable!r} must be true or false")
    if not testable and not str(data.get("why") or "").strip():
        raise ExperimentError(f"{path}: testable: false needs why: (the reason, shown in docs/reproduction.md)")
    row = data.get("row") or {}
    if not isinstance(row, dict) or set(row) - _ROW_KEYS:
        raise ExperimentError(f"{path}: row must be a mapping with keys among {', '.join(sorted(_ROW_KEYS))}, "
                              f"got {row!r}")
    order = data.get("order", 100)
    if isinstance(order, bool) or not isinstance(order, int):
        raise ExperimentError(f"{path}: order {order!r} must be an integer (rows of docs/reproduction.md sort by it)")
    spec = ExperimentSpec(name=data["name"], version=version, title=str(data["title"]),
                          paper=str(data.get("paper") or ""), finding=str(data["finding"]),
                          protocol=str(data.get("protocol") or ""), options=dict(options), path=path, kind=kind,
                          testable=testable, why=str(data.get("why") or ""), link=str(data.get("link") or ""),
                          row={k: str(v) for k, v in row.items()}, order=order)
    if kind == "train":
        if not isinstance(data["sweeps"], dict) or not data["sweeps"]:
            raise ExperimentError(f"{path}: sweeps must be a non-empty mapping NAME -> grid")
        for sname, body in data["sweeps"].items():
            if not isinstance(body, dict):
                raise ExperimentError(f"{path}: sweep {sname!r} must be a mapping with keys "
                                      f"{', '.join(sorted(_SWEEP_KEYS))}")
            bad = sorted(set(body) - _SWEEP_KEYS)
            if bad:
                raise ExperimentError(f"{path}: sweep {sname!r}: unknown key(s) {', '.join(bad)}; valid keys: "
                                      f"{', '.join(sorted(_SWEEP_KEYS))}")
            missing = [k for k in _GRID if k not in body]
            if missing:
                raise ExperimentError(f"{path}: sweep {sname!r}: give {', '.join(missing)} explicitly (an experiment "
                                      f"does not rely on defaults that may change)")
            s = SweepSpec(name=str(sname), grid={k: body[k] for k in _GRID}, options=dict(body.get("options") or {}))
            spec.sweeps.append(s)
            spec.planned(s)  # checks the grid and options now, before anything runs
    elif kind == "flow":
        spec.flow = _load_flow(path, data["flow"])
    if "verdict" in data:
        from .reproduction import load_verdict

        try:
            spec.verdict = load_verdict(spec, data["verdict"])
        except ValueError as exc:
            raise ExperimentError(f"{path}: verdict: {exc}") from None
    return spec


def _load_flow(path: Path, body) -> FlowSpec:
    from ..init.flow_study import SETUPS

    if not isinstance(body, dict):
        raise ExperimentError(f"{path}: flow must be a mapping with keys {', '.join(sorted(_FLOW_KEYS))}")
    bad = sorted(set(body) - _FLOW_KEYS)
    if bad:
        raise ExperimentError(f"{path}: flow: unknown key(s) {', '.join(bad)}; valid keys: {', '.join(sorted(_FLOW_KEYS))}")
    missing = [k for k in ("models", "densities", "distributions", "seeds") if k not in body]
    if missing:
        raise ExperimentError(f"{path}: flow: give {', '.join(missing)} explicitly")
    models = body["models"]
    if not isinstance(models, dict) or not models:
        raise ExperimentError(f"{path}: flow: models must map a label to {{model: NAME, num_classes: N}}, got {models!r}")
    clean = {}
    for label, m in models.items():
        if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "num_classes"}:
            raise ExperimentError(f"{path}: flow: models: {label}: give {{model: NAME, num_classes: N}}, got {m!r}")
        clean[str(label)] = {"model": str(m["model"]), "num_classes": int(m.get("num_classes", 10))}
    try:
        grid = check_grid(["static"], body["distributions"], body["densities"], body["seeds"])
    except SweepError as exc:
        raise ExperimentError(f"{path}: flow: {exc}") from None
    if 1.0 in grid["densities"]:
        raise ExperimentError(f"{path}: flow: densities: 1.0 has nothing to repair; give densities in (0, 1)")
    setup = body.get("setup", "exact")
    if setup not in SETUPS:
        raise ExperimentError(f"{path}: flow: setup {setup!r} is not one of {', '.join(SETUPS)}")
    shape = body.get("input_shape", [3, 32, 32])
    if not isinstance(shape, (list, tuple)) or not all(isinstance(x, int) and x > 0 for x in shape):
        raise ExperimentError(f"{path}: flow: input_shape {shape!r} must be a list of positive integers, e.g. [3, 32, 32]")
    paper = body.get("paper_flags") or {}
    for label, rules in paper.items():
        if label not in clean or not isinstance(rules, dict):
            raise ExperimentError(f"{path}: flow: paper_flags: {label!r} must be one of the models "
                                  f"({', '.join(clean)}) and map rules to values")
        for rule, values in rules.items():
            if rule not in grid["distributions"] or not isinstance(values, list) or len(values) != len(grid["densities"]):
                raise ExperimentError(f"{path}: flow: paper_flags: {label}: {rule}: give one value (or null) per "
                                      f"density ({len(grid['densities'])}) of a rule in distributions")
    return FlowSpec(models=clean, densities=grid["densities"], distributions=grid["distributions"],
                    seeds=grid["seeds"], setup=setup, input_shape=tuple(shape), paper_flags=paper)


# ---------------------------------------------------------------------------------------------- shared by the runners
def code_version() -> str:
    """``git describe --always --dirty`` of the checkout holding this package, else the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from .. import __version__

    return f"sparsestart {__version__}"


def hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.1f} h" if h >= 1 else f"{seconds / 60:.0f} min"


def report_header(spec: "ExperimentSpec") -> list:
    """The lines every report opens with: the paper's claim, the finding tested and our protocol."""
    md = ["**The paper:** " + spec.paper.strip(), ""] if spec.paper else []
    md += ["**Finding tested:** " + spec.finding.strip(), ""]
    if spec.protocol:
        md += ["**Protocol:** " + spec.protocol.strip(), ""]
    return md


def tally(values) -> list:
    """[(value, how often)] sorted by value."""
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return sorted(out.items())
