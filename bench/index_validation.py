"""What the index validation of the public ops costs on the hot path (issue 17).

The ops validate the index contents once per structure version and then only look the verdict
up (sparsestart/ops/library.py). This measures, in one process and interleaved, a training
step's forward + backward of

    SparseLinear(4096 -> 4096, density 0.1), batch 256
    SparseConv2d(64 -> 64, 3x3, padding 1, density 0.1), input 16 x 64 x 32 x 32

with the cached check on and with it switched off (``library._VALIDATE_INDEX``, a switch for this
benchmark only), medians of repeated runs; plus, noise-free, the cached look-up alone per op call
and the one-off O(nnz) validation of each layer's index (paid again after each structure update).

    python -m bench.index_validation [--threads 2] [--rounds 9] [--out bench/results/index-validation-cpu.json]
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import forward_backward, interleaved, standalone_args, write_standalone
from sparsestart.formats.validation import validate_index
from sparsestart.nn import SparseConv2d, SparseLinear
from sparsestart.ops import library

OUT = Path(__file__).parent / "results" / "index-validation-cpu.json"
OPS_PER_STEP = 3  # forward op, then the value- and input-gradient ops of the backward


def _layers():
    g = torch.Generator().manual_seed(0)
    linear = SparseLinear(4096, 4096, density=0.1, seed=0)
    conv = SparseConv2d(64, 64, 3, padding=1, density=0.1, seed=0)
    return {
        "linear_4096x4096_d0.1_batch256": (linear, torch.randn(256, 4096, generator=g)),
        "conv_64x64_3x3_d0.1_16x32x32": (conv, torch.randn(16, 64, 32, 32, generator=g)),
    }


def _switched(run, on: bool):
    def call():
        library._VALIDATE_INDEX = on
        run()
    return call


def _lookup_seconds(layer, n: int = 20000) -> float:
    index, capacity = layer._index(), layer.values.shape[0]
    library._VALIDATE_INDEX = True
    library._check_contents("spmm", index, capacity)  # the verdict is cached from here on
    t0 = time.perf_counter()
    for _ in range(n):
        library._check_contents("spmm", index, capacity)
    return (time.perf_counter() - t0) / n


def _validation_seconds(layer, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        validate_index(layer._index(), capacity=layer.values.shape[0])
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    args = standalone_args(__doc__, OUT, 2, argv)
    results = {}
    try:
        for name, (layer, x) in _layers().items():
            x = x.requires_grad_()
            gy = torch.randn_like(layer(x))
            step = forward_backward(layer, layer.parameters(), x, gy)
            stats = interleaved({"validated": _switched(step, True), "unvalidated": _switched(step, False)},
                                args.rounds, warmup=2, min_sample=0.0, max_inner=1)
            on, off = stats["validated"]["median"], stats["unvalidated"]["median"]
            lookup = _lookup_seconds(layer)
            results[name] = {
                "nnz": layer.sparse_weight.nnz, "capacity": layer.values.shape[0],
                "step_median_s": {"validated": on, "unvalidated": off},
                "step_stats_s": stats,
                "overhead_measured": on / off - 1,
                "lookup_per_op_call_s": lookup,
                "overhead_from_lookup": OPS_PER_STEP * lookup / off,
                "one_off_validation_s": _validation_seconds(layer),
            }
            print(f"{name}: step {on * 1e3:.2f} ms validated vs {off * 1e3:.2f} ms unvalidated "
                  f"({100 * (on / off - 1):+.2f}% measured); cached look-up {lookup * 1e6:.2f} us per op call "
                  f"({100 * OPS_PER_STEP * lookup / off:.4f}% of a step); one-off validation "
                  f"{results[name]['one_off_validation_s'] * 1e3:.1f} ms", flush=True)
    finally:
        library._VALIDATE_INDEX = True
    return write_standalone(args, "bench.index_validation", argv, results,
                            target="overhead < 3% of a forward + backward step")


if __name__ == "__main__":
    main()
