import pytest

from tests.util import threads


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
