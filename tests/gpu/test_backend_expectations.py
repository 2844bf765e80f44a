"""The GPU suite's rule for missing backends (tests/gpu/backends.py), checked on any machine.

Before this rule a CUDA machine whose sparsestart._C lacked CUDA kernels ran the GPU suite
with the cuda cases silently dropped (review F2); now they fail unless explicitly allowed.
"""
from tests.gpu.backends import allowed_missing, gpu_backends, missing_reasons


def test_without_cuda_only_the_reference_runs():
    assert gpu_backends(False, missing_reasons(False, False), set()) == (["reference"], {})


def test_a_missing_backend_fails_on_a_cuda_machine():
    missing = missing_reasons(cuda_ext=False, triton_ok=True)
    names, must_fail = gpu_backends(True, missing, allowed=set())
    assert names == ["reference", "cuda", "triton"]
    assert set(must_fail) == {"cuda"} and "SPARSESTART_CUDA=1" in must_fail["cuda"]


def test_an_allowed_missing_backend_is_left_out():
    missing = missing_reasons(cuda_ext=False, triton_ok=False, triton_reason="triton is not installed")
    names, must_fail = gpu_backends(True, missing, allowed_missing("cuda"))
    assert names == ["reference"] + [] + ["triton"] and set(must_fail) == {"triton"}
    assert "triton is not installed" in must_fail["triton"]
    assert gpu_backends(True, missing, allowed_missing("all")) == (["reference"], {})


def test_every_backend_present():
    assert gpu_backends(True, missing_reasons(True, True), set()) == (["reference", "cuda", "triton"], {})
