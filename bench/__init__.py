"""CPU benchmarks of sparsestart: kernels and layers against dense torch and torch.sparse.

Run from the repository root:

    python -m bench                   # full sweep, 2 threads -> bench/results/cpu.json + docs/benchmarks.md
    python -m bench --quick           # tiny smoke run (seconds) -> bench/results/quick.json
    python -m bench --suites kernels  # only the kernel sweep
    python -m bench.report            # regenerate docs/benchmarks.md from bench/results/cpu.json
    python -m bench --device cuda --quick   # GPU suites (bench/gpu_suites.py) -> bench/results/gpu-<device>.json

Every measurement first checks the sparse results against the float64 reference
(sparsestart/ops/reference.py), then times all implementations of the same
problem in one process, interleaved round by round, and keeps the median (and
quartiles) of the repetitions. See bench/common.py for the timing rules and
bench/kernels.py, bench/layers.py for what is measured. bench/gpu.py is the
separate GPU kernel benchmark script; bench/gpu_suites.py the GPU layers, training and
algorithms suites (``--device cuda``), rendered by bench/gpu_report.py into their own
section of docs/benchmarks.md.
"""
