"""``python -m sparsestart.train [train options]``: the same as ``sparsestart train``, also under torchrun.

    torchrun --nproc_per_node=2 -m sparsestart.train --dataset digits --model mlp --batch-size 128 --out runs/ddp

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) the process
group is initialised before training (gloo for CPU ranks; gloo plus nccl for
CUDA ranks, one GPU per rank; $SPARSESTART_DIST_BACKEND overrides) and
destroyed afterwards; ranks other than 0 print nothing on standard output.
``--batch-size`` is the global batch. See docs/training.md, "Distributed".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import distributed
from .cli import error, register

PROG = "python -m sparsestart.train"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the options of ``sparsestart train`` from ``argv`` (default: the command line) and train."""
    commands = argparse.ArgumentParser(prog=PROG).add_subparsers()
    register(commands)  # the parser of `sparsestart train`, reused as is
    parser = commands.choices["train"]
    parser.prog = PROG
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    device = None
    if distributed.launched_world_size() > 1:
        device = requested_device(args)  # decides the backend (nccl for CUDA ranks) and each rank's GPU
        try:
            distributed.run_device(device)
        except ValueError as exc:
            return error("train", exc)
    with distributed.process_group(device=device), distributed.quiet_unless_main():
        return args.func(args)


def requested_device(args) -> Optional[str]:
    """The ``--device`` of the run (command line, else --config file, else the checkpoint of --resume); None
    (auto) when none is set or it cannot be read here (the trainer then reports the problem itself)."""
    if getattr(args, "device", None) is not None:
        return args.device
    try:
        if getattr(args, "resume", None):
            from .checkpoint import load_checkpoint
            from .trainer import CHECKPOINT

            return load_checkpoint(Path(args.resume) / CHECKPOINT)["config"].get("device")
        if getattr(args, "config", None):
            from .config import load_config_file

            return load_config_file(args.config).get("device")
    except (ValueError, OSError, RuntimeError, KeyError, TypeError):
        return None
    return None


if __name__ == "__main__":
    sys.exit(main())
