"""python -m bench: CPU kernel and layer benchmarks -> bench/results/<name>.json and docs/benchmarks.md."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import common, kernels, layers, report

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = [0.5, 0.2, 0.1, 0.05, 0.01, 0.001]


def _shape(s: str):
    try:
        M, K, N = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, got {s!r}") from None
    return M, K, N


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small shapes, two densities, few rounds")
    p.add_argument("--suites", nargs="+", default=["kernels", "layers"], choices=["kernels", "layers"])
    p.add_argument("--shapes", nargs="+", type=_shape, default=None,
                   help="kernel shapes MxKxN (default 4096x4096x256 1024x1024x256 64x576x65536 256x2304x4096)")
    p.add_argument("--blocks", nargs="+", type=int, default=None, help="1 = CSR, b = BSR with b x b blocks (default 1 16)")
    p.add_argument("--densities", nargs="+", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per kernel problem (default 15)")
    p.add_argument("--layer-rounds", type=int, default=None, help="interleaved rounds per layer problem (default 9)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each problem wait up to SECONDS for the machine to be >= 85%% idle")
    p.add_argument("--name", default=None, help="result name: bench/results/<name>.json (default cpu, or quick)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--docs", default=None,
                   help="markdown report to (re)write (default docs/benchmarks.md for a full run, none for --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or [(256, 192, 40), (64, 48, 300)]
        args.blocks = args.blocks or [1, 16]
        args.densities = args.densities or [0.2, 0.05]
        args.rounds = args.rounds or 3
        args.layer_rounds = args.layer_rounds or 3
        args.name = args.name or "quick"
    else:
        args.shapes = args.shapes or [(4096, 4096, 256), (1024, 1024, 256), (64, 576, 65536), (256, 2304, 4096)]
        args.blocks = args.blocks or [1, 16]
        args.densities = args.densities or DENSITIES
        args.rounds = args.rounds or 15
        args.layer_rounds = args.layer_rounds or 9
        args.name = args.name or "cpu"
        if args.docs is None:
            args.docs = str(ROOT / "docs" / "benchmarks.md")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    meta = common.machine_info(torch.get_num_threads())
    meta.update(command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                quick=args.quick, rounds=args.rounds, layer_rounds=args.layer_rounds, densities=args.densities,
                idle_at_start=common.idle_fraction(0.5))
    print(f"sparsestart CPU benchmarks: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}", flush=True)
    result = {"meta": meta}
    t0 = time.time()
    if "kernels" in args.suites:
        print("kernels:", flush=True)
        result["kernels"] = kernels.run(args, log=lambda s: print(s, flush=True))
    if "layers" in args.suites:
        print("layers:", flush=True)
        result["layers"] = layers.run(args, log=lambda s: print(s, flush=True))
    try:
        meta["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    meta["seconds"] = round(time.time() - t0, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if args.docs:
        Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.docs).write_text(report.render(result, source=str(path)))
        print(f"wrote {args.docs}")
    return result


if __name__ == "__main__":
    main()
