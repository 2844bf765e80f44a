"""Training scenarios for tests/train/test_distributed.py, run on 2 ranks under torchrun and on 1 in the test.

    python -m torch.distributed.run --nproc_per_node=2 ... tests/train/distributed_worker.py OUT

Every scenario trains through ``sparsestart.train.__main__.main`` (the code
behind ``python -m sparsestart.train``) on a tiny problem (digits, an MLP, 5
steps per epoch whose last global batch of 5 splits 3 + 2). Every rank records
the loss of each of its steps and, after the run, its model state and the
method's history, saved to OUT/<scenario>/rank<r>.pt (the run itself is in
OUT/<scenario>/run). Under torchrun the worker finally changes one slot of one
layer on rank 1 only and saves, to OUT/tampered/rank<r>.pt, the error with
which the trainer's rank check refuses the difference.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsestart.nn import SparseLayer  # noqa: E402
from sparsestart.train import __main__ as entry  # noqa: E402
from sparsestart.train import distributed  # noqa: E402
from sparsestart.train.trainer import Trainer  # noqa: E402

COMMON = ["--dataset", "digits", "--model", "mlp", "--model-option", "hidden=[32]", "--density", "0.2",
          "--distribution", "uniform", "--batch-size", "50", "--train-limit", "205", "--test-limit", "40",
          "--threads", "1", "--no-progress", "--no-final-eval", "--device", "cpu"]
RESUME = ["--threads", "1", "--no-progress", "--resume"]


def _method(name, *options, epochs=1):
    return COMMON + ["--epochs", str(epochs), "--method", name] + \
        [a for o in options for a in ("--method-option", o)] + ["--out"]


# name -> command lines, each completed by the run directory.
SCENARIOS = {
    "static": [_method("static")],
    # 2 epochs of 5 steps, structure updates at steps 2, 4 and 6, interrupted after epoch 1 and resumed.
    "rigl": [_method("rigl", "update_every=2", epochs=2)[:-1] + ["--stop-after", "1", "--out"], RESUME],
    "set": [_method("set", "update_every=2")],
    "gradual": [_method("gradual", "final_density=0.1", "update_every=2")],
    "imp": [_method("imp", "final_density=0.16")],  # 3 epochs: one level, prune-and-rewind, one more level
    "str": [_method("str", "s_init=-5", "window=1", "compact_every=2")],
    "edgepopup": [_method("edgepopup", "final_density=0.1", "levels=2")],
    # --compile under DDP (torch.compile of the DDP module), with RigL's hooks between compiled pieces.
    "rigl-compiled": [_method("rigl", "update_every=2")[:-1] + ["--compile", "--out"]],
}
#: Scenarios run with SPARSESTART_COMPILE_BACKEND=aot_eager (dynamo's tracing, no C++ code generation).
COMPILED = ("rigl-compiled",)


@contextlib.contextmanager
def recording():
    """Record every training step's loss (this rank's share of the global mean) and the last Trainer fitted."""
    record = {"losses": [], "trainer": None}
    loss, fit = distributed.DistributedRun.loss, Trainer.fit

    def recorded_loss(self, logits, y, n_global):
        out = loss(self, logits, y, n_global)
        record["losses"].append(float(out.detach()))
        return out

    def recorded_fit(self, *args, **kwargs):
        record["trainer"] = self
        return fit(self, *args, **kwargs)

    distributed.DistributedRun.loss, Trainer.fit = recorded_loss, recorded_fit
    try:
        yield record
    finally:
        distributed.DistributedRun.loss, Trainer.fit = loss, fit


@contextlib.contextmanager
def compile_backend(backend):
    """SPARSESTART_COMPILE_BACKEND set to ``backend`` (None: left alone) for the block, restored after."""
    saved = os.environ.get("SPARSESTART_COMPILE_BACKEND")
    if backend is not None:
        os.environ["SPARSESTART_COMPILE_BACKEND"] = backend
    try:
        yield
    finally:
        if backend is not None:
            if saved is None:
                os.environ.pop("SPARSESTART_COMPILE_BACKEND", None)
            else:
                os.environ["SPARSESTART_COMPILE_BACKEND"] = saved


def run_scenario(name: str, out: Path) -> tuple[dict, Trainer]:
    """Train scenario ``name`` in ``out/name/run``: this rank's record (also saved to a file) and the Trainer."""
    run = out / name / "run"
    with recording() as record, compile_backend("aot_eager" if name in COMPILED else None):
        codes = [entry.main(argv + [str(run)]) for argv in SCENARIOS[name]]
    trainer = record["trainer"]
    result = {"codes": codes, "losses": record["losses"], "world": distributed.world_size(),
              "state": {k: v.detach().clone() for k, v in trainer.run.model.state_dict().items()},
              "history": list(trainer.run.algorithm.history),
              "compiled": trainer.step_model is not trainer.parallel.model}
    torch.save(result, out / name / f"rank{distributed.rank()}.pt")
    return result, trainer


def tamper_on_one_rank(trainer: Trainer, out: Path) -> None:
    """Swap two slots of the first sparse layer on rank 1 only; save the error of the trainer's rank check."""
    layer = next(m for m in trainer.run.model.modules() if isinstance(m, SparseLayer))
    if distributed.rank() == 1:
        layer.slot[[0, 1]] = layer.slot[[1, 0]].clone()
    try:
        trainer.parallel.verify("tampering")
        error = None
    except RuntimeError as exc:
        error = str(exc)
    (out / "tampered").mkdir(exist_ok=True)
    torch.save({"error": error}, out / "tampered" / f"rank{distributed.rank()}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.process_group():
        for name in SCENARIOS:
            _, trainer = run_scenario(name, out)
        tamper_on_one_rank(trainer, out)
        del trainer  # its DDP wrapper holds the group: free it before the group is destroyed


if __name__ == "__main__":
    main(Path(sys.argv[1]))
