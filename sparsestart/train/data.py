"""Datasets held in memory as tensors: reading the standard formats, splits and normalisation.

Nothing is downloaded. The loaders read the standard distribution formats:

fashion-mnist  idx files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in
               ``--data-dir`` (or its ``fashion-mnist/`` subfolder); without
               ``--data-dir`` in ``$SPARSESTART_DATA`` (same two places), then in the
               install location of Debian's package ``dataset-fashion-mnist``
               (/usr/share/datasets/fashion-mnist; ``$SPARSESTART_SYSTEM_DATA=0`` skips it).
cifar10        python-pickle batches ``cifar-10-batches-py/data_batch_1..5, test_batch``
cifar100       ``cifar-100-python/train, test`` (fine labels)
               both under ``--data-dir``, or without it under ``$SPARSESTART_DATA``.

A directory named explicitly (``--data-dir``, the ``data_dir`` argument) is the
only place looked: when it does not exist or lacks a file, loading fails with a
message listing the missing files, instead of silently falling back to another
copy of the dataset.
digits         scikit-learn's bundled 8x8 digits (always available; the fallback),
               upsampled bilinearly to 1x28x28 so that every model of the zoo that
               takes Fashion-MNIST takes digits too and so that digits can serve as
               the shifted (out-of-distribution) set for Fashion-MNIST.
               A fixed 80/20 train/test split (seed 0) since it ships without one.

Images are kept as uint8 (idx, CIFAR) or float32 in [0, 1] (digits) tensors of
shape [N, C, H, W]; :meth:`Split.pixels` returns float32 in [0, 1]. The model
sees [0, 1] pixels and normalises inside (:class:`NormalizedModel`), so that
FGSM works in pixel space. A seeded validation split (``val_fraction`` of the
training set) is held out for model selection; the test split is never used to
select anything.

Devices: the loaders read into CPU tensors; :meth:`Dataset.to` moves every
split whole to a device (the trainer holds the data on its GPU, uint8 images
stay uint8 there), and :class:`~sparsestart.train.batches.BatchIterator` then
gathers, converts and augments each batch on that device (batching lives in
:mod:`sparsestart.train.batches`; its names are re-exported here).
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batches import BatchIterator, augment_batch  # noqa: F401  (re-exported: their home was this module)

__all__ = [
    "DATASETS", "DEBIAN_FASHION_MNIST", "DatasetNotFoundError", "Split", "Dataset", "load_dataset",
    "canonical_dataset_name", "fashion_mnist_available", "read_idx", "write_idx", "read_cifar_batch",
    "write_cifar_batch", "load_digits_images", "augment_batch", "BatchIterator", "Normalize",
    "NormalizedModel", "load_image_dir", "adapt_images",
]

#: Install location of Debian's package dataset-fashion-mnist (documented by the package).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SPARSESTART_DATA"
#: Set to "0" (or "no", "off", "false") to ignore the system-wide Debian copy, as on a machine without the package
#: (what ``make setup``'s fallback path looks like; the tests and the documentation use it).
SYSTEM_DATA_ENV = "SPARSESTART_SYSTEM_DATA"

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "digits")
_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist", "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "cifar_100": "cifar100", "digits": "digits",
}
_NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}

_FMNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where sparsestart looks; the message says where it looked and what to do."""


def canonical_dataset_name(name: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    return _ALIASES[name.strip().lower()]


# ---------------------------------------------------------------------------------------------- containers
@dataclass
class Split:
    """Images [N, C, H, W] (uint8 0..255 or float in [0, 1]) and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.numel())

    def pixels(self, index=None) -> torch.Tensor:
        """Float32 pixels in [0, 1] (all, or the rows selected by ``index``)."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> "Split":
        """This split with images and labels on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """Train / validation / test splits in memory plus what the trainer needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: list  # per-channel mean of the training split, in [0, 1] pixel units
    std: list
    augment: bool  # pad-4 random crop + horizontal flip during training (CIFAR)
    source: str  # where the files came from
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])

    def to(self, device) -> "Dataset":
        """The dataset with every split held on ``device`` (statistics and description unchanged)."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device),
                                   test=self.test.to(device))

    @property
    def device(self) -> torch.device:
        return self.train.device

    def describe(self) -> dict:
        return dict(name=self.name, source=self.source, shape=list(self.shape), num_classes=self.num_classes,
                    train=len(self.train), val=len(self.val), test=len(self.test), mean=self.mean, std=self.std,
                    augment=self.augment)


# ---------------------------------------------------------------------------------------------- idx format
def _open_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: a corrupt deflate stream
        raise ValueError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file is corrupt or truncated")


def read_idx(path) -> torch.Tensor:
    """An idx file of unsigned bytes (type code 0x08), gzip-compressed if the name ends in .gz, as uint8."""
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex() if data else 'empty'})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    if len(data) - header != math.prod(dims):
        raise ValueError(f"{path}: idx header announces shape {dims} ({math.prod(dims)} bytes) but the file holds "
                         f"{len(data) - header} bytes; the file is truncated or corrupt")
    if math.prod(dims) == 0:  # torch.frombuffer refuses an empty buffer ("both buffer length (0) and count ...")
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims).clone()


def write_idx(path, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as an idx file (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    t = tensor.to(torch.uint8).contiguous()
    payload = bytes([0, 0, 0x08, t.dim()]) + struct.pack(">" + "I" * t.dim(), *t.shape) + t.numpy().tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _env_dirs(data_dir) -> list[Path]:
    """Where to look: the explicitly named ``data_dir`` alone, else ``$SPARSESTART_DATA`` (if set)."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_VAR)
    return [Path(env).expanduser()] if env else []


def _system_data_enabled() -> bool:
    """False when ``$SPARSESTART_SYSTEM_DATA`` says to ignore the Debian install (0, no, off, false)."""
    return os.environ.get(SYSTEM_DATA_ENV, "1").strip().lower() not in ("0", "no", "off", "false")


def _fmnist_candidates(data_dir) -> list[Path]:
    out = []
    for base in _env_dirs(data_dir):
        out += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    if not data_dir and _system_data_enabled():  # an explicitly named directory is never replaced by the system copy
        out.append(Path(DEBIAN_FASHION_MNIST))
    return out


def _missing_in_data_dir(data_dir, looked: list[Path], present) -> str:
    """Why the explicitly named ``data_dir`` does not hold the dataset: it does not exist, or the files that
    the most complete of the ``looked`` folders lacks (``present(folder)``: (found names, missing names))."""
    base = Path(data_dir).expanduser()
    if not base.exists():
        return f"--data-dir {base} does not exist"
    if not base.is_dir():
        return f"--data-dir {base} is not a directory"
    best, best_found, best_missing = None, [], None
    for folder in looked:
        if folder.is_dir():
            found, missing = present(folder)
            if best is None or len(found) > len(best_found):
                best, best_found, best_missing = folder, found, missing
    if best is None or not best_found:
        return f"--data-dir {base} holds none of the files (missing {', '.join(present(base)[1])})"
    return f"--data-dir {base}: {best} is missing {', '.join(best_missing)}"


def _find_fmnist_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _locate_fashion_mnist(data_dir) -> tuple[Optional[Path], list[Path]]:
    looked = _fmnist_candidates(data_dir)
    for folder in looked:
        if all(_find_fmnist_file(folder, stem) for stem in _FMNIST_FILES.values()):
            return folder, looked
    return None, looked


def fashion_mnist_available(data_dir=None) -> bool:
    return _locate_fashion_mnist(data_dir)[0] is not None


def _fmnist_split(folder: Path, which: str) -> Split:
    """The ``which`` split; a file that cannot be one is named with what is wrong with it."""
    images_file = _find_fmnist_file(folder, _FMNIST_FILES[(which, "images")])
    labels_file = _find_fmnist_file(folder, _FMNIST_FILES[(which, "labels")])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3:
        raise ValueError(f"{images_file}: Fashion-MNIST images must be an idx array [N, 28, 28], the file holds "
                         f"shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{labels_file}: Fashion-MNIST labels must be an idx array [N], the file holds shape "
                         f"{tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{images_file}: holds 0 images (header shape {tuple(images.shape)}); the file is empty or "
                         f"was cut when written")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_file} holds {images.shape[0]} images but {labels_file} holds {labels.shape[0]} "
                         f"labels; one of them is truncated or from another dataset")
    if int(labels.max()) >= 10:
        raise ValueError(f"{labels_file}: Fashion-MNIST labels must be 0..9, found {int(labels.max())}")
    return Split(images.unsqueeze(1), labels.long())


def _load_fashion_mnist(data_dir) -> tuple[Split, Split, str]:
    folder, looked = _locate_fashion_mnist(data_dir)
    if folder is None and data_dir:
        files = ", ".join(f"{s}.gz" for s in _FMNIST_FILES.values())

        def present(f):
            stems = list(_FMNIST_FILES.values())
            return [s for s in stems if _find_fmnist_file(f, s)], [f"{s}.gz" for s in stems
                                                                    if not _find_fmnist_file(f, s)]

        where = "\n".join(f"  {p}" for p in looked)
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: {_missing_in_data_dir(data_dir, looked, present)}. Looked for the four idx "
            f"files ({files}; uncompressed copies also work) in:\n{where}\n"
            f"Put the missing files there, or drop --data-dir to use ${ENV_VAR} or the copy that "
            f"`apt-get install dataset-fashion-mnist` installs into {DEBIAN_FASHION_MNIST}.")
    if folder is None:
        where = "\n".join(f"  {p}" for p in looked)
        files = ", ".join(f"{s}.gz" for s in _FMNIST_FILES.values())
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found. Looked for the four idx files ({files}; uncompressed copies also work) in:\n"
            f"{where}\n"
            f"Get them with `apt-get install dataset-fashion-mnist` (installs into {DEBIAN_FASHION_MNIST}), or put "
            f"the four files into --data-dir DIR (or DIR/fashion-mnist/) or into ${ENV_VAR}. "
            f"Nothing is downloaded; `--dataset digits` works without any files.")
    return _fmnist_split(folder, "train"), _fmnist_split(folder, "test"), str(folder)


# ---------------------------------------------------------------------------------------------- CIFAR pickles
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays, lists, strings) and nothing else.

    pickle can run arbitrary code; the batches only need numpy's array
    reconstruction, so every other global is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("__builtin__", "object"), ("builtins", "object"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists")


def read_cifar_batch(path, label_key: str = "labels") -> Split:
    """One CIFAR python-pickle batch: ``data`` [N, 3072] uint8 (RGB planes of 32x32), ``label_key`` [N]."""
    import numpy as np

    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: cannot read CIFAR batch ({type(exc).__name__}: {exc})")
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict with 'data' and '{label_key}', got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: the batch has keys {sorted(d)}, expected 'data' and '{label_key}'")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: 'data' must be [N, 3072] with N = len('{label_key}'), got {data.shape} "
                         f"and {labels.shape}")
    return Split(torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), torch.from_numpy(labels.copy()))


def write_cifar_batch(path, images: torch.Tensor, labels: Sequence[int], label_key: str = "labels") -> None:
    """Write a CIFAR-format batch (used by the tests to make tiny datasets)."""
    import numpy as np

    x = images.to(torch.uint8).reshape(images.shape[0], -1).numpy()
    with open(path, "wb") as f:
        pickle.dump({"data": np.ascontiguousarray(x), label_key: [int(v) for v in labels], "batch_label": "tiny"},
                    f, protocol=2)


def _cifar_candidates(name: str, data_dir) -> list[Path]:
    sub = _CIFAR_LAYOUT[name][0]
    out = []
    for base in _env_dirs(data_dir):
        out += [base / sub, base]
    return out


def _locate_cifar(name: str, data_dir) -> tuple[Optional[Path], list[Path]]:
    _, train_files, test_files, _ = _CIFAR_LAYOUT[name]
    looked = _cifar_candidates(name, data_dir)
    for folder in looked:
        if all((folder / f).is_file() for f in train_files + test_files):
            return folder, looked
    return None, looked


def _load_cifar(name: str, data_dir) -> tuple[Split, Split, str]:
    sub, train_files, test_files, key = _CIFAR_LAYOUT[name]
    folder, looked = _locate_cifar(name, data_dir)
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    if folder is None and data_dir:
        where = "\n".join(f"  {p}" for p in looked)

        def present(f):
            names = train_files + test_files
            return [n for n in names if (f / n).is_file()], [n for n in names if not (f / n).is_file()]

        raise DatasetNotFoundError(
            f"{name.upper()} not found: {_missing_in_data_dir(data_dir, looked, present)}. Looked for "
            f"{', '.join(train_files + test_files)} in:\n{where}\n"
            f"Extract the python version of the dataset ({archive} from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"so that DIR/{sub}/ holds those files. Nothing is downloaded; `--dataset digits` works without any "
            f"files.")
    if folder is None:
        where = "\n".join(f"  {p}" for p in looked) or "  (nowhere: neither --data-dir nor $SPARSESTART_DATA is set)"
        raise DatasetNotFoundError(
            f"{name.upper()} not found. Looked for {', '.join(train_files + test_files)} in:\n{where}\n"
            f"Extract the python version of the dataset ({archive} from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html) so that DIR/{sub}/ holds those files, and pass "
            f"--data-dir DIR (or set ${ENV_VAR}=DIR). Nothing is downloaded; `--dataset digits` works without "
            f"any files.")

    def cat(files):
        parts = [read_cifar_batch(folder / f, key) for f in files]
        return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))

    train, test = cat(train_files), cat(test_files)
    k = _NUM_CLASSES[name]
    for which, s in (("train", train), ("test", test)):
        if len(s) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= k):
            raise ValueError(f"{folder}: {name} {which} labels must be in 0..{k - 1}")
    return train, test, str(folder)


# ---------------------------------------------------------------------------------------------- digits
def load_digits_images(size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as float32 [1797, 1, size, size] in [0, 1] (ink bright) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous(), torch.tensor(d.target, dtype=torch.int64)


def _load_digits() -> tuple[Split, Split, str]:
    x, y = load_digits_images(28)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(0.2 * len(y))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test]), "sklearn.datasets.load_digits (bundled)"


# ---------------------------------------------------------------------------------------------- assembly
def _channel_stats(split: Split, chunk: int = 4096) -> tuple[list, list]:
    c = split.images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for i in range(0, len(split), chunk):
        x = split.pixels(slice(i, i + chunk)).double()
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / max(n, 1)
    std = (s2 / max(n, 1) - mean * mean).clamp(min=0).sqrt().clamp(min=1e-3)
    return [float(v) for v in mean], [float(v) for v in std]


def load_dataset(name: str, data_dir=None, *, val_fraction: float = 0.1, split_seed: int = 0,
                 train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                 augment: Optional[bool] = None) -> Dataset:
    """Load ``name`` (see :data:`DATASETS`) into memory and split off the validation set.

    The validation set is ``round(val_fraction * N)`` training images chosen by a
    permutation seeded with ``split_seed``; ``train_limit`` then keeps the first
    images of the remaining (permuted) training set and ``test_limit`` the first
    test images. Normalisation statistics come from the training split.
    ``augment=None`` augments CIFAR only.
    """
    name = canonical_dataset_name(name)
    if not (0.0 < float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if name == "fashion-mnist":
        train_all, test, source = _load_fashion_mnist(data_dir)
    elif name in _CIFAR_LAYOUT:
        train_all, test, source = _load_cifar(name, data_dir)
    else:
        train_all, test, source = _load_digits()
    n = len(train_all)
    n_val = round(val_fraction * n)
    if n < 2 or n_val < 1 or n_val >= n:
        raise ValueError(f"{name}: {n} training images cannot be split into train and a {val_fraction:.0%} "
                         f"validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if train_limit is not None:
        train_idx = train_idx[: int(train_limit)]
    train, val = train_all.subset(train_idx), train_all.subset(val_idx)
    if test_limit is not None:
        test = test.subset(torch.arange(min(int(test_limit), len(test))))
    mean, std = _channel_stats(train)
    if augment is None:
        augment = name in _CIFAR_LAYOUT
    return Dataset(name, train, val, test, _NUM_CLASSES[name], mean, std, bool(augment), source)


# ---------------------------------------------------------------------------------------------- OoD helpers
def adapt_images(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Float [N, C', H', W'] in [0, 1] to ``shape`` (C, H, W): channels repeated/averaged, bilinear resize."""
    c, h, w = shape
    if x.shape[1] != c:
        x = x.mean(dim=1, keepdim=True) if c == 1 else x.mean(dim=1, keepdim=True).expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous()


def load_image_dir(path) -> tuple[Split, str]:
    """The test split of whatever standard dataset ``path`` holds (CIFAR-10/100 batches or Fashion-MNIST idx)."""
    path = Path(path).expanduser()
    for name in ("cifar10", "cifar100"):
        sub, _, test_files, key = _CIFAR_LAYOUT[name]
        for folder in (path / sub, path):
            if all((folder / f).is_file() for f in test_files):
                parts = [read_cifar_batch(folder / f, key) for f in test_files]
                return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts])), \
                    f"{name} test ({folder})"
    for folder in (path, path / "fashion-mnist"):
        if _find_fmnist_file(folder, _FMNIST_FILES[("test", "images")]) and \
                _find_fmnist_file(folder, _FMNIST_FILES[("test", "labels")]):
            return _fmnist_split(folder, "test"), f"fashion-mnist test ({folder})"
    raise DatasetNotFoundError(
        f"--ood-dir {path}: found neither CIFAR-10/100 python batches (test_batch or test, directly or in "
        f"cifar-10-batches-py/ / cifar-100-python/) nor Fashion-MNIST t10k idx files")


# ---------------------------------------------------------------------------------------------- normalisation
class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers (saved with the model)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net`` behind a :class:`Normalize`: the wrapper takes [0, 1] pixels (what FGSM perturbs)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
