"""Files, checkpoints and command outputs under hostile conditions (issue 17): a best.pt from another run, a
full disk, read-only or non-directory outputs, flipped bytes in a checkpoint, broken idx files, two processes
on one run directory. Every refusal is one line naming the file, and nothing saved before is destroyed."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from sparsestart.cli import main
from sparsestart.train import checkpoint as C
from sparsestart.train import data as D
from sparsestart.train import paths as P
from sparsestart.train.data import write_idx
from sparsestart.train.trainer import Trainer
from tests.train.conftest import write_fashion_mnist
from tests.train.test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


def _run(fmnist_dir, out, epochs=2, stop_after=None, **kw):
    cfg = tiny_cfg(fmnist_dir, model="mlp", model_options={"hidden": [16]}, epochs=epochs, threads=1, **kw)
    Trainer(cfg, out, log=lambda m: None).fit(stop_after=stop_after)
    return out


def _train_args(fmnist_dir, out, *extra):
    return ["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp", "--model-option",
            "hidden=[16]", "--density", "0.3", "--distribution", "uniform", "--method", "static", "--epochs", "2",
            "--batch-size", "32", "--no-final-eval", "--no-progress", "--threads", "1", "--out", str(out), *extra]


def _one_line(err: str, cmd: str, *expected) -> None:
    err = err.strip()
    assert err.startswith(f"sparsestart {cmd}: error:") and "Traceback" not in err and "\n" not in err, err
    for e in expected:
        assert e in err, (e, err)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != P.LOCK_FILE}


# ---------------------------------------------------------------------------------------------- 1. best.pt of another run
def test_best_pt_of_another_run_is_refused(fmnist_dir, tmp_path, capsys):
    mine = _run(fmnist_dir, tmp_path / "mine", epochs=1)
    other = _run(fmnist_dir, tmp_path / "other", epochs=1, density=0.5, seed=3)
    assert main(["evaluate", str(mine), "--which", "best"]) == 0  # its own best.pt
    capsys.readouterr()
    (mine / "evaluation-best.json").unlink()
    shutil.copy(other / "best.pt", mine / "best.pt")
    assert main(["evaluate", str(mine), "--which", "best"]) == 2
    _one_line(capsys.readouterr().err, "evaluate", f"{mine / 'best.pt'} was saved by another run", "--which final")
    assert not (mine / "evaluation-best.json").exists()
    # Only the summary left (checkpoint.pt deleted to save space): its run id is the reference.
    (mine / "checkpoint.pt").unlink()
    assert main(["evaluate", str(mine), "--which", "best"]) == 2
    _one_line(capsys.readouterr().err, "evaluate", "summary.json")
    # Neither: nothing to check against, refused rather than trusted.
    (mine / "summary.json").unlink()
    assert main(["evaluate", str(mine), "--which", "best"]) == 2
    _one_line(capsys.readouterr().err, "evaluate", "cannot check that it belongs")


def _strip_run_id(path):
    ckpt = C.load_checkpoint(path)
    ckpt.pop("run_id", None)
    C.atomic_save(ckpt, path)


def test_best_pt_without_run_id_is_checked_by_its_settings(fmnist_dir, tmp_path, capsys):
    """Files saved before run ids: the experiment settings and the dataset decide."""
    a = _run(fmnist_dir, tmp_path / "a", epochs=1)
    b = _run(fmnist_dir, tmp_path / "b", epochs=1, density=0.5)
    for run in (a, b):
        for name in ("best.pt", "checkpoint.pt"):
            _strip_run_id(run / name)
    assert main(["evaluate", str(a), "--which", "best", "--threads", "1"]) == 0
    capsys.readouterr()
    shutil.copy(b / "best.pt", a / "best.pt")
    assert main(["evaluate", str(a), "--which", "best"]) == 2
    _one_line(capsys.readouterr().err, "evaluate", "does not belong", "density: best.pt 0.5, checkpoint.pt 0.3")


def test_resume_keeps_the_run_id(fmnist_dir, tmp_path):
    run = _run(fmnist_dir, tmp_path / "r", stop_after=1)
    first = C.load_checkpoint(run / "checkpoint.pt")["run_id"]
    Trainer(None, run, resume=True, log=lambda m: None).fit()
    assert C.load_checkpoint(run / "checkpoint.pt")["run_id"] == first == C.load_checkpoint(run / "best.pt")["run_id"]
    import json

    assert json.loads((run / "summary.json").read_text())["run_id"] == first
    assert C.load_checkpoint(_run(fmnist_dir, tmp_path / "s", epochs=1) / "checkpoint.pt")["run_id"] != first
    assert not (run / P.LOCK_FILE).exists()  # released and removed: the run directory holds the run's files only


# ---------------------------------------------------------------------------------------------- 2. disk full
def _full_disk_save(after_bytes=1000):
    """A torch.save whose file fills up after ``after_bytes``: the real torch.save, so the failure arrives as torch
    reports it (a RuntimeError from its zip writer with the ENOSPC OSError as context)."""
    real = torch.save

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            if self.n + len(b) > after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(b)
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    return lambda obj, f, *a, **k: real(obj, Full(f), *a, **k)


def test_atomic_save_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.atomic_save({"format": C.FORMAT, "version": C.VERSION, "w": torch.ones(10)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk_save())
    with pytest.raises(P.DiskFullError, match=f"no space left on device while saving {path}") as info:
        C.atomic_save({"format": C.FORMAT, "version": C.VERSION, "w": torch.zeros(100000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left


def test_train_on_a_full_disk_says_which_epoch_is_saved(fmnist_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = torch.save
    full = _full_disk_save()

    def save(obj, f, *a, **k):  # the disk fills up once the first epoch's checkpoint is on it
        return (full if (out / "checkpoint.pt").exists() else real)(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(_train_args(fmnist_dir, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    _one_line(err, "train", "no space left on device while saving", f"the last completed epoch (1) is saved at "
              f"{out / 'checkpoint.pt'}", f"sparsestart train --resume {out}")
    monkeypatch.undo()
    assert C.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # space freed: the run continues
    assert C.load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_full_disk_before_any_checkpoint(fmnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", _full_disk_save())
    assert main(_train_args(fmnist_dir, tmp_path / "run")) == 1
    _one_line(capsys.readouterr().err, "train", "no space left on device", "no epoch was saved yet")


# ---------------------------------------------------------------------------------------------- 3. outputs
def test_train_and_sweep_refuse_a_bad_out_before_working(fmnist_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    from sparsestart.train import trainer

    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("worked")))
    for out, expected in ((tmp_path / "afile", "exists and is not a directory"),
                          (tmp_path / "afile" / "run", f"{tmp_path / 'afile'} is a file")):
        assert main(_train_args(fmnist_dir, out)) == 2
        _one_line(capsys.readouterr().err, "train", f"--out {out}", expected)
    sweep = ["sweep", "--out", str(tmp_path / "afile" / "sw"), "--dataset", "fashion-mnist", "--data-dir",
             str(fmnist_dir), "--model", "mlp", "--epochs", "1", "--no-progress"]
    assert main(sweep) == 2
    _one_line(capsys.readouterr().err, "sweep", f"{tmp_path / 'afile'} is a file")
    assert not (tmp_path / "afile" / "sw").exists()


def test_read_only_outputs_are_refused_in_one_line(fmnist_dir, tmp_path, capsys, monkeypatch):
    run = _run(fmnist_dir, tmp_path / "run", epochs=1)
    report_src = tmp_path / "rep-src"
    report_src.mkdir()
    shutil.copytree(run, report_src / "run")
    from sparsestart.train import evaluate, trainer

    def refuse(*a, **k):
        raise AssertionError("the command started working before checking its output")

    monkeypatch.setattr(trainer, "load_dataset", refuse)
    monkeypatch.setattr(evaluate, "load_dataset", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    ro = tmp_path / "ro"
    cases = [
        ("train", _train_args(fmnist_dir, ro / "run"), f"--out {ro / 'run'}: cannot write into {tmp_path}"),
        ("train", ["train", "--resume", str(run), "--no-progress"], f"--resume {run}: cannot write into {run}"),
        ("sweep", ["sweep", "--out", str(ro / "sw"), "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir),
                   "--model", "mlp", "--epochs", "1"], f"--out {ro / 'sw'}"),
        ("evaluate", ["evaluate", str(run), "--output", str(ro / "e.json")], f"--output {ro / 'e.json'}"),
        ("evaluate", ["evaluate", str(run)], f"the default --output {run / 'evaluation-final.json'}"),
        ("report", ["report", str(report_src), "--out", str(ro / "rep")], f"--out {ro / 'rep'}"),
    ]
    for cmd, args, expected in cases:
        assert main(args) == 2, args
        _one_line(capsys.readouterr().err, cmd, expected, "read-only")
    with pytest.raises(SystemExit) as info:
        main(["densities", "--model", "mlp:784,30,10", "--density", "0.1", "--plot", str(ro / "p.png")])
    assert info.value.code == 2
    assert f"--plot {ro / 'p.png'}: cannot write into {tmp_path} (the file system is read-only)" in \
        capsys.readouterr().err
    assert not ro.exists()


def test_evaluate_output_that_is_a_directory(fmnist_dir, tmp_path, capsys, monkeypatch):
    run = _run(fmnist_dir, tmp_path / "run", epochs=1)
    from sparsestart.train import evaluate

    monkeypatch.setattr(evaluate, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("worked")))
    assert main(["evaluate", str(run), "--output", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "evaluate", f"--output {tmp_path}: is a directory")


def test_evaluate_prints_the_result_when_the_disk_fills_up(fmnist_dir, tmp_path, capsys, monkeypatch):
    run = _run(fmnist_dir, tmp_path / "run", epochs=1)
    real = C._atomic_write

    def full(path, write):
        if str(path).endswith("evaluation-final.json"):
            raise P.DiskFullError(f"no space left on device while saving {path}", path)
        return real(path, write)

    monkeypatch.setattr(C, "_atomic_write", full)
    assert main(["evaluate", str(run), "--test-limit", "20"]) == 1
    out, err = capsys.readouterr()
    assert '"which": "final"' in out  # the result is not lost
    _one_line(err.strip().splitlines()[-1], "evaluate", "no space left on device", "the result is printed above")


# ---------------------------------------------------------------------------------------------- 4. checksums
def _flip_a_value_byte(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of ``tensor``'s bytes inside the file (the zip container has no checksum)."""
    raw = bytearray(path.read_bytes())
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0
    raw[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_the_values_is_refused(fmnist_dir, tmp_path, capsys):
    run = _run(fmnist_dir, tmp_path / "run", stop_after=1)
    ckpt = C.load_checkpoint(run / "checkpoint.pt")
    values = next(v for k, v in ckpt["model"].items() if k.endswith("values"))
    _flip_a_value_byte(run / "checkpoint.pt", values)
    before = _files(run)
    with pytest.raises(C.CheckpointError, match=f"{run / 'checkpoint.pt'} is corrupt.*checksum.*left untouched"):
        C.load_checkpoint(run / "checkpoint.pt")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "train", f"{run / 'checkpoint.pt'} is corrupt")
    assert main(["evaluate", str(run)]) == 2
    _one_line(capsys.readouterr().err, "evaluate", f"{run / 'checkpoint.pt'} is corrupt")
    assert _files(run) == before  # nothing overwritten, nothing added
    assert ckpt["checksum"].startswith("sha256:")
    best = C.load_checkpoint(run / "best.pt")
    _flip_a_value_byte(run / "best.pt", next(v for k, v in best["model"].items() if k.endswith("values")))
    with pytest.raises(C.CheckpointError, match="best.pt is corrupt"):
        C.load_checkpoint(run / "best.pt")


def test_checksum_covers_every_entry_and_survives_a_round_trip(tmp_path):
    base = {"format": C.FORMAT, "version": C.VERSION, "w": torch.arange(6.).reshape(2, 3).t(),
            "h": torch.tensor([1.5], dtype=torch.bfloat16), "b": torch.tensor(True), "e": torch.empty(0, 4),
            "history": [{"epoch": 1, "loss": 0.25, "x": None}], "t": (1, "a"), "opt": {0: {"step": 3}}}
    C.atomic_save(base, tmp_path / "c.pt")
    loaded = C.load_checkpoint(tmp_path / "c.pt")
    assert loaded[C.CHECKSUM_KEY] == C.content_checksum(base)
    for key, change in (("w", lambda v: v + 0), ("history", lambda v: [{"epoch": 1, "loss": 0.2500001, "x": None}]),
                        ("t", lambda v: (1, "b")), ("opt", lambda v: {1: {"step": 3}}),
                        ("h", lambda v: v.float())):
        changed = {**base, key: change(base[key])}
        same = key == "w"  # the same values, another layout: the same content
        assert (C.content_checksum(changed) == C.content_checksum(base)) == same, key
    # Re-saving an edited checkpoint (as the tests and tools do) stores a fresh checksum.
    loaded["epoch"] = 7
    C.atomic_save(loaded, tmp_path / "c.pt")
    assert C.load_checkpoint(tmp_path / "c.pt")["epoch"] == 7
    C.load_checkpoint(tmp_path / "c.pt", map_location="meta")  # no values there: nothing to verify, no error


def test_checkpoint_without_checksum_loads_with_a_warning(fmnist_dir, tmp_path):
    run = _run(fmnist_dir, tmp_path / "run", stop_after=1)
    ckpt = C.load_checkpoint(run / "checkpoint.pt")
    ckpt.pop("checksum", None)
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(C.CheckpointError, match="always carries a checksum"):  # a damaged entry, not an old file
        C.load_checkpoint(run / "checkpoint.pt")
    torch.save({**ckpt, "version": 1}, run / "checkpoint.pt")  # as an older sparsestart wrote it
    with pytest.warns(C.UnverifiedCheckpointWarning, match=f"{run / 'checkpoint.pt'} has no checksum"):
        assert C.load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    with pytest.warns(C.UnverifiedCheckpointWarning):
        Trainer(None, run, resume=True, log=lambda m: None).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.load_checkpoint(run / "checkpoint.pt")["epoch"] == 2  # saved again, with a checksum


# ---------------------------------------------------------------------------------------------- 5. plots, idx files
def test_densities_plot_reports_the_file_it_wrote(tmp_path, capsys):
    png = b"\x89PNG\r\n\x1a\n"
    base = ["densities", "--model", "mlp:784,30,10", "--density", "0.1", "--compare", "uniform"]
    folder = tmp_path / "plots"
    folder.mkdir()
    for arg in (str(folder), str(tmp_path / "new") + "/", str(tmp_path / "noext"), str(tmp_path / "a" / "b.png")):
        assert main([*base, "--plot", arg]) == 0
        said = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("plot saved to "))
        assert said.is_file() and said.read_bytes()[:8] == png, (arg, said)
        if arg.rstrip("/") != str(tmp_path / "noext") and not arg.endswith(".png"):
            assert said.parent == Path(arg), (arg, said)  # inside the directory named, not beside it
    assert not (tmp_path / "plots.png").exists()
    with pytest.raises(SystemExit):
        main([*base, "--plot", str(tmp_path / "x.nope")])
    assert "matplotlib cannot write '.nope' files" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["zero images", "truncated", "bad magic", "count mismatch", "empty file"])
def test_broken_idx_files_are_named(case, tmp_path, no_system_data):
    folder, _ = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=5, gz=False)
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    if case == "zero images":
        write_idx(images, torch.zeros(0, 28, 28, dtype=torch.uint8))
        write_idx(labels, torch.zeros(0, dtype=torch.uint8))
        named, what = images, "holds 0 images"
    elif case == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        named, what = images, "truncated"
    elif case == "bad magic":
        images.write_bytes(b"\x50\x4b\x03\x04" + images.read_bytes()[4:])
        named, what = images, "bad magic number"
    elif case == "count mismatch":
        write_idx(labels, torch.zeros(7, dtype=torch.uint8))
        named, what = labels, "holds 7 labels"
    else:
        images.write_bytes(b"")
        named, what = images, "not an idx file"
    with pytest.raises(ValueError) as info:
        D.load_dataset("fashion-mnist", tmp_path / "fm")
    assert str(named) in str(info.value) and what in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------- 6. run-directory lock
def test_a_second_process_on_a_run_directory_is_refused(fmnist_dir, tmp_path, capsys):
    run = _run(fmnist_dir, tmp_path / "run", stop_after=1)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
        "print('locked', flush=True); time.sleep(60)"), str(run / P.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _files(run)
        assert main(["train", "--resume", str(run), "--no-progress"]) == 2
        _one_line(capsys.readouterr().err, "train", f"--resume {run}", f"another process (pid {holder.pid})")
        assert _files(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # the lock died with its holder


def test_two_trainers_of_one_directory_in_one_process(fmnist_dir, tmp_path):
    run = _run(fmnist_dir, tmp_path / "run", epochs=3, stop_after=1)
    first = Trainer(None, run, resume=True, log=lambda m: None)
    with pytest.raises(P.RunLockedError, match=f"pid {os.getpid()}"):
        Trainer(None, run, resume=True, log=lambda m: None)
    first.fit(stop_after=1)  # the lock is released when fit returns ...
    second = Trainer(None, run, resume=True, log=lambda m: None)
    second.fit()
    # ... and a trainer whose run was continued by another one refuses to write over it
    with pytest.raises(C.CheckpointError, match="written by another process"):
        first.fit()


def test_output_check_does_not_create_anything(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert P.check_output_dir(target) == target and not (tmp_path / "a").exists()
    assert P.check_output_dir(target, create=True).is_dir()
    assert os.listdir(target) == [] and sorted(os.listdir(tmp_path)) == ["a"]  # the probe file is gone


def test_a_second_sweep_of_one_directory_is_refused(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    out.mkdir()
    held = P.RunLock(out)
    held.acquire("the first sweep")
    try:
        assert main(["sweep", "--out", str(out), "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir),
                     "--model", "mlp", "--model-option", "hidden=[16]", "--epochs", "1", "--no-progress",
                     "--no-final-eval", "--threads", "1", "--methods", "static", "--distributions", "uniform"]) == 2
        _one_line(capsys.readouterr().err, "sweep", f"sweep --out {out}", f"another process (pid {os.getpid()})")
        assert sorted(os.listdir(out)) == [P.LOCK_FILE]  # nothing trained, no sweep.json
    finally:
        held.release()
