"""Hostile and awkward inputs to the layers (issue 17): a clear error or the right answer, never a
crash or a silent difference. Cases that used to crash the process run in a subprocess, so a
SIGSEGV fails the test instead of killing pytest."""
import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from sparsestart import ops
from sparsestart.formats import CSR
from sparsestart.nn import SparseConv2d, SparseLinear

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INDEX = ("rowptr", "col", "slot", "colptr", "row", "slot_t")


def run_isolated(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


# ------------------------------------------------- 1. partial state_dict (strict=False)

@pytest.mark.parametrize("name,action", [("col", "forward"), ("slot", "forward"), ("row", "backward"),
                                         ("slot_t", "backward")])
def test_partial_state_dict_with_out_of_range_index_is_refused_not_a_crash(name, action):
    # Before the fix the load succeeded and the forward/backward read out of bounds (SIGSEGV).
    r = run_isolated(f"""
        import torch
        from sparsestart.nn import SparseLinear
        l = SparseLinear(64, 32, density=0.2, seed=0)
        before = {{k: v.clone() for k, v in l.state_dict().items()}}
        try:
            l.load_state_dict({{"{name}": torch.full_like(l.{name}, 10**7)}}, strict=False)
        except RuntimeError as exc:
            assert "the sparse structure after loading" in str(exc) and "{name}" in str(exc), str(exc)
            assert all(torch.equal(before[k], v) for k, v in l.state_dict().items())
            print("REFUSED")
        x = torch.randn(8, 64, requires_grad=True)
        y = l(x)
        if "{action}" == "backward":
            y.sum().backward()
        print("DONE")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "REFUSED" in r.stdout and "DONE" in r.stdout


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_partial_state_dict_inconsistent_rowptr_is_refused(fmt):
    # Before: loaded, and the forward silently returned other numbers.
    kw = dict(format="bsr", block_size=4) if fmt == "bsr" else {}
    layer = SparseLinear(64, 32, density=0.2, seed=0, **kw)
    x = torch.randn(8, 64)
    y0 = layer(x).detach()
    before = snapshot(layer)
    rp = layer.rowptr.clone()
    rp[1] = int(rp[-1])
    with pytest.raises(RuntimeError, match="the sparse structure after loading .*is invalid"):
        layer.load_state_dict({"rowptr": rp}, strict=False)
    assert_unchanged(layer, before)
    assert torch.equal(layer(x).detach(), y0)


def test_state_dict_missing_one_index_key_with_other_structure_is_refused():
    # Before: slot_t kept from the old structure while the rest was replaced; the input gradient was off.
    src = SparseLinear(16, 8, density=0.3, seed=0)
    dst = SparseLinear(16, 8, density=0.3, seed=1)
    before = snapshot(dst)
    sd = src.state_dict()
    del sd["slot_t"]
    with pytest.raises(RuntimeError, match="the sparse structure after loading"):
        dst.load_state_dict(sd, strict=False)
    assert_unchanged(dst, before)


def test_partial_state_dict_mixing_index_dtypes_is_refused():
    layer = SparseLinear(16, 8, density=0.3, seed=0)
    assert layer.col.dtype == torch.int32
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="dtype"):
        layer.load_state_dict({"col": layer.col.long()}, strict=False)
    assert_unchanged(layer, before)


def test_partial_state_dict_with_a_non_tensor_is_refused():
    layer = SparseLinear(16, 8, density=0.3, seed=0)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="col"):
        layer.load_state_dict({"col": [1, 2, 3]}, strict=False)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("assign", [False, True])
def test_valid_partial_state_dicts_still_load(assign):
    # A consistent subset (here: the same index, or values alone) loads as before.
    src = SparseLinear(16, 8, density=0.3, seed=0)
    dst = SparseLinear(16, 8, density=0.3, seed=0)
    with torch.no_grad():
        src.values.mul_(2)
    sd = src.state_dict()
    res = dst.load_state_dict({k: sd[k] for k in ("values", "col", "slot")}, strict=False, assign=assign)
    assert set(res.missing_keys) == {"bias", "rowptr", "colptr", "row", "slot_t"}
    assert torch.equal(dst.values.detach(), src.values.detach())
    dst.validate()
    x = torch.randn(4, 16)
    assert torch.allclose(dst(x) - dst.bias, src(x) - src.bias)


def test_partial_conv_state_dict_is_validated():
    layer = SparseConv2d(3, 4, 3, density=0.3, seed=0)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="col must lie in"):
        layer.load_state_dict({"col": torch.full_like(layer.col, 10**6)}, strict=False)
    assert_unchanged(layer, before)


def test_full_state_dict_still_validated():
    layer = SparseLinear(64, 32, density=0.2, seed=1)
    sd = SparseLinear(64, 32, density=0.2, seed=0).state_dict()
    sd["col"][3] = 10**6
    with pytest.raises(RuntimeError, match="col must lie in"):
        layer.load_state_dict(sd)


# ------------------------------------------- 2. another capacity keeps the Parameter

@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("capacity_delta", [20, -15])
def test_load_with_other_capacity_keeps_the_values_parameter(fmt, capacity_delta):
    # Before: values was replaced by a new Parameter; an optimizer built before kept the old tensor
    # and opt.step() left the layer unchanged.
    kw = dict(format="bsr", block_size=2) if fmt == "bsr" else {}
    nnz = SparseLinear(16, 8, density=0.3, seed=0, **kw).sparse_weight.nnz
    src = SparseLinear(16, 8, density=0.3, seed=0, capacity=nnz + 20 + capacity_delta, **kw)
    dst = SparseLinear(16, 8, density=0.3, seed=1, capacity=nnz + 20, **kw)
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    values = dst.values
    dst.load_state_dict(src.state_dict())
    assert dst.values is values and dst.values.requires_grad
    assert dst.values.shape == src.values.shape
    dst.validate()
    assert torch.equal(dst.dense_weight(), src.dense_weight())
    before = dst.dense_weight().detach().clone()
    dst(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert not torch.equal(dst.dense_weight().detach(), before), "the optimizer did not update the layer"


def test_checkpoint_order_model_then_optimizer_state_works_across_capacities():
    # The usual restore: build model + optimizer, load both state dicts, keep training.
    src = SparseLinear(16, 8, density=0.3, seed=0, capacity=60)
    opt_src = torch.optim.Adam(src.parameters(), lr=0.01)
    src(torch.randn(4, 16)).sum().backward()
    opt_src.step()
    dst = SparseLinear(16, 8, density=0.3, seed=1)
    opt = torch.optim.Adam(dst.parameters(), lr=0.01)
    dst.load_state_dict(src.state_dict())
    opt.load_state_dict(copy.deepcopy(opt_src.state_dict()))  # as from a file: shares no tensor
    x = torch.randn(4, 16)
    for m, o in ((src, opt_src), (dst, opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert torch.equal(dst.values.detach(), src.values.detach())


# ----------------------------------------------------------- 3. negative padding

@pytest.mark.parametrize("padding", [-1, (0, -2), (-1, 1)])
def test_conv_negative_padding_refused_at_construction(padding):
    # Before: accepted; "auto"/"unfold" then cropped the input, "direct"/"dense" raised.
    with pytest.raises(ValueError, match=r"padding must be non-negative.*got " + str(padding).replace("(", r"\(")
                       .replace(")", r"\)")):
        SparseConv2d(3, 4, 3, padding=padding, density=0.5)


# ------------------------------------------------------ 4. numbers and the meta device

def test_non_integral_capacity_is_refused():
    # Before: capacity=100.5 was truncated to 100.
    with pytest.raises(TypeError, match=r"capacity must be an int.*100\.5"):
        SparseLinear(16, 8, density=0.5, capacity=100.5)
    with pytest.raises(TypeError, match="capacity must be an int"):
        SparseConv2d(3, 4, 3, density=0.5, capacity=100.0)
    with pytest.raises(TypeError, match="capacity must be an int"):
        SparseLinear.from_dense(nn.Linear(16, 8), density=0.5, capacity=100.5)
    with pytest.raises(TypeError, match="capacity must be an int"):
        CSR.from_indices([0, 1], [0, 1], (2, 2), capacity=2.5)
    with pytest.raises(TypeError, match="capacity must be an int"):
        CSR.from_indices([0, 1], [0, 1], (2, 2), capacity=True)


@pytest.mark.parametrize("capacity", [100, np.int64(100), torch.tensor(100)])
def test_integral_capacity_types_are_accepted(capacity):
    assert SparseLinear(16, 8, density=0.5, capacity=capacity).sparse_weight.capacity == 100


@pytest.mark.parametrize("density", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5,
                                     dtype=torch.float64), np.int64(1), torch.tensor(1)],
                         ids=["np.float32", "np.float64", "tensor32", "tensor64", "np.int64", "int-tensor"])
def test_real_number_densities_are_accepted(density):
    # Before: np.float32 and 0-d tensors were refused as "not a number".
    ref = SparseLinear(16, 8, density=float(density), seed=0)
    layer = SparseLinear(16, 8, density=density, seed=0)
    assert torch.equal(layer.mask(), ref.mask())
    conv = SparseConv2d(3, 4, 3, density=density, seed=0)
    assert torch.equal(conv.mask(), SparseConv2d(3, 4, 3, density=float(density), seed=0).mask())
    dense = nn.Linear(16, 8)
    assert torch.equal(SparseLinear.from_dense(dense, density=density, seed=0).mask(),
                       SparseLinear.from_dense(dense, density=float(density), seed=0).mask())


@pytest.mark.parametrize("density", ["0.5", True, torch.tensor([0.5]), torch.tensor(True), 0.5 + 0j,
                                     np.array([0.5])])
def test_non_real_densities_are_refused(density):
    with pytest.raises(TypeError, match="density must be a real number"):
        SparseLinear(16, 8, density=density)


@pytest.mark.parametrize("density", [np.float32(0), torch.tensor(1.5), np.float64("nan")])
def test_out_of_range_numpy_and_tensor_densities_are_refused(density):
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        SparseLinear(16, 8, density=density)


def test_meta_device_construction_is_refused_clearly():
    # Before: RuntimeError "Tensor.item() cannot be called on meta tensors" from inside the sampling.
    with pytest.raises(NotImplementedError, match="meta device"):
        SparseLinear(16, 8, density=0.3, device="meta")
    with pytest.raises(NotImplementedError, match="meta device"):
        SparseConv2d(3, 4, 3, density=0.3, device=torch.device("meta"))
    with pytest.raises(NotImplementedError, match="meta device"):
        with torch.device("meta"):
            SparseLinear(16, 8, density=0.3)
    with pytest.raises(NotImplementedError, match="meta device"):
        SparseLinear.from_dense(nn.Linear(16, 8, device="meta"), density=0.3)


@pytest.mark.parametrize("density", [np.float32(0.5), torch.tensor(0.5)], ids=["np.float32", "tensor"])
def test_sparsify_accepts_real_number_densities(density):
    import sparsestart

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    ref = sparsestart.sparsify(model(), density=0.5, seed=0)
    got = sparsestart.sparsify(model(), density=density, seed=0)
    assert all(torch.equal(a.mask(), b.mask()) for a, b in ((ref[0], got[0]), (ref[2], got[2])))
    got = sparsestart.sparsify(model(), density={"0": density, "2": np.float64(1)}, seed=0)
    assert got[0].density == 0.5 and got[2].density == 1.0
