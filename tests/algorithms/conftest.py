import pytest


@pytest.fixture(autouse=True)
def _single_thread(single_thread):
    """Every test in this folder runs on one thread (see tests/conftest.py)."""
    yield
