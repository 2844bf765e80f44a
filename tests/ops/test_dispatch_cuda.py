"""On CUDA tensors the registry routes CSR to the cuda backend and BSR to triton.

Runs without a GPU: the tensors the registry inspects are stand-ins that report a
CUDA device, and both GPU backends are made available (or unavailable) explicitly;
we check which backend and kernel the choice lands on, which is what
SparseLinear/SparseConv2d rely on. The tests hold on GPU machines too, with or
without the CUDA extension. The end of the file checks when the triton backend
counts as available (triton installed and new enough, sparsestart.kernels
importable in every install mode).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
    """Every backend refuses: the reference is disabled, and both GPU backends are made unavailable
    explicitly, so this holds on a GPU machine with the CUDA extension too (there "cuda" would
    otherwise run the CSR probe)."""
    monkeypatch.delenv("SPARSESTART_BACKEND", raising=False)
    backends = registry.backends()
    monkeypatch.setattr(backends["reference"], "not_supported_reasons", lambda op, ts: ["disabled for this test"])
    monkeypatch.setattr(backends["triton"], "is_available", lambda: False)
    monkeypatch.setattr(backends["cuda"], "is_available", lambda: False)
    m, probe = _probe(1)
    with pytest.raises(registry.NoBackendError) as info:
        registry.choose("spmm", probe)
    text = str(info.value)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"{name}:" in text


@pytest.mark.parametrize("extension_has_cuda", [False, True])
def test_error_lists_every_reason_whether_or_not_the_extension_has_cuda(monkeypatch, extension_has_cuda):
    """As on a machine without and with a CUDA build of sparsestart._C: a BSR b=4 probe that no
    backend takes (reference disabled) names each backend's own reason."""
    monkeypatch.delenv("SPARSESTART_BACKEND", raising=False)
    backends = registry.backends()
    monkeypatch.setattr(backends["reference"], "not_supported_reasons", lambda op, ts: ["disabled for this test"])
    monkeypatch.setattr(backends["cuda"], "is_available", lambda: extension_has_cuda)
    monkeypatch.setattr(backends["triton"], "is_available", lambda: True)
    monkeypatch.setattr(gpu, "_capability", lambda index: (9, 0))
    m, probe = _probe(4)
    with pytest.raises(registry.NoBackendError) as info:
        registry.choose("spmm", probe)
    text = str(info.value)
    assert "triton: BSR block size 4" in text
    assert "cpu: needs CPU tensors" in text
    assert "reference: disabled for this test" in text
    assert ("cuda: runs CSR only" if extension_has_cuda else "cuda: ") in text


def test_cached_choice_follows_forcing_and_backend_changes(gpu_backends_available, monkeypatch):
    """The registry caches its choice; forcing (environment or use_backend) and any change to a
    backend (here: is_available) must still be seen on the next call."""
    m, probe = _probe(1)
    assert registry.choose("spmm", probe).name == "cuda"
    assert registry.choose("spmm", probe).name == "cuda"          # cached
    monkeypatch.setenv("SPARSESTART_BACKEND", "triton")
    assert registry.choose("spmm", probe).name == "triton"
    with registry.use_backend("reference"):
        assert registry.choose("spmm", probe).name == "reference"
    assert registry.choose("spmm", probe).name == "triton"
    monkeypatch.delenv("SPARSESTART_BACKEND")
    assert registry.choose("spmm", probe).name == "cuda"
    monkeypatch.setattr(registry.backends()["cuda"], "is_available", lambda: False)
    assert registry.choose("spmm", probe).name == "triton"
    # another device index, index dtype or block size is another key
    m16, probe16 = _probe(16)
    assert registry.choose("spmm", probe16).name == "triton"


# ------------------------------------------------- triton backend availability and packaging (F5)
ROOT = Path(__file__).resolve().parents[2]

# Run as a plain checkout would: no install maps sparsestart.kernels (pip's editable finder is removed
# before sparsestart is imported), the repository only on PYTHONPATH, the working directory elsewhere.
_PLAIN_CHECKOUT_CHILD = r"""
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in (getattr(f, "__module__", "") or "")]
import sparsestart
assert os.path.dirname(os.path.dirname(sparsestart.__file__)) == os.environ["ROOT"], sparsestart.__file__
assert importlib.util.find_spec("sparsestart.kernels") is None, "the kernels are mapped: not a plain checkout"
import torch
from sparsestart import ops
from sparsestart.ops import gpu, registry
triton_imported = "triton" in sys.modules
reason = gpu.triton_unavailable_reason()
assert triton_imported or "triton" not in sys.modules, "checking availability imported triton"
print("REASON", repr(reason))
import sparsestart.kernels
print("KERNELS", sparsestart.kernels.__file__)
if importlib.util.find_spec("triton") is not None:
    assert reason == "", reason
    # The first Triton op, in the interpreter on CPU tensors (the registry has chosen triton).
    from tests.util import random_matrix
    m = random_matrix(32, 16, 0.5, block_size=16, dtype=torch.float32, seed=1)
    x = torch.randn(16, 3)
    assert registry.choose("spmm", [m.values, m.rowptr, x]).name == "triton"
    torch.testing.assert_close(ops.matmul(m, x), m.to_dense().detach() @ x)
    print("OP OK")
"""


def test_kernels_import_from_a_plain_checkout(tmp_path):
    """F5: with the repository on PYTHONPATH and no install mapping, the triton backend still finds
    sparsestart.kernels (loaded from <repo>/kernels) and its first op runs (under the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSESTART_BACKEND", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), ROOT=str(ROOT), TRITON_INTERPRET="1", SPARSESTART_BACKEND="triton",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _PLAIN_CHECKOUT_CHILD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"KERNELS {ROOT / 'kernels' / '__init__.py'}" in proc.stdout
    if importlib.util.find_spec("triton") is not None:
        assert "OP OK" in proc.stdout


@pytest.fixture
def fresh_triton_check():
    gpu.triton_unavailable_reason.cache_clear()
    registry.clear_cache()
    yield
    gpu.triton_unavailable_reason.cache_clear()
    registry.clear_cache()


@pytest.fixture
def no_kernels_module(monkeypatch):
    """sparsestart.kernels not imported yet; whatever the test loads is dropped afterwards and the
    original modules come back."""
    import sparsestart

    def ours(name):
        return name == "sparsestart.kernels" or name.startswith("sparsestart.kernels.")

    saved = {n: m for n, m in sys.modules.items() if ours(n)}
    had_attr, attr = hasattr(sparsestart, "kernels"), getattr(sparsestart, "kernels", None)
    for name in saved:
        del sys.modules[name]
    if had_attr:
        delattr(sparsestart, "kernels")
    yield
    for name in [n for n in sys.modules if ours(n)]:
        del sys.modules[name]
    sys.modules.update(saved)
    if had_attr:
        sparsestart.kernels = attr
    elif hasattr(sparsestart, "kernels"):
        delattr(sparsestart, "kernels")


def _unmapped():
    raise ModuleNotFoundError("No module named 'sparsestart.kernels'", name="sparsestart.kernels")


def test_kernels_shim_is_taken_when_the_mapped_import_fails(monkeypatch, fresh_triton_check, no_kernels_module):
    """In-process: when ``import sparsestart.kernels`` finds nothing (no install mapping), the package
    is loaded from <repo>/kernels under that name, with a __path__ for its submodules."""
    import sparsestart

    monkeypatch.setattr(gpu, "_import_installed_kernels", _unmapped)
    module = gpu._kernels_package()
    assert Path(module.__file__) == ROOT / "kernels" / "__init__.py"
    assert list(module.__path__) == [str(ROOT / "kernels")]
    assert sys.modules["sparsestart.kernels"] is module and sparsestart.kernels is module
    assert importlib.util.find_spec("sparsestart.kernels.launch").origin == str(ROOT / "kernels" / "launch.py")
    assert gpu.triton_unavailable_reason() == ("" if importlib.util.find_spec("triton") else
                                               "triton is not installed (pip install triton)")


def test_kernels_missing_makes_triton_unavailable_with_the_reason(monkeypatch, fresh_triton_check,
                                                                  no_kernels_module, tmp_path):
    monkeypatch.setattr(gpu, "_import_installed_kernels", _unmapped)
    monkeypatch.setattr(gpu, "_checkout_kernels_dir", lambda: tmp_path / "kernels")  # not there either
    monkeypatch.setattr(gpu, "_triton_installed", lambda: True)
    monkeypatch.setattr(gpu, "_triton_version", lambda: "3.6.0")
    reason = gpu.triton_unavailable_reason()
    assert "sparsestart.kernels" in reason and "cannot be imported" in reason
    assert not gpu.triton_available()
    m, probe = _probe(16)
    with registry.use_backend("triton"), pytest.raises(registry.NoBackendError, match="cannot be imported"):
        registry.choose("spmm", probe)


@pytest.mark.parametrize("version,ok", [("2.3.1", False), ("3.0.0", True), ("3.6.0", True), ("3.9.0+git1a2b", True),
                                        (None, True)])
def test_triton_version_gate(monkeypatch, fresh_triton_check, version, ok):
    monkeypatch.setattr(gpu, "_triton_installed", lambda: True)
    monkeypatch.setattr(gpu, "_triton_version", lambda: version)
    monkeypatch.setattr(gpu, "_kernels_package", lambda: None)
    assert gpu.triton_available() is ok
    if not ok:
        assert gpu.triton_unavailable_reason() == (f"triton {version} is too old: the kernels need triton >= 3.0 "
                                                   "(pip install -U triton)")


def test_triton_not_installed_reason(monkeypatch, fresh_triton_check):
    monkeypatch.setattr(gpu, "_triton_installed", lambda: False)
    assert gpu.triton_unavailable_reason() == "triton is not installed (pip install triton)"
    assert registry.backends()["triton"].why_unavailable() == "triton is not installed (pip install triton)"


def test_triton_version_is_read_without_importing_triton():
    version = gpu._triton_version()
    if importlib.util.find_spec("triton") is None:
        assert version is None
    else:
        assert version and gpu._version_tuple(version) >= (3, 0)
