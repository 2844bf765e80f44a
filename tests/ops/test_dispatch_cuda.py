"""On CUDA tensors the registry routes CSR to the cuda backend and BSR to triton.

Runs without a GPU: the tensors the registry inspects are stand-ins that report a
CUDA device, and both GPU backends are made available; we check which backend and
kernel the choice lands on, which is what SparseLinear/SparseConv2d rely on.
"""
import types

import pytest
import torch

from sparsestart.ops import gpu, registry
from tests.util import random_matrix


class _OnCuda:
    """A tensor's metadata as the registry sees it, but on device cuda:0."""

    def __init__(self, t):
        self._t = t
        self.device = torch.device("cuda", 0)
        self.dtype, self.shape = t.dtype, t.shape

    def dim(self):
        return self._t.dim()

    def numel(self):
        return self._t.numel()


@pytest.fixture
def gpu_backends_available(monkeypatch):
    backends = registry.backends()
    monkeypatch.setattr(backends["cuda"], "is_available", lambda: True)
    monkeypatch.setattr(backends["triton"], "is_available", lambda: True)
    monkeypatch.setattr(gpu, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("SPARSESTART_BACKEND", raising=False)


def _probe(b, dtype=torch.float32, op="spmm"):
    """The tensors the ops hand to registry.choose: (values, ptr, x), or (dy, ptr, x) for the gradients."""
    m = random_matrix(64, 64, 0.3, block_size=b, dtype=dtype)
    x = torch.randn(64, 8, dtype=dtype)
    first = torch.randn(64, 8, dtype=dtype) if op in ("sddmm", "conv2d_weight_grad") else m.values
    return m, [_OnCuda(first), _OnCuda(m.rowptr), _OnCuda(x)]


@pytest.mark.parametrize("op", ["spmm", "sddmm", "conv2d", "conv2d_input_grad", "conv2d_weight_grad"])
def test_csr_on_cuda_routes_to_cuda_cpp(gpu_backends_available, op):
    m, probe = _probe(1, op=op)
    backend = registry.choose(op, probe)
    assert backend.name == "cuda"
    assert callable(backend.kernel(op))


@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bsr_on_cuda_routes_to_triton(gpu_backends_available, b, dtype):
    m, probe = _probe(b, dtype)
    assert registry.choose("spmm", probe).name == "triton"


def test_odd_block_size_on_cuda_falls_back_to_reference_with_reasons(gpu_backends_available):
    m, probe = _probe(4)
    assert registry.choose("spmm", probe).name == "reference"
    with registry.use_backend("triton"), pytest.raises(registry.NoBackendError, match="block size 4"):
        registry.choose("spmm", probe)
    with registry.use_backend("cuda"), pytest.raises(registry.NoBackendError, match="runs CSR only"):
        registry.choose("spmm", probe)


def test_override_on_cuda(gpu_backends_available, monkeypatch):
    m, probe = _probe(1)
    monkeypatch.setenv("SPARSESTART_BACKEND", "triton")
    assert registry.choose("spmm", probe).name == "triton"
    with registry.use_backend("reference"):
        assert registry.choose("spmm", probe).name == "reference"


def test_without_gpu_backends_the_error_lists_every_reason(monkeypatch):
    monkeypatch.delenv("SPARSESTART_BACKEND", raising=False)
    backends = registry.backends()
    monkeypatch.setattr(backends["reference"], "not_supported_reasons", lambda op, ts: ["disabled for this test"])
    monkeypatch.setattr(backends["triton"], "is_available", lambda: False)
    m, probe = _probe(1)
    with pytest.raises(registry.NoBackendError) as info:
        registry.choose("spmm", probe)
    text = str(info.value)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"{name}:" in text
