import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The models here are tiny: extra threads only add overhead (and spin badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
