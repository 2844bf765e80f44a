import pytest

from tests.util import threads


@pytest.fixture
def single_thread():
    """Run a test on one torch thread (restored afterwards).

    Folders of many tiny kernels use it: extra threads only add overhead and
    OpenMP spin-waiting makes them many times slower on a loaded machine.
    """
    with threads(1):
        yield
