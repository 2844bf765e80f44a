import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny kernels: one thread avoids OpenMP spin-waiting on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
