"""Hostile and awkward input to ``sparsestart train/evaluate/demo`` (issue 17): clear one-line errors, no crash,
no silent substitute. Cases that crashed the process (SIGSEGV) run in a subprocess."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsestart.cli import main
from sparsestart.train import checkpoint as C
from sparsestart.train import data as D
from sparsestart.train.trainer import Trainer
from tests.train.conftest import write_fashion_mnist
from tests.train.test_trainer import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


def _cli(args, timeout=300):
    """``sparsestart ARGS`` in a fresh process (a crash there fails the test instead of killing pytest)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SPARSESTART_DATA", None)
    return subprocess.run([sys.executable, "-m", "sparsestart", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)


def _limit_memory():
    """8 GiB of address space: whatever goes wrong in the child (100000 thread stacks), the machine is safe."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _one_line_error(proc, cmd, *expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert err.startswith(f"sparsestart {cmd}: error:") and "Traceback" not in err, err
    for e in expected:
        assert e in err, (e, err)


@pytest.fixture
def stopped_run(fmnist_dir, tmp_path):
    """A run of 2 epochs stopped after the first (resumable), on the tiny Fashion-MNIST of ``fmnist_dir``."""
    out = tmp_path / "run"
    Trainer(tiny_cfg(fmnist_dir, model="mlp", model_options={"hidden": [16]}, epochs=2, threads=1), out,
            log=lambda m: None).fit(stop_after=1)
    return out


# ---------------------------------------------------------------------------------------------- 1. --threads
def test_max_threads_is_a_small_multiple_of_the_cores():
    from sparsestart.train.config import max_threads

    assert max_threads() == 4 * (os.cpu_count() or 1)


def test_threads_out_of_range_is_refused_not_a_segfault(stopped_run, fmnist_dir, tmp_path):
    from sparsestart.train.config import max_threads

    top = max_threads()
    rng = f"[1, {top}]"
    base = ["--dataset", "fashion-mnist", "--data-dir", fmnist_dir, "--model", "mlp", "--epochs", "1",
            "--no-progress", "--no-final-eval"]
    # the command line
    _one_line_error(_cli(["train", *base, "--threads", "100000", "--out", tmp_path / "a"]), "train",
                    "--threads", "100000", rng)
    assert not (tmp_path / "a").exists()
    # a config file
    (tmp_path / "c.toml").write_text("threads = 100000\n")
    _one_line_error(_cli(["train", *base, "--config", tmp_path / "c.toml", "--out", tmp_path / "b"]), "train",
                    "--threads", "100000", rng)
    # runtime overrides on --resume
    ckpt = stopped_run / "checkpoint.pt"
    before = ckpt.read_bytes()
    for bad in ("-3", "0", str(top + 1)):
        _one_line_error(_cli(["train", "--resume", stopped_run, "--threads", bad]), "train", "--threads", bad, rng)
    # the checkpoint's own configuration
    state = C.load_checkpoint(ckpt)
    state["config"]["threads"] = 100000
    C.atomic_save(state, ckpt)
    edited = ckpt.read_bytes()
    _one_line_error(_cli(["train", "--resume", stopped_run]), "train", "--threads", "100000", rng,
                    "configuration saved in", "give --threads to override")
    assert ckpt.read_bytes() == edited
    # ... which a runtime override replaces (a run saved on a big machine continues on a small one)
    proc = _cli(["train", "--resume", stopped_run, "--threads", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert C.load_checkpoint(ckpt)["config"]["threads"] == 1 and before != ckpt.read_bytes()
    # evaluate
    _one_line_error(_cli(["evaluate", stopped_run, "--threads", "100000"]), "evaluate", "--threads", "100000", rng)
    assert not (stopped_run / "evaluation-final.json").exists()


def test_threads_within_range_still_work_on_resume(stopped_run):
    assert main(["train", "--resume", str(stopped_run), "--threads", "1", "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------- 2. --data-dir
@pytest.fixture
def system_fmnist(tmp_path, monkeypatch):
    """A (fake) system copy of Fashion-MNIST where Debian installs it; $SPARSESTART_DATA unset."""
    folder, _ = write_fashion_mnist(tmp_path / "system-fm", n_train=40, n_test=10)
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(folder))
    monkeypatch.delenv("SPARSESTART_DATA", raising=False)
    return folder


def test_named_data_dir_is_used_or_refused_never_the_system_copy(system_fmnist, tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist", missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert f"  {system_fmnist}\n" not in str(info.value)  # not among the places looked

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist", empty)
    msg = str(info.value)
    assert str(empty) in msg
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert stem in msg

    partial, _ = write_fashion_mnist(tmp_path / "partial", n_train=20, n_test=5)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("fashion-mnist", tmp_path / "partial")
    msg = str(info.value)
    assert msg.split(" is missing ", 1)[1].split(". Looked for", 1)[0] == "t10k-labels-idx1-ubyte.gz", msg
    assert not D.fashion_mnist_available(tmp_path / "partial") and D.fashion_mnist_available(None)
    # complete: used (the subfolder too), and the system copy is used only without --data-dir
    good, _ = write_fashion_mnist(tmp_path / "good" / "fashion-mnist", n_train=30, n_test=5)
    assert D.load_dataset("fashion-mnist", tmp_path / "good").source == str(good)
    assert D.load_dataset("fashion-mnist", None).source == str(system_fmnist)


def test_named_data_dir_wins_over_the_environment(tmp_path, monkeypatch, no_system_data):
    from tests.train.conftest import write_cifar10

    write_fashion_mnist(tmp_path / "env" / "fashion-mnist", n_train=20, n_test=5)
    write_cifar10(tmp_path / "env")
    monkeypatch.setenv("SPARSESTART_DATA", str(tmp_path / "env"))
    assert D.load_dataset("fashion-mnist", None).source.startswith(str(tmp_path / "env"))
    for name in ("fashion-mnist", "cifar10"):
        with pytest.raises(D.DatasetNotFoundError, match=re.escape(str(tmp_path / "elsewhere"))):
            D.load_dataset(name, tmp_path / "elsewhere")


def test_cli_refuses_a_named_data_dir_without_the_files(system_fmnist, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for extra in ([], ["--dataset", "fashion-mnist"]):  # also with the dataset left to "auto"
        out = tmp_path / f"o{len(extra)}"
        code = main(["train", "--data-dir", str(empty), "--model", "mlp", "--epochs", "1", "--no-progress",
                     "--no-final-eval", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert str(empty) in err and "t10k-labels-idx1-ubyte" in err
        assert not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------- 3. evaluate
@pytest.mark.parametrize("args, expected", [
    (["--fgsm-eps", "-1"], ["--fgsm-eps", "-1", "[0.0, 1.0]"]),
    (["--fgsm-eps", "nan"], ["--fgsm-eps"]),
    (["--test-limit", "0"], ["--test-limit", "0"]),
    (["--test-limit", "-5"], ["--test-limit", "-5"]),
    (["--eval-batch-size", "0"], ["--eval-batch-size", "0"]),
    (["--threads", "0"], ["--threads", "0"]),
])
def test_evaluate_validates_its_overrides(args, expected, stopped_run, capsys):
    code = main(["evaluate", str(stopped_run), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("sparsestart evaluate: error:") and len(err.splitlines()) == 1, err
    for e in expected:
        assert e in err, (e, err)
    assert not (stopped_run / "evaluation-final.json").exists()


# ---------------------------------------------------------------------------------------------- 4. stale temp files
_KILL_DURING_SAVE = """
import os, signal, sys, torch
from sparsestart.train.trainer import Trainer
real_save = torch.save
def save_then_die(obj, f, *a, **kw):
    real_save(obj, f, *a, **kw)
    if isinstance(obj, dict) and obj.get("kind") == "checkpoint":
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the atomic save
torch.save = save_then_die
Trainer(None, sys.argv[1], resume=True, overrides={"progress": False}, log=lambda m: None).fit()
"""


def _temp_files(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.endswith(".tmp"))


def test_temp_files_of_a_killed_save_are_cleaned_on_the_next_start(stopped_run):
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(stopped_run)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    stale = _temp_files(stopped_run)
    assert any(re.fullmatch(r"\.checkpoint\.pt\.[a-z0-9_]{8}\.tmp", n) for n in stale), stale
    # files that only look similar are not the library's: they stay
    foreign = [".checkpoint.pt.tmp", "checkpoint.pt.abcdefgh.tmp", ".checkpoint.pt.ABCDEFGH.tmp", "notes.tmp",
               ".other.pt.abcdefgh.tmp"]
    for name in foreign:
        (stopped_run / name).write_text("keep")
    (stopped_run / ".best.pt.q1w2e3r4.tmp").write_bytes(b"stale")
    (stopped_run / ".metrics.csv.zz_99xyz.tmp").write_bytes(b"stale")
    assert C.load_checkpoint(stopped_run / "checkpoint.pt")["epoch"] == 1  # the last completed epoch survived
    Trainer(None, stopped_run, resume=True, overrides={"progress": False}, log=lambda m: None)
    assert _temp_files(stopped_run) == sorted(foreign)


def test_temp_files_cleaned_when_a_first_run_restarts(fmnist_dir, tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / ".checkpoint.pt.abcd_123.tmp").write_bytes(b"killed during the first save")
    Trainer(tiny_cfg(fmnist_dir, model="mlp", epochs=1), out, log=lambda m: None)
    assert _temp_files(out) == []


# ------------------------------------------------------------------------------------------ 5. help, demo, --exclude
def _accepts(cls, key):
    params = inspect.signature(cls.__init__).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_method_option_examples_in_help_and_docs_are_accepted():
    from sparsestart.algorithms import ALGORITHMS
    from sparsestart.train.cli import OPTIONS

    help_text = next(kw["help"] for dest, _, kw in OPTIONS if dest == "method_options")
    examples = []  # (key, method)
    for keys, method in re.findall(r"((?:\w+=\S+(?:,| or| and)? )+)for (\w+)", help_text):
        examples += [(k, method) for k in re.findall(r"(\w+)=", keys)]
    docs = (ROOT / "docs" / "training.md").read_text()
    examples += [(k, m) for m, k in re.findall(r"`(\w+):(\w+)=[^`]*`", docs) if m in ALGORITHMS]
    assert {"imp", "rigl"} <= {m for _, m in examples}, examples
    for key, method in examples:
        assert _accepts(ALGORITHMS[method], key), f"{method} does not take {key!r}"


def test_documented_imp_options_train(fmnist_dir, tmp_path, capsys):
    code = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp",
                 "--model-option", "hidden=[16]", "--density", "0.5", "--distribution", "uniform", "--method", "imp",
                 "--method-option", "final_density=0.3", "--method-option", "prune_fraction=0.5",
                 "--epochs", "1", "--threads", "1", "--no-progress", "--no-final-eval", "--out", str(tmp_path / "i")])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--density", "0"], ["--density", "(0, 1]"]),
    (["--density", "nan"], ["--density"]),
    (["--density", "1.5"], ["--density", "(0, 1]"]),
    (["--epochs", "-1"], ["--epochs", "-1"]),
    (["--epochs", "0"], ["--epochs", "0"]),
])
def test_demo_validates_its_options(args, expected, capsys):
    code = main(["demo", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("sparsestart demo: error:") and len(err.splitlines()) == 1, err
    for e in expected:
        assert e in err, (e, err)


def test_exclude_pattern_that_matches_no_layer_is_refused(fmnist_dir, tmp_path, capsys):
    base = ["train", "--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--model", "mlp", "--density", "0.3",
            "--distribution", "uniform", "--method", "static", "--epochs", "1", "--threads", "1", "--no-progress",
            "--no-final-eval"]
    assert main(base + ["--exclude", "nope*", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--exclude" in err and "'nope*'" in err and "matches no" in err and "fc1" in err and "fc2" in err, err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    # a pattern that matches is fine, even next to another one that does
    assert main(base + ["--exclude", "fc2", "--exclude", "f?2", "--out", str(tmp_path / "y")]) == 0, \
        capsys.readouterr().err
