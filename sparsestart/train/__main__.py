"""``python -m sparsestart.train [train options]``: the same as ``sparsestart train``, also under torchrun.

    torchrun --nproc_per_node=2 -m sparsestart.train --dataset digits --model mlp --batch-size 128 --out runs/ddp

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set) the process
group is initialised before training (gloo for CPU tensors, plus nccl for CUDA
tensors when CUDA is available; $SPARSESTART_DIST_BACKEND overrides) and
destroyed afterwards; ranks other than 0 print nothing on standard output.
``--batch-size`` is the global batch. See docs/training.md, "Distributed".
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import distributed
from .cli import register

PROG = "python -m sparsestart.train"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the options of ``sparsestart train`` from ``argv`` (default: the command line) and train."""
    commands = argparse.ArgumentParser(prog=PROG).add_subparsers()
    register(commands)  # the parser of `sparsestart train`, reused as is
    parser = commands.choices["train"]
    parser.prog = PROG
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    with distributed.process_group(), distributed.quiet_unless_main():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
