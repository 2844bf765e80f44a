"""Tiny datasets in the real file formats, written into tmp_path (nothing is read from the machine)."""
from __future__ import annotations

import json

import pytest
import torch

from sparsestart.train import data as data_mod
from sparsestart.train.data import write_cifar_batch, write_idx


def pattern_images(n: int, channels: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose class is a bright square at a class-dependent place, plus noise: learnable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    x = torch.randint(0, 60, (n, channels, size, size), generator=g, dtype=torch.int64)
    cells = max(1, int(classes ** 0.5 + 0.999))
    step = size // cells
    for i in range(n):
        k = int(labels[i])
        r, c = (k // cells) * step, (k % cells) * step
        x[i, :, r:r + step, c:c + step] += 180
    return x.clamp(0, 255).to(torch.uint8), labels


def write_fashion_mnist(folder, n_train=150, n_test=60, seed=0, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    xtr, ytr = pattern_images(n_train, 1, 28, 10, seed)
    xte, yte = pattern_images(n_test, 1, 28, 10, seed + 1)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", xtr[:, 0])
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", ytr)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", xte[:, 0])
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", yte)
    return folder, (xtr, ytr, xte, yte)


def write_cifar10(base, per_batch=8, n_test=12, seed=0):
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(1, 6):
        x, y = pattern_images(per_batch, 3, 32, 10, seed + i)
        write_cifar_batch(folder / f"data_batch_{i}", x, y.tolist())
        parts.append((x, y))
    xt, yt = pattern_images(n_test, 3, 32, 10, seed + 99)
    write_cifar_batch(folder / "test_batch", xt, yt.tolist())
    return folder, parts, (xt, yt)


def write_cifar100(base, n_train=40, n_test=10, seed=0):
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = pattern_images(n_train, 3, 32, 100, seed)
    write_cifar_batch(folder / "train", x, y.tolist(), label_key="fine_labels")
    xt, yt = pattern_images(n_test, 3, 32, 100, seed + 1)
    write_cifar_batch(folder / "test", xt, yt.tolist(), label_key="fine_labels")
    return folder, (x, y), (xt, yt)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the Debian Fashion-MNIST install and $SPARSESTART_DATA from the loaders."""
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-fashion-mnist"))
    monkeypatch.delenv("SPARSESTART_DATA", raising=False)


@pytest.fixture
def fmnist_dir(tmp_path, no_system_data):
    folder, _ = write_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    return tmp_path / "data"


# Metric rows of a run, and the same without the wall-clock fields (for bit-identical comparisons).
TIME_KEYS = ("epoch_seconds", "elapsed_seconds")


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rs):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rs]


def digits_cfg(**kw):
    """A CPU run of a few steps on scikit-learn's digits (256 training images, batch 64: 4 steps an epoch)."""
    from sparsestart.train.config import TrainConfig

    base = dict(dataset="digits", model="mlp", model_options={"hidden": [32]}, density=0.3, distribution="uniform",
                method="static", epochs=1, batch_size=64, lr=0.05, train_limit=256, test_limit=64, progress=False,
                final_eval=False, threads=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)
