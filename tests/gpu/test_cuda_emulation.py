"""The CUDA C++ kernels (csrc/cuda/sparse_kernels.cuh) run on the CPU through csrc/cuda/emu, against the reference.

No GPU needed: the kernel source is compiled with the host C++ compiler and the
CUDA headers, every CUDA thread becomes an OS thread, and barriers/shuffles
are emulated over exactly the lanes the kernels name (see emu.h). The launch
shapes and template dispatch are those of csrc/cuda/kernels.cu (dispatch.h),
and the row swizzle is computed as csrc/cuda/torch/registration.cpp does. This
checks the index arithmetic, residues, vector/scalar paths, shared-memory
staging, subwarp reductions and the collective discipline; it cannot check
timing or what the compiler does for the GPU (scripts/check_ptxas.sh builds
that).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sparsestart.ops import reference
from tests.util import random_matrix

ROOT = Path(__file__).resolve().parents[2]
CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
HAVE_HEADERS = Path(CUDA_HOME, "include", "cuda_fp16.h").exists()

pytestmark = pytest.mark.skipif(not (CXX and HAVE_HEADERS),
                                reason=f"needs a host C++ compiler and the CUDA headers ({CUDA_HOME}/include)")

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
INDEX = {torch.int32: 0, torch.int64: 1}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = tmp_path_factory.mktemp("cuda_emu") / "libsparsestart_emu.so"
    cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", f"-I{CUDA_HOME}/include",
           str(ROOT / "csrc/cuda/emu/emu.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.emu_csr_spmm.argtypes = [i32, i32, p, p, p, p, p, p, p, i64, i64, i32]
    dll.emu_csr_sddmm.argtypes = [i32, i32, p, p, p, p, p, p, i64, i64, i64]
    dll.emu_shape.argtypes = [i32, i32, i64, i64, i32, ctypes.POINTER(i64)]
    return dll


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary (forces scalar loads)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _swizzle(ptr: torch.Tensor) -> torch.Tensor:
    lengths = ptr[1:] - ptr[:-1]
    return torch.sort(lengths, stable=True, descending=True).indices.to(torch.int32)


def _spmm(emu, values, ptr, idx, slot, x, rows, grid_y_cap=0, misalign=False):
    out = torch.full((rows, x.shape[1]), float("nan"), dtype=x.dtype)  # every element must be written
    if misalign:
        x, out = _misaligned(x), _misaligned(out)
    order = _swizzle(ptr)
    rc = emu.emu_csr_spmm(DTYPES[x.dtype], INDEX[ptr.dtype], values.data_ptr(), ptr.data_ptr(), idx.data_ptr(),
                          slot.data_ptr(), order.data_ptr(), x.data_ptr(), out.data_ptr(), rows, x.shape[1],
                          grid_y_cap)
    assert rc == 0
    return out


def _sddmm(emu, ptr, idx, slot, a, b, capacity, misalign=False):
    dv = torch.zeros(capacity, dtype=a.dtype)
    if misalign:
        a, b = _misaligned(a), _misaligned(b)
    rc = emu.emu_csr_sddmm(DTYPES[a.dtype], INDEX[ptr.dtype], ptr.data_ptr(), idx.data_ptr(), slot.data_ptr(),
                           a.data_ptr(), b.data_ptr(), dv.data_ptr(), ptr.numel() - 1, a.shape[1], capacity)
    assert rc == 0
    return dv


def _check(out, ref64, bound64, dtype):
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    tol = (2 * torch.finfo(dtype).eps + 64 * acc_eps) * bound64 + 1e-30
    err = (out.double() - ref64).abs()
    assert not bool(torch.isnan(out).any()), "an output element was not written"
    assert not bool((err > tol).any()), f"max error {err.max().item():.3g} ({dtype})"


# (M, K, N, density, empty_rows, empty_cols, capacity_extra): N picks every subwarp width and both load paths.
CASES = [
    (37, 29, 9, 0.3, (0, 5), (3,), 3),     # odd N: scalar loads, subwarp 16
    (20, 70, 64, 0.5, (2,), (), 2),        # N = 64: vectors, subwarp 16 (fp32) / 8 (16-bit)
    (9, 33, 3, 0.6, (), (0,), 0),          # tiny N: subwarp 4
    (45, 17, 200, 0.2, (1, 2, 3), (), 5),  # wide N: subwarp 32, several column tiles, long and empty rows
    (13, 11, 8, 0.0, (), (), 4),           # nnz = 0
    (1, 1, 1, 1.0, (), (), 0),
]
IDS = [f"{c[0]}x{c[1]}xN{c[2]}-d{c[3]}" for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_emulated_kernels_match_reference(emu, case, dtype):
    M, K, N, density, er, ec, extra = case
    index_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    m = random_matrix(M, K, density, dtype=dtype, capacity_extra=extra, empty_rows=er, empty_cols=ec,
                      seed=M * 13 + N, index_dtype=index_dtype)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(K, N, generator=g).to(dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    w = m.to_dense().detach().double()
    x64, dy64 = x.double(), dy.double()
    misalign = M % 2 == 1  # odd cases also run the scalar path on aligned-size N
    y = _spmm(emu, m.values, m.rowptr, m.col, m.slot, x, M, misalign=misalign)
    _check(y, w @ x64, w.abs() @ x64.abs(), dtype)
    dx = _spmm(emu, m.values, m.colptr, m.row, m.slot_t, dy, K, misalign=misalign)
    _check(dx, w.T @ dy64, w.abs().T @ dy64.abs(), dtype)
    dv = _sddmm(emu, m.rowptr, m.col, m.slot, dy, x, m.capacity, misalign=misalign)
    ref = reference.native_sddmm(m.rowptr, m.col, m.slot, dy64, x64, m.capacity, 1)
    bound = reference.native_sddmm(m.rowptr, m.col, m.slot, dy64.abs(), x64.abs(), m.capacity, 1)
    _check(dv, ref, bound, dtype)
    assert bool((dv[m.slot[m.nnz:].long()] == 0).all())


def test_column_tile_loop_beyond_grid_y(emu):
    """More column tiles than grid.y (65535 on the GPU; capped at 2 here) are covered by the grid-stride loop."""
    m = random_matrix(10, 12, 0.5, dtype=torch.float32, seed=2)
    x = torch.randn(12, 4 * 128 + 4)
    y = _spmm(emu, m.values, m.rowptr, m.col, m.slot, x, 10, grid_y_cap=2)
    w = m.to_dense().detach().double()
    _check(y, w @ x.double(), w.abs() @ x.double().abs(), torch.float32)


def test_sddmm_blocks_span_many_rows(emu):
    """Entry groups that cross row boundaries and rows longer than a block's entries."""
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(50, 300, generator=g) < 0.02
    mask[7] = True  # one row with 300 entries: spans several blocks
    from sparsestart.formats import CSR

    m = CSR.from_mask(mask, "kaiming_uniform", dtype=torch.float32, generator=g)
    a, b = torch.randn(50, 40, generator=g), torch.randn(300, 40, generator=g)
    dv = _sddmm(emu, m.rowptr, m.col, m.slot, a, b, m.capacity)
    ref = reference.native_sddmm(m.rowptr, m.col, m.slot, a.double(), b.double(), m.capacity, 1)
    bound = reference.native_sddmm(m.rowptr, m.col, m.slot, a.double().abs(), b.double().abs(), m.capacity, 1)
    _check(dv, ref, bound, torch.float32)


def test_launch_shapes(emu):
    out = (ctypes.c_int64 * 4)()
    emu.emu_shape(0, DTYPES[torch.float32], 1000, 256, 1, out)
    assert list(out) == [32, 4, 250, 2]          # 4 rows per block, 2 tiles of 128 columns
    emu.emu_shape(0, DTYPES[torch.float16], 1000, 256, 1, out)
    assert list(out) == [32, 8, 250, 1]
    emu.emu_shape(0, DTYPES[torch.float32], 1000, 257, 1, out)
    assert list(out)[:2] == [32, 1]               # N not a multiple of the vector: scalar loads
    emu.emu_shape(0, DTYPES[torch.float32], 1000, 16, 1, out)
    assert list(out) == [4, 4, 32, 1]             # 32 rows per block
    emu.emu_shape(1, DTYPES[torch.float32], 1000, 256, 1, out)
    assert list(out) == [32, 4, 63, 1]            # 4 subwarps x 4 entries per block
