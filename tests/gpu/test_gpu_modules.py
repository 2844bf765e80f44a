"""SparseLinear / SparseConv2d on a CUDA device, for every GPU backend, against the dense module
with the masked weight; a short training run; torch.compile with inductor.

Skipped without a CUDA device. ``SPARSESTART_GPU_TEST_DEVICE=cpu`` runs the file on the CPU (the
reference backend's module paths, a dry run of the test code on a machine without a GPU).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsestart
import sparsestart.ops.gpu as gpu
from sparsestart import ops
from sparsestart.nn import SparseConv2d, SparseLayer, SparseLinear
from tests.gpu.backends import BACKENDS, SKIP_WITHOUT_DEVICE, TEST_DEVICE, require
from tests.util import compare_with_dense, rel_err

pytestmark = pytest.mark.skipif(**SKIP_WITHOUT_DEVICE)

DEV = TEST_DEVICE
# (backend, format, block size) combinations the backend runs.
COMBOS = [("reference", "csr", None), ("reference", "bsr", 16)]
if "cuda" in BACKENDS:
    COMBOS += [("cuda", "csr", None)]
if "triton" in BACKENDS:
    COMBOS += [("triton", "csr", None), ("triton", "bsr", 16), ("triton", "bsr", 32), ("triton", "bsr", 64)]
IDS = [f"{b}-{f}{s or ''}" for b, f, s in COMBOS]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # The dense twin runs cuBLAS and cuDNN; keep both sides in IEEE fp32 (no TF32) for tight
    # comparisons. The matmul setting does not cover convolutions: cuDNN's allow_tf32 defaults
    # to True and must be switched off as well (review F1).
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend,fmt,b", COMBOS, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_sparse_linear_matches_dense(backend, fmt, b, dtype, tol):
    require(backend)
    if dtype == torch.bfloat16 and DEV == "cuda" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0")
    layer = SparseLinear(192, 128, density=0.3, format=fmt, block_size=b, seed=1, device=DEV, dtype=dtype,
                         capacity=None)
    layer.validate()
    with ops.use_backend(backend):
        compare_with_dense(layer, torch.randn(4, 5, 192, device=DEV, dtype=dtype), tol, device_type=DEV)


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=1, padding=0),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
]


@pytest.mark.parametrize("backend,fmt,b", COMBOS, ids=IDS)
@pytest.mark.parametrize("cfg", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("algorithm", ["unfold", "direct"])
def test_sparse_conv_matches_dense(backend, fmt, b, cfg, algorithm):
    require(backend)
    if algorithm == "direct" and (fmt != "csr" or cfg["stride"] != 1):
        pytest.skip("the direct convolution runs stride-1 CSR layers")
    cin = b or 8  # K = cin * kh * kw is then a multiple of the block size
    layer = SparseConv2d(cin, 64, density=0.4, format=fmt, block_size=b, seed=2, device=DEV, **cfg)
    # Forced: "auto" picks the dense algorithm (plain cuDNN) for some of these layers (review F7).
    layer.conv_algorithm = algorithm
    with ops.use_backend(backend):
        compare_with_dense(layer, torch.randn(2, cin, 11, 9, device=DEV), 1e-5, device_type=DEV)


@pytest.mark.parametrize("fmt,b", [("csr", None), ("bsr", 16)])
def test_training_matches_masked_dense(fmt, b):
    """A few SGD steps on the default GPU backends equal the masked dense model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 16)).to(DEV)
    sparse = sparsestart.sparsify(model, 0.3, format=fmt, block_size=b, seed=1)
    dense = sparsestart.densify(copy.deepcopy(sparse))
    masks = {n: m.mask() for n, m in sparse.named_modules() if isinstance(m, SparseLayer)}
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cpu").manual_seed(2)
    for _ in range(20):
        x = torch.randn(32, 64, generator=g).to(DEV)
        y = torch.randint(0, 16, (32,), generator=g).to(DEV)
        for model_, opt in ((sparse, opt_s), (dense, opt_d)):
            loss = nn.functional.cross_entropy(model_(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            for name, mask in masks.items():
                dense.get_submodule(name).weight.mul_(mask)
    for name in masks:
        s, d = sparse.get_submodule(name), dense.get_submodule(name)
        assert rel_err(s.dense_weight().detach(), d.weight.detach()) < 1e-4


@pytest.mark.skipif(not gpu.triton_available(), reason="torch.compile with inductor needs triton")
@pytest.mark.parametrize("fmt,b", [("csr", None), ("bsr", 16)])
def test_torch_compile_inductor(fmt, b):
    layer = SparseLinear(128, 64, density=0.3, format=fmt, block_size=b, seed=3, device=DEV)
    model = nn.Sequential(layer, nn.GELU())
    x = torch.randn(8, 128, device=DEV, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    ref = nn.Sequential(layer.to_dense(), nn.GELU())
    x2 = x.detach().clone().requires_grad_()
    y2 = ref(x2)
    y2.sum().backward()
    assert rel_err(y, y2) < 1e-5 and rel_err(x.grad, x2.grad) < 1e-5
