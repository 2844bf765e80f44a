"""Data loaders on tiny generated files in the standard formats."""
from __future__ import annotations

import gzip
import pickle

import pytest
import torch

from sparsestart.train import batches as B
from sparsestart.train import data as D
from tests.train.conftest import write_cifar10, write_cifar100, write_fashion_mnist


def test_idx_roundtrip(tmp_path):
    t = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    for name in ("a.gz", "b"):
        D.write_idx(tmp_path / name, t)
        assert torch.equal(D.read_idx(tmp_path / name), t)


def test_idx_truncated_and_bad_magic(tmp_path):
    D.write_idx(tmp_path / "x", torch.zeros(4, 5, dtype=torch.uint8))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        D.read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt"):
        D.read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_from_data_dir(tmp_path, no_system_data):
    _, (xtr, ytr, xte, yte) = write_fashion_mnist(tmp_path / "fm", n_train=100, n_test=30)
    ds = D.load_dataset("fashion-mnist", tmp_path / "fm")  # the folder itself
    assert ds.shape == (1, 28, 28) and ds.num_classes == 10 and not ds.augment
    assert len(ds.val) == 10 and len(ds.train) == 90 and len(ds.test) == 30
    assert torch.equal(ds.test.images, xte) and torch.equal(ds.test.labels, yte)
    # train + val is a partition of the training file
    both = torch.cat([ds.train.images, ds.val.images]).reshape(100, -1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, xtr.reshape(100, -1).tolist()))
    # the split is seeded: same seed same split, other seed other split
    again = D.load_dataset("fashion_mnist", tmp_path / "fm")
    assert torch.equal(again.val.images, ds.val.images) and torch.equal(again.train.labels, ds.train.labels)
    other = D.load_dataset("fashion-mnist", tmp_path / "fm", split_seed=1)
    assert not torch.equal(other.val.images, ds.val.images)
    # normalisation statistics come from the training split
    px = ds.train.pixels()
    assert ds.mean[0] == pytest.approx(float(px.mean()), abs=1e-5)
    assert ds.std[0] == pytest.approx(float(px.double().std(unbiased=False)), abs=1e-4)


def test_fashion_mnist_subfolder_env_and_uncompressed(tmp_path, monkeypatch, no_system_data):
    write_fashion_mnist(tmp_path / "root" / "fashion-mnist", n_train=20, n_test=5, gz=False)
    monkeypatch.setenv("SPARSESTART_DATA", str(tmp_path / "root"))
    ds = D.load_dataset("fmnist", None, train_limit=7, test_limit=3)
    assert len(ds.train) == 7 and len(ds.val) == 2 and len(ds.test) == 3
    assert ds.source == str(tmp_path / "root" / "fashion-mnist")


def test_missing_fashion_mnist_message(tmp_path, no_system_data):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist", tmp_path / "empty")
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and str(tmp_path / "empty" / "fashion-mnist") in msg
    assert "no-debian-fashion-mnist" in msg  # the Debian location is listed too
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg


def test_missing_cifar_message(tmp_path, no_system_data):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("cifar100", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-100-python") in msg and "--data-dir" in msg and "cifar-100-python.tar.gz" in msg


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, digits"):
        D.load_dataset("imagenet")


def test_cifar10_and_cifar100(tmp_path, no_system_data):
    _, parts, (xt, yt) = write_cifar10(tmp_path, per_batch=10, n_test=7)
    ds = D.load_dataset("cifar10", tmp_path)
    assert ds.shape == (3, 32, 32) and ds.augment and len(ds.train) + len(ds.val) == 50 and len(ds.val) == 5
    assert torch.equal(ds.test.images, xt) and torch.equal(ds.test.labels, yt)
    # image layout: RGB planes of 32x32, as in the real batches
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb"), encoding="latin1")
    assert torch.equal(torch.from_numpy(raw["data"][0, 1024:2048]).reshape(32, 32), xt[0, 1])
    _, (x, y), (xt2, yt2) = write_cifar100(tmp_path, n_train=30, n_test=6)
    ds = D.load_dataset("cifar-100", tmp_path)
    assert ds.num_classes == 100 and len(ds.test) == 6 and torch.equal(ds.test.labels, yt2)


def test_cifar_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(ValueError, match="refusing"):
        D.read_cifar_batch(tmp_path / "test_batch")


def test_digits_fallback():
    ds = D.load_dataset("digits")
    assert ds.shape == (1, 28, 28) and len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == 359  # fixed 80/20 split
    px = ds.train.pixels()
    assert px.min() >= 0 and px.max() <= 1


def test_augmentation_is_a_seeded_crop_and_flip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = B.augment_batch(x, torch.Generator().manual_seed(3))
    b = B.augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 9, (2,), generator=g)
    ox = torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        crop = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        assert torch.equal(a[i], crop.flip(-1) if flip[i] else crop)


def test_batch_iterator_covers_each_sample_once_and_is_seeded():
    split = D.Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10))
    it = B.BatchIterator(split, 4, torch.Generator().manual_seed(0))
    batches = list(it)
    assert len(it) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
    assert torch.allclose(torch.cat([x for x, _ in batches]).flatten() * 255, torch.cat([y for _, y in batches]).float())
    again = [y for _, y in B.BatchIterator(split, 4, torch.Generator().manual_seed(0))]
    assert all(torch.equal(u, v) for u, v in zip(again, [y for _, y in batches]))


def test_batching_is_still_importable_from_data():
    """Batching moved to train/batches.py; code that imported it from train/data.py keeps working."""
    assert D.BatchIterator is B.BatchIterator and D.augment_batch is B.augment_batch
    assert {"BatchIterator", "augment_batch"} <= set(D.__all__)


def test_normalized_model_sees_pixels():
    net = torch.nn.Identity()
    m = D.NormalizedModel(net, [0.5, 0.25], [0.5, 0.25])
    x = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
    assert torch.allclose(m(x).flatten(), torch.tensor([1.0, 1.0]))
    assert set(m.state_dict()) == {"normalize.mean", "normalize.std"}
