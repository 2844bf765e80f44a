"""`sparsestart train --tensorboard`: the event file read back with TensorBoard's own reader.

A two-epoch run on a tiny generated Fashion-MNIST (tests/train/conftest.py) writes one point per epoch of
each scalar; the test checks the tags and that the values are the run's: loss and accuracy as in
metrics.jsonl, each layer's density as the trained model's, the learning rate as the cosine schedule's.
"""
from __future__ import annotations

import math
import sys

import pytest

from sparsestart import nn as snn
from sparsestart.cli import main
from sparsestart.train.trainer import Trainer
from tests.train.conftest import rows

EPOCHS, BATCH, LR = 2, 32, 0.05


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_dir,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """One tiny run with --tensorboard (ERK: the layers get different densities)."""
    # Per test, not for the module: the missing-package test below runs with or without tensorboard.
    pytest.importorskip("tensorboard", reason="tensorboard is in requirements-dev.txt")
    from tests.train.conftest import write_fashion_mnist

    base = tmp_path_factory.mktemp("tb")
    write_fashion_mnist(base / "data" / "fashion-mnist")
    out = base / "run"
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(base / "data"), "--model", "lenet5",
                 "--density", "0.3", "--distribution", "erk", "--method", "static", "--epochs", str(EPOCHS),
                 "--batch-size", str(BATCH), "--lr", str(LR), "--schedule", "cosine", "--no-progress",
                 "--no-final-eval", "--threads", "2", "--device", "cpu", "--tensorboard", "--out", str(out)])
    assert code == 0
    return out


def test_scalars_are_written_for_every_epoch(tb_run):
    s = _scalars(tb_run)
    for tag in ("train_loss", "train_accuracy", "val_nll", "val_accuracy", "test_nll", "test_accuracy", "lr",
                "density", "train_step_seconds"):
        assert tag in s, f"{tag} not in {sorted(s)}"
        assert [step for step, _ in s[tag]] == list(range(1, EPOCHS + 1)), tag


def test_loss_and_accuracy_are_the_run_metrics(tb_run):
    s, metrics = _scalars(tb_run), rows(tb_run)
    for tag in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy"):
        # float32 in the event file
        assert [v for _, v in s[tag]] == pytest.approx([r[tag] for r in metrics], rel=1e-6), tag
    assert all(math.isfinite(v) and v > 0 for _, v in s["train_loss"])
    for tag in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert all(0.0 <= v <= 1.0 for _, v in s[tag]), tag


def test_density_per_layer_is_the_model_density(tb_run):
    s = _scalars(tb_run)
    trainer = Trainer(None, tb_run, resume=True, log=lambda *_: None)  # the trained model, from its checkpoint
    layers = {name: m for name, m in trainer.run.net.named_modules() if isinstance(m, snn.SparseLayer)}
    assert len(layers) == 5
    assert {t for t in s if t.startswith("density/")} == {f"density/{name}" for name in layers}
    for name, m in layers.items():
        assert s[f"density/{name}"][-1][1] == pytest.approx(m.nnz / math.prod(m.weight_shape), rel=1e-6), name
    assert len({round(m.density, 4) for m in layers.values()}) > 1  # ERK: a per-layer tag says something
    nnz = sum(m.nnz for m in layers.values())
    assert s["density"][-1][1] == pytest.approx(nnz / sum(math.prod(m.weight_shape) for m in layers.values()),
                                                rel=1e-6)


def test_learning_rate_follows_the_cosine_schedule(tb_run):
    s, metrics = _scalars(tb_run), rows(tb_run)
    steps_per_epoch = metrics[0]["step"]  # optimizer steps of one epoch (135 training images / 32)
    assert steps_per_epoch == math.ceil(135 / BATCH)
    total = steps_per_epoch * EPOCHS
    # The rate the epoch starts with: cosine from LR to 0 over all steps of the run.
    expected = [LR * 0.5 * (1 + math.cos(math.pi * e * steps_per_epoch / total)) for e in range(EPOCHS)]
    assert [v for _, v in s["lr"]] == pytest.approx(expected, rel=1e-6)


def test_step_time_is_the_mean_training_step(tb_run):
    s, metrics = _scalars(tb_run), rows(tb_run)
    steps_per_epoch = metrics[0]["step"]
    for (_, step_seconds), r in zip(s["train_step_seconds"], metrics):
        # the epoch's seconds also hold the evaluation: the training steps take part of them
        assert 0 < step_seconds * steps_per_epoch <= r["epoch_seconds"]


def test_tensorboard_missing_is_a_clear_error(fmnist_dir, tmp_path, capsys, monkeypatch):
    """Runs whether tensorboard is installed or not: the import is made to fail as if it were not."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--tensorboard",
                 "--out", str(tmp_path / "tb")]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err and not (tmp_path / "tb").exists()
