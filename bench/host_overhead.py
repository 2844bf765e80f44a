"""Host time per call of the sparse layers on small shapes, where the kernels cost little and the
Python path around them is what a step waits for (on a GPU, the host issuing work is what bounds a
training step: docs/gpu.md). Measured in one process, interleaved, medians of repeated runs:

    SparseLinear(64 -> 64, density 0.1, algorithm "sparse"), batch 8
    SparseConv2d(8 -> 8, 3x3, padding 1, density 0.1, algorithm "direct"), input 2 x 8 x 6 x 6

forward (no_grad) and forward + backward, fp32 and under torch.autocast(bfloat16), each through the
eager fast path of the ops (sparsestart.ops.library.call_*: the op's impl without the dispatcher
when nothing needs it) and through the dispatcher (``library._FAST_PATH = False``, a switch for
this benchmark only), against nn.Linear / nn.Conv2d of the same shapes.

    python -m bench.host_overhead [--threads 1] [--rounds 9] [--out bench/results/host-overhead-cpu.json]
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from bench.common import forward_backward, interleaved, standalone_args, write_standalone
from sparsestart.nn import SparseConv2d, SparseLinear
from sparsestart.ops import library

OUT = Path(__file__).parent / "results" / "host-overhead-cpu.json"


def _cases():
    g = torch.Generator().manual_seed(0)
    linear = SparseLinear(64, 64, density=0.1, seed=0)
    linear.linear_algorithm = "sparse"
    conv = SparseConv2d(8, 8, 3, padding=1, density=0.1, seed=0)
    conv.conv_algorithm = "direct"
    return {
        "linear_64x64_d0.1_batch8": (linear, torch.nn.Linear(64, 64), torch.randn(8, 64, generator=g)),
        "conv_8x8_3x3_d0.1_2x6x6": (conv, torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(2, 8, 6, 6, generator=g)),
    }


def _with_fast_path(run, on: bool):
    def call():
        library._FAST_PATH = on
        run()
    return call


def _under(run, precision: str, grad: bool):
    def call():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx, (contextlib.nullcontext() if grad else torch.no_grad()):
            run()
    return call


def main(argv=None) -> dict:
    args = standalone_args(__doc__, OUT, 1, argv)
    results = {}
    try:
        for name, (layer, dense, x) in _cases().items():
            x = x.requires_grad_()
            gy = torch.randn_like(layer(x))
            for precision in ("fp32", "bf16"):
                for grad in (False, True):
                    def fwd(module):
                        return (lambda: module(x)) if not grad else forward_backward(module, module.parameters(),
                                                                                     x, gy)
                    fns = {"fast path": _with_fast_path(_under(fwd(layer), precision, grad), True),
                           "dispatcher": _with_fast_path(_under(fwd(layer), precision, grad), False),
                           "torch dense": _under(fwd(dense), precision, grad)}
                    stats = interleaved(fns, args.rounds, warmup=20, min_sample=5e-3, max_inner=2000)
                    us = {k: v["median"] * 1e6 for k, v in stats.items()}
                    key = f"{name} {precision} {'forward+backward' if grad else 'forward'}"
                    results[key] = {"us_per_call": us, "stats_s": stats,
                                    "saved_us": us["dispatcher"] - us["fast path"],
                                    "fast_over_dense": us["fast path"] / us["torch dense"]}
                    print(f"{key}: fast path {us['fast path']:.1f} us, dispatcher {us['dispatcher']:.1f} us, "
                          f"torch dense {us['torch dense']:.1f} us", flush=True)
    finally:
        library._FAST_PATH = True
    return write_standalone(args, "bench.host_overhead", argv, results)


if __name__ == "__main__":
    main()
