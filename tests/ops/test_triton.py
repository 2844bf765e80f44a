"""Triton kernels (kernels/) in Triton's interpreter on CPU tensors, against the float64 reference.

How this runs without a GPU: Triton's interpreter executes the kernels with
numpy when TRITON_INTERPRET=1 is in the environment *when triton is first
imported*. This module

- runs in-process when no CUDA device is visible and triton is not imported yet
  (or already imported in interpreter mode): it sets TRITON_INTERPRET=1 just
  around ``import triton`` and again, with a fixture, only while its own tests
  run, so the rest of the suite never sees the variable;
- otherwise (a GPU machine, or triton already imported for the GPU) runs itself
  in a subprocess with TRITON_INTERPRET=1 and no visible GPU, so the GPU tests
  in the same session keep compiled kernels.

Every kernel is forced with ``use_backend("triton")`` (the explicit switch;
the interpreter never wins the automatic choice). Shapes are tiny: the
interpreter runs each program in numpy.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

_CHILD_FLAG = "_SPARSESTART_TRITON_INTERPRETER_CHILD"
_IN_CHILD = os.environ.get(_CHILD_FLAG) == "1"


def _triton_imported_compiled() -> bool:
    if "triton" not in sys.modules:
        return False
    import triton
    import triton.language as tl

    return isinstance(tl.standard.cdiv, triton.runtime.jit.JITFunction)


IN_PROCESS = _IN_CHILD or (not torch.cuda.is_available() and not _triton_imported_compiled())

if IN_PROCESS and "triton" not in sys.modules:
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (decides interpreter mode for this process)
    finally:
        if _old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _old

import sparsestart.ops.gpu  # noqa: E402,F401  (registers the triton and cuda backends)
from sparsestart import ops  # noqa: E402
from sparsestart.nn import SparseConv2d, SparseLinear  # noqa: E402
from sparsestart.ops import registry  # noqa: E402
from tests.util import compare_with_dense, random_matrix, rel_err  # noqa: E402

needs_interpreter = pytest.mark.skipif(not IN_PROCESS, reason="runs in a subprocess under TRITON_INTERPRET=1 "
                                                                "(test_interpreter_suite_in_subprocess)")


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 and the triton backend forced, for one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"):
        yield


def _check(out, ref64, bound64, dtype):
    """Within the rounding of ``dtype`` at the output (inputs are exact in float64), fp32 accumulation."""
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    tol = (2 * torch.finfo(dtype).eps + 64 * acc_eps) * bound64 + 1e-30
    err = (out.double() - ref64).abs()
    assert out.dtype == dtype
    assert not bool((err > tol).any()), f"max error {err.max().item():.3g}, tolerance {tol.max().item():.3g} ({dtype})"


# (M, K, N, density, block_size, empty_rows, empty_cols, capacity_extra)
CASES = [
    (48, 32, 7, 0.5, 16, (1,), (0,), 2),    # odd N, an empty block row and block column, free slots
    (16, 32, 1, 0.0, 16, (), (), 1),        # nnz = 0
    (64, 96, 33, 0.5, 32, (0,), (), 0),
    (128, 128, 5, 0.75, 64, (), (1,), 1),
    (37, 29, 9, 0.3, 1, (0, 5), (3,), 3),   # CSR, odd shapes, empty rows and columns
    (13, 11, 17, 0.0, 1, (), (), 2),        # CSR nnz = 0
    (97, 31, 40, 0.1, 1, (0, 50, 95, 96), (), 5),  # CSR: SDDMM entry chunks cross rows; empty first/last rows
    (1, 1, 1, 1.0, 1, (), (), 0),
]
IDS = [f"{c[0]}x{c[1]}xN{c[2]}-d{c[3]}-b{c[4]}" for c in CASES]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_reference(interpreter, case, dtype):
    M, K, N, density, b, er, ec, extra = case
    index_dtype = torch.int64 if M == 37 else torch.int32
    m = random_matrix(M, K, density, block_size=b, dtype=dtype, capacity_extra=extra, empty_rows=er,
                      empty_cols=ec, seed=M + 7 * K, index_dtype=index_dtype)
    m.validate()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, N, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    assert registry.choose("spmm", [m.values, m.rowptr, x]).name == "triton"
    y, dx, dv = ops.matmul(m, x), ops.matmul_t(m, dy), ops.sampled_matmul(m, dy, x)
    w = m.to_dense().detach().double()
    x64, dy64 = x.double(), dy.double()
    _check(y, w @ x64, w.abs() @ x64.abs(), dtype)
    _check(dx, w.T @ dy64, w.abs().T @ dy64.abs(), dtype)
    mask = m.mask()
    dense_dv = type(m)(dv, *m.index_tensors(), m.shape).to_dense()
    _check(dense_dv, (dy64 @ x64.T) * mask, (dy64.abs() @ x64.abs().T) * mask, dtype)
    assert dv.shape == m.values.shape
    assert bool((dv[m.slot[m.nnz:].long()] == 0).all())


@needs_interpreter
@pytest.mark.parametrize("b", [1, 16])
def test_float64(interpreter, b):
    m = random_matrix(32, 48, 0.5, block_size=b, dtype=torch.float64, capacity_extra=1, seed=4)
    x, dy = torch.randn(48, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)
    w = m.to_dense().detach()
    torch.testing.assert_close(ops.matmul(m, x), w @ x)
    torch.testing.assert_close(ops.matmul_t(m, dy), w.T @ dy)
    dense_dv = type(m)(ops.sampled_matmul(m, dy, x), *m.index_tensors(), m.shape).to_dense()
    torch.testing.assert_close(dense_dv, (dy @ x.T) * m.mask())


@needs_interpreter
@pytest.mark.parametrize("fmt,b", [("bsr", 16), ("csr", None)])
def test_sparse_linear_forward_backward(interpreter, fmt, b):
    layer = SparseLinear(48, 32, density=0.5, format=fmt, block_size=b, capacity=None, seed=1)
    layer.validate()
    compare_with_dense(layer, torch.randn(3, 2, 48))


@needs_interpreter
def test_sparse_conv2d_bsr_forward_backward(interpreter):
    layer = SparseConv2d(8, 32, 2, stride=1, padding=1, density=0.5, format="bsr", block_size=16, seed=2)  # K = 32
    layer.validate()
    assert layer.values.shape[1:] == (16, 16)
    compare_with_dense(layer, torch.randn(2, 8, 3, 4))


@needs_interpreter
def test_sparse_conv2d_csr_stride1_uses_the_conv_kernels(interpreter):
    """Stride-1 CSR convolutions go through the registry's conv2d ops, which the triton backend runs as
    unfold + its spmm/sddmm (sparsestart/ops/gpu.py)."""
    layer = SparseConv2d(3, 5, 3, padding=1, density=0.4, seed=4)
    probe = [layer.values, layer.rowptr, torch.randn(1, 3, 4, 4)]
    assert registry.choose("conv2d", probe).name == "triton"
    compare_with_dense(layer, torch.randn(2, 3, 5, 4))


@needs_interpreter
def test_sparse_linear_bf16_trains(interpreter):
    """A bf16 BSR layer: forward and backward run on the triton kernels, close to the fp32 computation."""
    layer = SparseLinear(32, 16, density=1.0, format="bsr", block_size=16, seed=3)
    ref = SparseLinear(32, 16, density=1.0, format="bsr", block_size=16, seed=3)
    layer.to(torch.bfloat16)
    x = torch.randn(4, 32)
    y = layer(x.to(torch.bfloat16))
    y.float().sum().backward()
    with ops.use_backend("reference"):
        yr = ref(x.to(torch.bfloat16).float())
        yr.sum().backward()
    assert y.dtype == torch.bfloat16 and layer.values.grad.dtype == torch.bfloat16
    assert rel_err(y.float(), yr) < 3e-2
    assert rel_err(layer.values.grad.float(), ref.values.grad) < 3e-2


@needs_interpreter
def test_torch_compile_keeps_the_custom_op_opaque(interpreter):
    layer = SparseLinear(32, 16, density=0.5, format="bsr", block_size=16, seed=5)
    x = torch.randn(3, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer.to_dense()(x))


# ---------------------------------------------------------------- backend choice (no kernel runs)
def test_triton_not_chosen_for_cpu_tensors_unless_forced(monkeypatch):
    m = random_matrix(32, 32, 0.5, block_size=16, dtype=torch.float32)
    x = torch.randn(32, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.choose("spmm", [m.values, m.rowptr, x]).name != "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with ops.use_backend("triton"), pytest.raises(ops.NoBackendError, match="set TRITON_INTERPRET=1"):
        ops.matmul(m, x)


def test_triton_reasons_name_block_size_and_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = random_matrix(8, 8, 0.5, block_size=4, dtype=torch.float32)
    with ops.use_backend("triton"), pytest.raises(ops.NoBackendError, match=r"BSR block size 4 is not one of"):
        ops.matmul(m, torch.randn(8, 2))
    with ops.use_backend("triton"), pytest.raises(ops.NoBackendError, match=r"block size 4 is not one of"):
        ops.sampled_matmul(m, torch.randn(8, 2), torch.randn(8, 2))
    reasons = registry.backends()["triton"].not_supported_reasons(
        "spmm", [torch.zeros(3, dtype=torch.int16), torch.zeros(2, dtype=torch.int32), torch.zeros(1, 1)])
    assert any("supports float16, bfloat16, float32, float64, got torch.int16" in r for r in reasons)


def test_cuda_backend_reasons_on_this_machine():
    m = random_matrix(32, 32, 0.5, block_size=16, dtype=torch.float32)
    x = torch.randn(32, 3)
    cuda = registry.backends()["cuda"]
    reasons = cuda.not_supported_reasons("spmm", [m.values, m.rowptr, x])
    assert any("needs CUDA tensors, got ['cpu']" in r for r in reasons)
    assert any("runs CSR only, got BSR with block size 16" in r for r in reasons)
    if not sparsestart.ops.gpu.cuda_extension_available():
        assert "built without CUDA" in cuda.unavailable_reason or "not built" in cuda.unavailable_reason
        with ops.use_backend("cuda"), pytest.raises(ops.NoBackendError, match="cuda"):
            ops.matmul(m, x)


# ---------------------------------------------------------------- subprocess runner (GPU machines)
@pytest.mark.skipif(IN_PROCESS, reason="the interpreter tests ran in this process")
@pytest.mark.timeout(600)
def test_interpreter_suite_in_subprocess():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **{_CHILD_FLAG: "1"})
    env.pop("SPARSESTART_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ------------------------------------------------ host side of the launchers (review F3, F8, F9, F18)
# Pure Python: no kernel runs, so these hold in interpreter and compiled mode alike.

def _launch():
    import sparsestart.kernels.launch as launch

    return launch


def test_fp32_precision_reads_the_new_torch_api(monkeypatch):
    """Once a user sets torch.backends.cuda.matmul.fp32_precision, torch's legacy getter raises;
    the launcher must read the new setting instead of failing every fp32 op (F18)."""
    launch = _launch()
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    old_new, old_legacy = matmul.fp32_precision, torch.backends.cuda.matmul.allow_tf32
    try:
        matmul.fp32_precision = "tf32"
        assert launch._precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert launch._precision(torch.float32) == "ieee"
        assert launch._precision(torch.float64) == "ieee"
    finally:
        matmul.fp32_precision = old_new
        torch.backends.cuda.matmul.allow_tf32 = old_legacy


def test_fp32_precision_follows_the_legacy_setting():
    launch = _launch()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # legacy API: resets the new one to "none"-compatible state
        torch.set_float32_matmul_precision("high")
        assert launch._precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert launch._precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
        torch.set_float32_matmul_precision("highest")


def test_jit_works_without_triton_knobs(monkeypatch):
    """triton < 3.4 has no triton.knobs: jitting falls back to TRITON_INTERPRET in the environment (F3)."""
    launch = _launch()
    monkeypatch.setattr(launch, "knobs", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if launch.INTERPRETED else "1")  # the opposite of the mode

    def kernel(x_ptr):
        pass

    jitted = launch._jit(kernel)
    assert callable(jitted)
    assert os.environ["TRITON_INTERPRET"] == ("0" if launch.INTERPRETED else "1")  # restored


def _cfg_list(launch):
    return launch._BSR_SDDMM_CONFIGS[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_bsr_sddmm_prune_drops_spilling_and_oversized_configs(dtype, b):
    """fp32 B=64 BLOCK_N=128 on 4 warps spilled (255 registers) and fp64 B=64 pipelines need
    256 KB of shared memory; neither may reach the autotuner (F9, F-AOT)."""
    launch = _launch()
    a = torch.empty(0, dtype=dtype)
    kept = launch._prune_bsr_sddmm(_cfg_list(launch), {"a": a, "B": b})
    assert kept
    el = a.element_size()
    for c in kept:
        bn, w = c.kwargs["BLOCK_N"], c.num_warps
        assert b * bn * el / (32 * w) <= 128
        assert 2 * b * bn * el * c.num_stages <= launch._SMEM_LIMIT
    if dtype == torch.float32 and b == 64:
        assert not any(c.kwargs["BLOCK_N"] == 128 and c.num_warps == 4 for c in kept)
    if dtype == torch.float64 and b == 64:
        assert not any(c.kwargs["BLOCK_N"] == 128 for c in kept)


def test_autotune_lists_have_no_duplicate_stage_counts():
    """num_stages 4 compiled to the same kernel as 3 (F8): not in any list."""
    launch = _launch()
    for configs in (launch._BSR_SPMM_CONFIGS, launch._BSR_SDDMM_CONFIGS, launch._CSR_SPMM_CONFIGS,
                    launch._CSR_SDDMM_CONFIGS):
        assert all(c.num_stages <= 3 for c in configs)


def test_single_config_switch_in_a_fresh_process(tmp_path):
    """SPARSESTART_TRITON_AUTOTUNE=0 leaves one config per kernel (F8)."""
    code = ("import sparsestart.kernels.launch as L\n"
            "sizes = [len(k.configs) for k in (L._bsr_spmm, L._bsr_sddmm, L._csr_spmm, L._csr_sddmm)]\n"
            "print(L.AUTOTUNE, L.INTERPRETED, sizes)\n")
    env = dict(os.environ, SPARSESTART_TRITON_AUTOTUNE="0", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    env.pop(_CHILD_FLAG, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False False [1, 1, 1, 1]"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [70, 97])
def test_bsr_sddmm_split_over_n(interpreter, monkeypatch, dtype, N):
    """Few blocks and a long N: the SDDMM splits N and sums fp32 partials (review F15); forced here
    with small limits. Splits of unequal length and a short last BLOCK_N tile included."""
    launch = _launch()
    monkeypatch.setattr(launch, "_SDDMM_MIN_SPLIT_N", 16)
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 64)
    m = random_matrix(48, 32, 0.5, block_size=16, dtype=dtype, capacity_extra=1, empty_rows=(1,), seed=5)
    assert launch.sddmm_splits(m.capacity, N, torch.device("cpu")) >= 3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, N, generator=g).to(dtype)
    dy = torch.randn(48, N, generator=g).to(dtype)
    dv = ops.sampled_matmul(m, dy, x)
    assert dv.dtype == dtype and dv.shape == m.values.shape
    mask = m.mask()
    dense_dv = type(m)(dv, *m.index_tensors(), m.shape).to_dense()
    x64, dy64 = x.double(), dy.double()
    _check(dense_dv, (dy64 @ x64.T) * mask, (dy64.abs() @ x64.abs().T) * mask, dtype)
    assert bool((dv[m.slot[m.nnz:].long()] == 0).all())


def test_sddmm_splits_only_when_the_entries_leave_the_gpu_idle(monkeypatch):
    launch = _launch()
    monkeypatch.setattr(launch, "_multiprocessors", lambda device: 132)
    dev = torch.device("cpu")
    assert launch.sddmm_splits(10_000, 1 << 20, dev) == 1       # enough entries
    assert launch.sddmm_splits(8, 1000, dev) == 1               # N too short to split
    assert launch.sddmm_splits(8, 1 << 16, dev) == 64           # 4 x 132 programs wanted, N / 1024 allows 64
    assert launch.sddmm_splits(100, 1 << 20, dev) == 6          # ceil(528 / 100)
