import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one torch thread (restored afterwards).

    Folders of many tiny kernels use it: extra threads only add overhead and
    OpenMP spin-waiting makes them many times slower on a loaded machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
