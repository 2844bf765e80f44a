"""`experiment run --sweep NAME` runs only the named sweeps, so two processes can share one experiment."""
from __future__ import annotations

from pathlib import Path

import pytest

from sparsestart.train import experiment as ex

SPEC = """\
name: two
version: 1
title: Two sweeps
paper: "A paper reports X."
finding: "sparse is close to dense"
options: {dataset: digits, model: mlp, model_options: {hidden: [16]}, epochs: 1, batch_size: 64,
          final_eval: false, progress: false, threads: 1, train_limit: 256, test_limit: 128}
sweeps:
  first:
    methods: [static]
    distributions: [erk]
    densities: [0.5]
    seeds: [0]
  second:
    methods: [static]
    distributions: [erk]
    densities: [0.3]
    seeds: [0]
"""


def _spec(tmp_path: Path) -> ex.ExperimentSpec:
    p = tmp_path / "two.yaml"
    p.write_text(SPEC)
    return ex.load_spec(p)


def test_only_the_named_sweep_runs(tmp_path):
    spec, root = _spec(tmp_path), tmp_path / "runs"
    res = ex.run(spec, root, estimate_first=False, only=["second"], log=lambda m: None)
    assert list(res["sweeps"]) == ["second"] and res["failed"] == []
    states = {r["sweep"]: r["state"] for r in ex.status(spec, root)}
    assert states == {"first": "pending", "second": "finished"}


def test_an_unknown_sweep_name_is_refused_before_training(tmp_path):
    spec, root = _spec(tmp_path), tmp_path / "runs"
    with pytest.raises(ex.ExperimentError, match=r"--sweep third: no such sweep; the spec has first, second"):
        ex.run(spec, root, estimate_first=False, only=["third"], log=lambda m: None)
    assert not root.exists()
