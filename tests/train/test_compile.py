"""--compile: the training step through torch.compile, for every sparse method.

The compiled runs use the "aot_eager" backend (dynamo + AOTAutograd: the tracing, guards and graph
breaks of --compile, without inductor's C++ code generation, which takes tens of seconds per graph
on a CPU); it runs the traced aten ops, so a compiled run must give the eager run's metrics exactly.
Graphs are counted: a method whose Python state was traced into guards (RigL's "is this step's
gradient needed") recompiled the model at every step until dynamo gave up and fell back to eager.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch._dynamo

from sparsestart.cli import main
from sparsestart.train import run as R
from sparsestart.train.config import TrainConfig, validate
from sparsestart.train.methods import METHODS
from sparsestart.train.trainer import Trainer
from tests.train.conftest import digits_cfg, rows, untimed

# Few steps per epoch and frequent updates, so every method changes its structure within the run.
METHOD_OPTIONS = {"rigl": {"update_every": 2}, "set": {"update_every": 2}, "gradual": {"update_every": 2},
                  "imp": {"final_density": 0.2}}
# Methods whose layers keep their density: after the first epoch nothing may be compiled again.
SETTLED_AFTER_ONE_EPOCH = ("static", "rigl", "set", "str")
STEPS_PER_EPOCH = 4  # 256 images, batch 64


def three_epochs(**kw) -> TrainConfig:
    return digits_cfg(epochs=3, **kw)


@pytest.fixture
def graphs(monkeypatch):
    """The graphs --compile compiles (aot_eager), counted; dynamo's caches are reset around the test."""
    compiled = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return aot_eager(gm, example_inputs)

    monkeypatch.setattr(R, "COMPILE_BACKEND", counting_backend)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()


def _run_by_epoch(cfg: TrainConfig, out, graphs: list) -> tuple[list, list]:
    """(metric rows, graphs compiled during each epoch) of a run trained one epoch per fit call."""
    t = Trainer(cfg, out, log=lambda s: None)
    per_epoch = []
    for _ in range(t.run.total_epochs):
        before = len(graphs)
        t.fit(stop_after=1)
        per_epoch.append(len(graphs) - before)
    return untimed(rows(out)), per_epoch


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_equals_eager(method, graphs, tmp_path):
    opts = METHOD_OPTIONS.get(method, {})
    eager, eager_graphs = _run_by_epoch(three_epochs(method=method, method_options=opts), tmp_path / "eager", graphs)
    assert sum(eager_graphs) == 0  # the option is off by default
    compiled, per_epoch = _run_by_epoch(three_epochs(method=method, method_options=opts, compile=True),
                                        tmp_path / "compiled", graphs)
    assert per_epoch[0] > 0, "--compile compiled nothing"
    assert compiled == eager  # losses, accuracies, densities: aot_eager runs the same aten ops
    if method in SETTLED_AFTER_ONE_EPOCH:
        assert sum(per_epoch[1:]) == 0, f"recompiled after the first epoch: {per_epoch}"
    else:  # a density that leaves its autotune bucket recompiles that layer's choice: sometimes, never every step
        later_steps = (len(per_epoch) - 1) * STEPS_PER_EPOCH
        assert sum(per_epoch[1:]) < later_steps, per_epoch


@pytest.mark.parametrize("options", [
    dict(precision="bf16"),                                          # autocast around the compiled forward
    dict(format="bsr", block_size=2),                                # BSR layers
    dict(model="lenet5", model_options={}, method="rigl", method_options={"update_every": 2}),   # convolutions
    dict(model="convnet_small", model_options={}, method="set", method_options={"update_every": 2}),  # + BN, pooling
], ids=["bf16", "bsr", "lenet5-rigl", "convnet-set"])
def test_compiled_training_equals_eager_for_precisions_formats_and_convnets(options, graphs, tmp_path):
    eager, _ = _run_by_epoch(digits_cfg(epochs=2, **options), tmp_path / "eager", graphs)
    compiled, per_epoch = _run_by_epoch(digits_cfg(epochs=2, compile=True, **options), tmp_path / "compiled", graphs)
    assert per_epoch[0] > 0 and compiled == eager


def test_compile_option_and_a_real_inductor_run(fmnist_dir, tmp_path, capsys):
    """Validation, the CLI switch, and one run through inductor itself (C++ code generation on the CPU)."""
    assert TrainConfig().compile is False
    with pytest.raises(ValueError, match=r"--compile: 'yes' is not a boolean; allowed: true, false"):
        validate(digits_cfg(compile="yes"))
    out = tmp_path / "run"
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp",
                 "--model-option", "hidden=[16]", "--density", "0.3", "--distribution", "uniform", "--method",
                 "static", "--epochs", "1", "--no-progress", "--no-final-eval", "--compile", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "on cpu, fp32, compiled ->" in captured.out
    assert json.loads((out / "summary.json").read_text())["config"]["compile"] is True
    (row,) = rows(out)
    assert math.isfinite(row["train_loss"]) and 0 <= row["test_accuracy"] <= 1


def test_an_unknown_compile_backend_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSESTART_COMPILE_BACKEND", "nosuch")
    with pytest.raises(ValueError, match=r"SPARSESTART_COMPILE_BACKEND='nosuch': not a torch.compile backend; "
                                         r"allowed: .*aot_eager.*inductor"):
        Trainer(digits_cfg(compile=True), tmp_path / "run", log=lambda s: None)
