"""Data-parallel training on 2 processes (torchrun, gloo on loopback) against one process with the same global batch.

Two launches, side by side: tests/train/distributed_worker.py trains every
method through the CLI code and saves what each rank holds;
``-m sparsestart.train`` is the entry point as users launch it (stopped after
one epoch, then resumed in this process). The single-process references run
in this process meanwhile. The unit tests at the end need no process group.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sparsestart.train import __main__ as entry
from sparsestart.train import distributed as D
from tests.train import distributed_worker as W
from tests.util import threads

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 240  # seconds; a run takes ~15 s on an idle 2-core machine
RUN_FILES = {"checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.csv", "summary.json"}
INDEX = ("rowptr", "col", "slot", "colptr", "row", "slot_t")
REL = 1e-5  # float32 losses; only the summation order differs between 1 and 2 processes


# ---------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(*args: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 ARGS`` on 127.0.0.1 and a free port, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARSESTART_DIST_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """torchrun and the workers it started (their own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen) -> str:
    """The standard output of a launch that must succeed within LAUNCH_TIMEOUT."""
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill(proc)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return out


def assert_same_structure(a: dict, b: dict, *, values_rtol: float = 0.0) -> None:
    """Equal index buffers of every sparse layer; values (and every other tensor) equal, or within ``values_rtol``."""
    assert a.keys() == b.keys()
    for k in a:
        if k.rsplit(".", 1)[-1] in INDEX or values_rtol == 0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=values_rtol, atol=1e-6, msg=f"{k} differs")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


# ---------------------------------------------------------------------------------------------- the runs
CLI_ARGV = W._method("rigl", "update_every=2", epochs=2)  # updates at steps 2, 4, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both launches run while this process trains the single-process references (2 cores: overlap pays)."""
    out = tmp_path_factory.mktemp("distributed")
    launches = [start_torchrun(str(ROOT / "tests" / "train" / "distributed_worker.py"), str(out / "two")),
                start_torchrun("-m", "sparsestart.train", *CLI_ARGV[:-1], "--stop-after", "1", "--out",
                               str(out / "cli-two"))]
    try:
        with threads(1):
            single = {name: W.run_scenario(name, out / "one")[0] for name in W.SCENARIOS}
            assert entry.main(CLI_ARGV + [str(out / "cli-one")]) == 0
        worker_stdout, cli_stdout = (finish(p) for p in launches)
        with threads(1):  # the second epoch of the 2-process run, in one process
            assert entry.main(W.RESUME + [str(out / "cli-two")]) == 0
    finally:
        for p in launches:
            kill(p)
    return SimpleNamespace(out=out, two=out / "two", single=single, worker_stdout=worker_stdout,
                           cli_stdout=cli_stdout)


def ranks(runs, name: str) -> list[dict]:
    return [torch.load(runs.two / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_every_rank_holds_the_same_structure(runs, name):
    r0, r1 = ranks(runs, name)
    assert r0["world"] == r1["world"] == 2 and r0["codes"] == r1["codes"] == [0] * len(W.SCENARIOS[name])
    assert_same_structure(r0["state"], r1["state"])  # index, values, biases: bit for bit
    assert r0["history"] == r1["history"]
    assert r0["compiled"] == r1["compiled"] == (name in W.COMPILED)  # the step went through torch.compile
    if name in ("rigl", "set", "gradual", "imp", "str", "edgepopup", "rigl-compiled"):
        assert sum(h["dropped"] + h["grown"] for h in r0["history"]) > 0, "no structure update happened"
    if name == "rigl":
        assert sorted({h["step"] for h in r0["history"]}) == [2, 4, 6]  # updates before and after the resume


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_losses_and_structures_match_one_process(runs, name):
    r0, r1 = ranks(runs, name)
    single = runs.single[name]
    assert single["world"] == 1 and len(r0["losses"]) == len(r1["losses"]) == len(single["losses"]) > 0
    # each rank's loss is its share of the global mean: their average is the loss of the whole batch
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert rel(mean, single["losses"]) < REL, (mean, single["losses"])
    assert_same_structure(r0["state"], single["state"], values_rtol=1e-4)
    assert [(h["step"], h["layer"], h["dropped"], h["grown"]) for h in r0["history"]] == \
        [(h["step"], h["layer"], h["dropped"], h["grown"]) for h in single["history"]]


def test_only_rank_zero_writes(runs):
    for name in W.SCENARIOS:
        run = runs.two / name / "run"
        assert {p.name for p in run.iterdir()} == RUN_FILES, name  # no leftover temporary files either
        epochs = json.loads((run / "summary.json").read_text())["epochs"]
        assert [r["epoch"] for r in rows(run)] == list(range(1, epochs + 1)), name  # each row once
    # rank 1 prints nothing: one announcement per fresh run, one for the resume
    out = runs.worker_stdout
    assert out.count("training mlp on digits") == len(W.SCENARIOS)
    assert out.count("resuming ") == 1 and out.count("done: test accuracy") == len(W.SCENARIOS)


def test_rank_check_names_a_structure_changed_on_one_rank(runs):
    errors = [torch.load(runs.two / "tampered" / f"rank{r}.pt", weights_only=True)["error"] for r in (0, 1)]
    for e in errors:  # both ranks stop, with the same message
        assert e is not None and "rank(s) [1] differ from rank 0 in 1 entry: model.net.fc1.slot" in e


def test_the_structure_comparison_can_fail(runs):
    r0, r1 = ranks(runs, "rigl")
    changed = copy.deepcopy(r1["state"])
    changed["net.fc2.col"][3] += 1
    with pytest.raises(AssertionError, match="net.fc2.col differs"):
        assert_same_structure(r0["state"], changed)
    changed = copy.deepcopy(r1["state"])
    changed["net.fc2.values"][int(changed["net.fc2.slot"][0])] += 1e-3
    with pytest.raises(AssertionError, match="net.fc2.values differs"):
        assert_same_structure(r0["state"], changed, values_rtol=1e-4)


def test_module_entry_point_under_torchrun(runs):
    """``torchrun -m sparsestart.train`` initialises the group itself and trains like one process; a run
    stopped on 2 processes resumes in one."""
    assert runs.cli_stdout.count("training mlp on digits") == 1  # rank 1 is silent
    assert "stopped after 1 epoch(s)" in runs.cli_stdout
    two, one = runs.out / "cli-two", runs.out / "cli-one"
    assert {p.name for p in two.iterdir()} == RUN_FILES
    r2, r1 = rows(two), rows(one)
    assert [r["epoch"] for r in r2] == [r["epoch"] for r in r1] == [1, 2]
    assert rel([r["train_loss"] for r in r2], [r["train_loss"] for r in r1]) < REL
    assert [(r["step"], r["samples_seen"], r["nnz"]) for r in r2] == [(r["step"], r["samples_seen"], r["nnz"])
                                                                       for r in r1]
    assert [(r["step"], r["samples_seen"]) for r in r2] == [(5, 205), (10, 410)]
    c2, c1 = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (two, one))
    assert_same_structure(c2["model"], c1["model"], values_rtol=1e-4)
    assert c2["algorithm"]["history"] == c1["algorithm"]["history"] and len(c1["algorithm"]["history"]) == 6


# ---------------------------------------------------------------------------------------------- no process group
def test_shards_partition_every_batch():
    for n in range(1, 30):
        for world in range(1, 5):
            parts = [D.shard(n, r, world) for r in range(world)]
            sizes = [p.stop - p.start for p in parts]
            assert parts[0].start == 0 and parts[-1].stop == n and max(sizes) - min(sizes) <= 1
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def test_batches_too_small_for_the_ranks_are_refused():
    D.check_shards(205, 50, 2)  # last batch 5
    D.check_shards(200, 50, 4)  # no smaller last batch
    with pytest.raises(ValueError, match=r"--batch-size 50: with 2 processes .* leave a last batch of 1"):
        D.check_shards(201, 50, 2)
    with pytest.raises(ValueError, match="last batch of 3"):
        D.check_shards(3, 50, 4)


def test_one_process_trains_exactly_as_before():
    model = torch.nn.Linear(4, 3)
    run = SimpleNamespace(model=model)
    par = D.DistributedRun(run, state=dict)
    assert par.world == 1 and par.is_main and par.model is model
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    ((xs, ys, n),) = list(par.batches([(x, y)]))
    assert xs is x and ys is y and n == 5
    logits = model(x)
    assert torch.equal(par.loss(logits, y, n), F.cross_entropy(logits, y))
    par.after_backward(), par.wait_for_main()
    assert par.end_epoch(1.5, 3, 5) == (1.5, 3, 5)


def test_torchrun_without_process_group_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", *W._method("static"), str(tmp_path / "run")]
    from sparsestart.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "-m sparsestart.train" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("var, value, expected", [
    ("WORLD_SIZE", "two", "WORLD_SIZE='two': expected an integer >= 1"),
    ("WORLD_SIZE", "0", "WORLD_SIZE='0': expected an integer >= 1"),
    (D.TIMEOUT_ENV, "soon", f"{D.TIMEOUT_ENV}='soon': expected a positive number of seconds"),
])
def test_bad_environment_is_named(monkeypatch, var, value, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=expected):
        D.init()


def test_digests_name_what_differs():
    state = {"model": {"a": torch.arange(6, dtype=torch.int32), "b": torch.ones(2, 3)}, "step": 4,
             "history": [{"step": 2, "dropped": 3}]}
    before = D.state_digests(state)
    assert set(before) == {"model.a", "model.b", "step", "history[0].step", "history[0].dropped"}
    state["model"]["b"][1, 2] = 1.0 + 2 ** -20
    after = D.state_digests(state)
    assert [k for k in before if before[k] != after[k]] == ["model.b"]
    assert D.state_digests({"x": torch.zeros(3)}) != D.state_digests({"x": torch.zeros(3, dtype=torch.float64)})
    D.verify_identical(state, "one process")  # nothing to compare with
