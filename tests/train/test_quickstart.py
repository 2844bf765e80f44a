"""The newcomer's path: ``make data``, the short demonstration on Fashion-MNIST or its digits fallback, the verdict."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sparsestart.cli import main
from sparsestart.train import data as data_mod
from sparsestart.train.config import QUICK, QUICK_FALLBACK, config_from_dict, dense_reference, resolve
from sparsestart.train.trainer import Trainer
from sparsestart.train.verdict import verdict
from tests.train.conftest import write_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


def test_fallback_demonstration_learns_and_says_so(no_system_data, tmp_path, capsys):
    # What `make setup` runs on a machine without Fashion-MNIST: digits, long enough to learn (>= 90%).
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["dataset"]["name"] == "digits" and s["config"]["epochs"] == QUICK_FALLBACK["epochs"]
    assert s["final"]["test"]["accuracy"] >= 0.90
    assert "FALLBACK: Fashion-MNIST is not installed" in out and "apt-get install dataset-fashion-mnist" in out
    tail = out.strip().splitlines()[-5:]
    assert tail[0].startswith("verdict: convnet_small at density 0.100")
    assert "sparse vs 0.9777 dense" in tail[1] and "stored reference run" in tail[1]
    assert tail[2].strip().startswith("size") and "smaller" in tail[2]
    assert tail[3].strip().startswith("speed") and "fewer multiply-adds" in tail[3] and "s dense" in tail[3]
    assert "FALLBACK" in tail[4]


def test_explicit_digits_is_no_fallback(no_system_data, monkeypatch, capsys):
    from sparsestart.train import trainer as T

    seen = {}

    def fake(cfg, out, **kw):
        seen["cfg"] = cfg
        raise ValueError("stopped by the test")

    monkeypatch.setattr(T, "Trainer", fake)
    assert main(["train", "--quick", "--dataset", "digits", "--epochs", "3"]) == 2
    assert seen["cfg"].epochs == 3  # an explicit option wins over QUICK_FALLBACK
    assert "FALLBACK" not in capsys.readouterr().out


def test_system_data_env_hides_the_debian_copy(tmp_path, monkeypatch):
    folder, _ = write_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", str(folder))
    monkeypatch.delenv("SPARSESTART_DATA", raising=False)
    monkeypatch.delenv(data_mod.SYSTEM_DATA_ENV, raising=False)
    assert data_mod.fashion_mnist_available()
    for off in ("0", "off", "No"):
        monkeypatch.setenv(data_mod.SYSTEM_DATA_ENV, off)
        assert not data_mod.fashion_mnist_available()
        assert resolve(config_from_dict(dict(QUICK))).dataset == "digits"
    monkeypatch.setenv(data_mod.SYSTEM_DATA_ENV, "1")
    assert data_mod.fashion_mnist_available()


def test_dense_reference_only_for_the_same_job():
    quick = dict(QUICK, dataset="fashion-mnist", method="rigl", distribution="erk", device="cpu")
    assert dense_reference(config_from_dict(quick))["test_accuracy"] > 0
    assert dense_reference(config_from_dict(dict(quick, density=0.05, method="static", threads=1)))  # sparsity free
    assert dense_reference(config_from_dict(dict(quick, epochs=2))) is None
    assert dense_reference(config_from_dict(dict(quick, model="mlp"))) is None
    assert dense_reference(config_from_dict(dict(quick, dataset="digits"))) is None  # digits: the 10-epoch job
    assert dense_reference(config_from_dict(dict(quick, dataset="digits", **QUICK_FALLBACK))) is not None


def test_verdict_without_reference_and_for_dense(fmnist_dir, tmp_path):
    base = dict(dataset="fashion-mnist", data_dir=str(fmnist_dir), model="mlp", model_options={"hidden": [32]},
                distribution="uniform", method="static", epochs=1, batch_size=32, progress=False, final_eval=False,
                threads=2, device="cpu")
    lines = []
    s = Trainer(config_from_dict(dict(base, density=0.2)), tmp_path / "s", log=lines.append).fit()
    v = verdict(s)
    assert lines[-len(v):] == v and len(v) == 4
    assert "no stored dense reference" in v[1] and "--density 1.0" in v[1]
    assert f"{s['memory']['model_bytes']:,} bytes stored sparse vs {s['memory']['model_dense_bytes']:,} dense" in v[2]
    d = Trainer(config_from_dict(dict(base, density=1.0)), tmp_path / "d", log=lambda m: None).fit()
    assert verdict(d)[0].startswith("verdict: dense baseline")


def _stub(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("apt_ok", [True, False])
def test_make_data_installs_with_sudo_or_explains(tmp_path, apt_ok):
    # A non-root user without the package: `make data` runs apt-get through sudo (as .ci/run does), and
    # when that fails says how to get the data and that the digits fallback runs, without failing setup.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls"
    _stub(stubs, "dpkg", "exit 1")
    _stub(stubs, "id", "echo 1000")
    _stub(stubs, "sudo", f'echo "sudo $*" >> {log}; exec "$@"')
    _stub(stubs, "apt-get", f'echo "apt-get $*" >> {log}; exit {0 if apt_ok else 100}')
    env = {k: v for k, v in os.environ.items() if k != "SPARSESTART_SYSTEM_DATA"}
    env["PATH"] = f"{stubs}:{env['PATH']}"
    res = subprocess.run(["make", "-s", "-C", str(ROOT), "data"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = log.read_text()
    assert "sudo apt-get install -y -q dataset-fashion-mnist" in calls
    if apt_ok:
        assert "dataset-fashion-mnist installed" in res.stdout and "update" not in calls
    else:
        assert "sudo apt-get update -q" in calls
        assert "could not install Fashion-MNIST" in res.stdout and "digits" in res.stdout
        assert "SPARSESTART_DATA=DIR" in res.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_data_respects_system_data_off(tmp_path):
    env = dict(os.environ, SPARSESTART_SYSTEM_DATA="0")
    res = subprocess.run(["make", "-s", "-C", str(ROOT), "data"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "not installing" in res.stdout


def test_verdict_says_larger_when_the_sparse_model_takes_more_bytes():
    """Edge-popup keeps scores beside its frozen weights, and a pruned run keeps its start's slots: the
    size line must not call a model 5x the dense bytes '0.20x smaller'."""
    from sparsestart.train.config import TrainConfig
    from sparsestart.train.verdict import verdict

    def summary(sparse_bytes):
        cfg = TrainConfig(dataset="fashion-mnist", model="resnet20", density=0.05, method="edgepopup")
        return {"config": cfg.to_dict(), "final": {"test": {"accuracy": 0.5}}, "density": 0.05,
                "memory": {"model_bytes": sparse_bytes, "model_dense_bytes": 1000},
                "flops": {"forward_per_sample": 10, "dense_forward_per_sample": 200},
                "dataset": {"name": "fashion-mnist"}, "train_seconds": 1.0, "device": "cpu", "threads": 1}

    (size,) = [l for l in verdict(summary(5000)) if l.strip().startswith("size")]
    assert "5.00x larger" in size and "smaller" not in size
    (size,) = [l for l in verdict(summary(250)) if l.strip().startswith("size")]
    assert "4.00x smaller" in size
