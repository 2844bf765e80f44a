import os

# The suite runs "auto" with the threshold rule (sparsestart.nn.autotune reads this when sparsestart is
# imported, below): measured choices would depend on the machine's load, so rounding, and so results
# compared across runs, could change from one test run to the next, and timing every new shape would
# multiply the time of the many small-layer tests. tests/nn/test_autotune.py and the trainer's
# autotuned resume test turn tuning on themselves. Subprocesses (CLI, distributed workers) inherit it.
os.environ.setdefault("SPARSESTART_AUTOTUNE", "0")

import pytest  # noqa: E402

from tests.util import threads  # noqa: E402


def pytest_configure(config):
    """Benchmarks (tests/bench/test_regress.py) are off by default: under `make test` each case runs once, untimed,
    as a smoke test. `make bench-regress` times them with --benchmark-enable (--benchmark-only implies it)."""
    opt = config.option
    if hasattr(opt, "benchmark_disable") and not (opt.benchmark_enable or opt.benchmark_only):
        opt.benchmark_disable = True


@pytest.fixture
def single_thread():
    """Run a test on one torch thread (restored afterwards).

    Folders of many tiny kernels use it: extra threads only add overhead and
    OpenMP spin-waiting makes them many times slower on a loaded machine.
    """
    with threads(1):
        yield
