"""Atomic checkpoint writes, corrupt files, RNG state round trips."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sparsestart.train import checkpoint as C


def _ckpt(epoch):
    return {"format": C.FORMAT, "version": C.VERSION, "epoch": epoch, "w": torch.full((1000,), float(epoch))}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.atomic_save(_ckpt(1), path)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the data reaches the (temporary) file ...
        f.truncate(100)  # ... partially
        raise OSError("simulated crash in the middle of torch.save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        C.atomic_save(_ckpt(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert C.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind
    C.atomic_save(_ckpt(3), path)
    assert C.load_checkpoint(path)["epoch"] == 3


def test_corrupt_checkpoint_is_reported_and_left_untouched(tmp_path):
    path = tmp_path / "checkpoint.pt"
    C.atomic_save(_ckpt(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match="corrupt or truncated.*left untouched"):
        C.load_checkpoint(path)
    assert path.read_bytes() == data[: len(data) // 2]
    with pytest.raises(C.CheckpointError, match="no checkpoint"):
        C.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(C.CheckpointError, match="not a sparsestart training checkpoint"):
        C.load_checkpoint(tmp_path / "other.pt")
    torch.save({**_ckpt(1), "version": 99}, tmp_path / "future.pt")
    with pytest.raises(C.CheckpointError, match="version 99"):
        C.load_checkpoint(tmp_path / "future.pt")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    C.atomic_save({**_ckpt(0), "rng": C.rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    C.set_rng_state(C.load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_atomic_write_text(tmp_path):
    C.atomic_write_text(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").read_text() == "{}\n"
