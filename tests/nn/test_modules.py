"""SparseLinear / SparseConv2d against the dense torch module with the masked weight."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart import ops
from sparsestart.nn import SparseConv2d, SparseLinear
from tests.util import compare_with_dense

BACKENDS = [b for b in ("reference", "cpu") if b == "reference" or ops.NATIVE_AVAILABLE]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt,b", [("csr", None), ("bsr", 4)])
def test_sparse_linear_matches_dense(backend, bias, fmt, b):
    torch.manual_seed(0)
    layer = SparseLinear(36, 20, bias=bias, density=0.3, format=fmt, block_size=b, seed=1)
    layer.validate()
    with ops.use_backend(backend):
        compare_with_dense(layer, torch.randn(3, 5, 36))  # extra leading dims
        compare_with_dense(layer, torch.randn(36))        # unbatched


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=0),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(kernel_size=1, stride=1, padding=0),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_sparse_conv_matches_dense(backend, bias, cfg):
    layer = SparseConv2d(3, 5, bias=bias, density=0.4, seed=2, **cfg)
    layer.validate()
    with ops.use_backend(backend):
        compare_with_dense(layer, torch.randn(2, 3, 9, 8))
        compare_with_dense(layer, torch.randn(3, 7, 7))  # unbatched


@pytest.mark.parametrize("algorithm", ["unfold", "dense", "direct", "heuristic"])
@pytest.mark.parametrize("cfg", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_every_conv_algorithm_matches_dense(algorithm, cfg):
    layer = SparseConv2d(3, 5, density=0.4, seed=2, **cfg)
    layer.conv_algorithm = algorithm
    x = torch.randn(2, 3, 9, 8)
    if algorithm == "direct" and layer.stride != (1, 1):
        with pytest.raises(ValueError, match="conv_algorithm='direct' needs stride 1"):
            layer(x)
        return
    compare_with_dense(layer, x)
    compare_with_dense(layer, torch.randn(3, 7, 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_kind,algorithm", [("conv", "direct"), ("conv", "unfold"), ("conv", "dense"),
                                                  ("linear", "sparse"), ("linear", "dense")])
@pytest.mark.parametrize("batch,bias", [(1, True), (2, False)])
def test_an_in_place_activation_may_follow_every_layer_path(backend, layer_kind, algorithm, batch, bias):
    # A layer's output must not be a view created inside the op's autograd Function: autograd forbids
    # modifying such a view in place, and nn.ReLU(inplace=True) after the layer raised on the
    # reference backend's direct convolution (what the CUDA and Triton backends run too).
    if layer_kind == "conv":
        layer = SparseConv2d(3, 5, 3, padding=1, bias=bias, density=0.5, seed=4)
        layer.conv_algorithm = algorithm
        x = torch.randn(batch, 3, 6, 7)
    else:
        layer = SparseLinear(7, 5, bias=bias, density=0.5, seed=4)
        layer.linear_algorithm = algorithm
        x = torch.randn(batch, 7)
    dense = layer.to_dense()
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    with ops.use_backend(backend):
        x1 = x.clone().requires_grad_()
        y = model(x1)
        y.square().sum().backward()
    twin = nn.Sequential(dense, nn.ReLU())
    x2 = x.clone().requires_grad_()
    want = twin(x2)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ["sparse", "dense"])
@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 7), (7,)], ids=["2d", "3d", "1d"])
def test_linear_output_is_no_view_so_in_place_ops_stay_cheap(backend, algorithm, shape):
    # The sparse product is feature-major; its output [*lead, out] is the transposed memory. As a
    # view, an in-place op on it (nn.ReLU(inplace=True)) made autograd clone and stride the whole
    # gradient in backward (an MLP step 1.7x slower): it must be a tensor of its own, in every input
    # shape, with outputs and gradients (double backward of the product included) as the dense twin's.
    layer = SparseLinear(7, 5, density=0.5, seed=4, dtype=torch.float64)
    layer.linear_algorithm = algorithm
    dense = layer.to_dense()
    x = torch.randn(*shape, dtype=torch.float64)
    with ops.use_backend(backend):
        x1 = x.clone().requires_grad_()
        y = layer(x1)
        assert y.shape == (*shape[:-1], 5)
        # (The dense path is F.linear's, which returns a view for other ranks as nn.Linear does.)
        assert y._base is None or (algorithm == "dense" and len(shape) != 2)
        torch.relu_(y)
        y.square().sum().backward()
        if algorithm == "sparse":
            torch.autograd.gradcheck(lambda t: torch.relu_(layer(t)).square(), (x.clone().requires_grad_(),))
    x2 = x.clone().requires_grad_()
    want = torch.relu(dense(x2))
    want.square().sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.values.grad[layer.sparse_weight.slot[:layer.nnz].long()],
                               dense.weight.grad[layer.mask()])


@pytest.mark.parametrize("mode", ["heuristic", "auto-untuned"])
def test_heuristic_conv_algorithm_follows_density_fan_in_and_plane_size(mode, monkeypatch):
    """The threshold rule: conv_algorithm="heuristic", and "auto" while tuning is off."""
    from sparsestart.nn import autotune

    monkeypatch.setattr(autotune, "_enabled", False)

    def chosen(layer, hw):
        layer.conv_algorithm = "heuristic" if mode == "heuristic" else "auto"
        x = torch.randn(1, layer.in_channels, hw, hw)
        return layer._algorithm(x, layer._explicit_padding())

    nearly_dense = SparseConv2d(64, 8, 3, padding=1, density=0.5, seed=0)
    assert chosen(nearly_dense, 16) == "dense"
    assert chosen(SparseConv2d(64, 8, 3, padding=1, density=0.1, seed=0), 16) == "direct"
    assert chosen(SparseConv2d(64, 8, 3, padding=1, density=0.1, seed=0), 2) == "unfold"  # 2 x 4 plane
    assert chosen(SparseConv2d(64, 8, 3, padding=1, density=0.01, seed=0), 2) == "direct"  # too sparse to unfold
    assert chosen(SparseConv2d(64, 8, 3, stride=2, padding=1, density=0.1, seed=0), 16) == "unfold"
    assert chosen(SparseConv2d(3, 8, 3, padding=1, density=1.0, seed=0), 16) == "direct"  # fan-in 27
    assert chosen(SparseConv2d(64, 8, 2, density=0.1, format="bsr", block_size=8, seed=0), 16) == "unfold"
    # The dense path gives gradients to the stored values only, like the others.
    x = torch.randn(2, 64, 6, 6)
    nearly_dense(x).square().sum().backward()
    g_dense = nearly_dense.values.grad.clone()
    nearly_dense.values.grad = None
    nearly_dense.conv_algorithm = "direct"
    nearly_dense(x).square().sum().backward()
    torch.testing.assert_close(g_dense, nearly_dense.values.grad, rtol=1e-4, atol=1e-4)
    nearly_dense.conv_algorithm = "fast"
    with pytest.raises(ValueError, match=r"conv_algorithm must be one of \('auto', 'heuristic', 'direct', 'unfold', "
                                         r"'dense'\), got 'fast'"):
        nearly_dense(x)


@pytest.mark.parametrize("algorithm", ["sparse", "dense", "heuristic"])
@pytest.mark.parametrize("fmt,b,density", [("csr", None, 0.3), ("csr", None, 1.0), ("bsr", 4, 0.5)])
def test_every_linear_algorithm_matches_dense(algorithm, fmt, b, density):
    layer = SparseLinear(36, 20, density=density, format=fmt, block_size=b, seed=1)
    layer.linear_algorithm = algorithm
    compare_with_dense(layer, torch.randn(3, 5, 36))
    compare_with_dense(layer, torch.randn(36))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dense path autocasts as nn.Linear does
        assert layer(torch.randn(4, 36)).dtype == torch.bfloat16


def test_sparse_conv_bsr():
    layer = SparseConv2d(4, 8, 2, density=0.5, format="bsr", block_size=4, seed=0)  # K = 4*2*2 = 16
    assert layer.block_size == 4 and layer.values.shape[1:] == (4, 4)
    compare_with_dense(layer, torch.randn(2, 4, 6, 6))


def test_from_dense_keeps_weights_and_bias():
    lin = nn.Linear(10, 6)
    mask = torch.rand(6, 10) < 0.5
    s = SparseLinear.from_dense(lin, mask)
    assert torch.equal(s.mask(), mask)
    assert torch.equal(s.dense_weight(), lin.weight.detach() * mask)
    assert torch.equal(s.bias, lin.bias)
    s2 = SparseLinear.from_dense(lin, density=0.2, seed=3)
    assert s2.nnz == 12 and torch.equal(s2.dense_weight()[s2.mask()], lin.weight.detach()[s2.mask()])
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    c = SparseConv2d.from_dense(conv, density=0.25, seed=0)
    assert c.bias is None and c.nnz == 27 and c.mask().shape == conv.weight.shape
    compare_with_dense(c, torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        SparseLinear.from_dense(conv)
    with pytest.raises(ValueError, match="either mask or density"):
        SparseLinear.from_dense(lin, mask, density=0.5)


def test_init_matches_torch_default_and_kept_fan_in():
    layer = SparseLinear(400, 300, density=0.1, seed=0)
    live = layer.values.detach()
    bound = 1 / 400**0.5
    assert bool((live.abs() <= bound).all())
    assert live.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert bool((layer.bias.abs() <= bound).all())
    kept = SparseLinear(400, 300, density=0.1, seed=0, init_fan_in="kept")
    # Each output unit keeps ~40 inputs: values scale like 1/sqrt(40).
    assert kept.values.std().item() == pytest.approx(1 / (40**0.5 * 3**0.5), rel=0.1)
    with pytest.raises(ValueError, match="init_fan_in"):
        SparseLinear(4, 3, density=0.5, init_fan_in="x")


def test_exact_density_and_seed_reproducibility():
    a = SparseLinear(50, 40, density=0.1, seed=7)
    b = SparseLinear(50, 40, density=0.1, seed=7)
    c = SparseLinear(50, 40, density=0.1, seed=8)
    assert a.nnz == 200 and a.density == pytest.approx(0.1)
    assert torch.equal(a.mask(), b.mask()) and torch.equal(a.values, b.values)
    assert not torch.equal(a.mask(), c.mask())
    d = SparseLinear(50, 40, density=0.1, seed=7, exact=False)
    assert 100 < d.nnz < 300


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density must lie in"):
        SparseLinear(4, 3, density=bad)


def test_bad_arguments():
    with pytest.raises(TypeError, match="density must be a real number"):
        SparseLinear(4, 3, density="0.5")
    with pytest.raises(NotImplementedError, match="groups=1"):
        SparseConv2d(4, 4, 3, groups=2, density=0.5)
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        SparseLinear(6, 8, density=0.5, format="bsr", block_size=4)
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(6, 8, density=0.5, format="coo")
    with pytest.raises(ValueError, match="needs a block_size"):
        SparseLinear(8, 8, density=0.5, format="bsr")
    layer = SparseLinear(6, 4, density=0.5)
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 6, dtype=torch.float64))


def test_parameters_buffers_and_repr():
    layer = SparseLinear(8, 4, density=0.5)
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]
    assert {n for n, _ in layer.named_buffers()} == {"rowptr", "col", "slot", "colptr", "row", "slot_t"}
    r = repr(layer)
    assert "nnz=16" in r and "density=0.5" in r and "format=csr" in r
    conv = SparseConv2d(3, 4, 3, stride=2, padding=1, density=0.5)
    assert "stride=(2, 2)" in repr(conv) and "nnz=54" in repr(conv)


def test_state_dict_round_trip_into_other_seed_and_capacity():
    src = SparseLinear(20, 10, density=0.3, seed=1)
    dst = SparseLinear(20, 10, density=0.3, seed=2)
    assert not torch.equal(src.mask(), dst.mask())
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(dst(x), src(x)) and torch.equal(dst.mask(), src.mask())
    other = SparseLinear(20, 10, density=0.7, seed=3)  # different capacity: adopted
    other.load_state_dict(src.state_dict())
    assert torch.equal(other(x), src(x))
    other.validate()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = SparseLinear(20, 10, density=0.1, seed=9)
    loaded.load_state_dict(torch.load(buf))
    assert torch.equal(loaded(x), src(x))


def test_loading_a_corrupt_structure_fails_and_changes_nothing():
    src = SparseLinear(20, 10, density=0.3, seed=1)
    dst = SparseLinear(20, 10, density=0.3, seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    sd = src.state_dict()
    sd["col"] = sd["col"].clone()
    sd["col"][0] = 25  # out of range
    with pytest.raises(RuntimeError, match="invalid"):
        dst.load_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    bsr = SparseLinear(8, 8, density=0.5, format="bsr", block_size=4)
    with pytest.raises(RuntimeError, match="does not match this layer's format"):
        SparseLinear(8, 8, density=0.5).load_state_dict(bsr.state_dict())


def test_deepcopy_and_pickle():
    for layer in (SparseLinear(12, 7, density=0.4), SparseConv2d(2, 3, 3, padding=1, density=0.4)):
        x = torch.randn(2, 12) if isinstance(layer, SparseLinear) else torch.randn(2, 2, 5, 5)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert torch.equal(clone(x), layer(x))
            clone.values.data.mul_(2)  # independent storage
            assert not torch.equal(clone(x), layer(x))


def test_structure_update_through_sparse_weight_is_seen_by_layer():
    layer = SparseLinear(10, 8, density=0.5, seed=0)
    x = torch.randn(3, 10)
    layer.sparse_weight.drop(torch.arange(5))
    layer.validate()
    assert layer.nnz == 35
    assert torch.allclose(layer(x), layer.to_dense()(x), atol=1e-6)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    layer = SparseLinear(16, 8, density=0.3, seed=0)
    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    gx, gv, gb = x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone()
    x.grad = None
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gv, layer.values.grad)
    torch.testing.assert_close(gb, layer.bias.grad)


def test_sparsify_densify_summary():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10),
                          nn.ReLU(), nn.Linear(10, 2))
    x = torch.randn(2, 3, 4, 4)
    sparsestart.sparsify(model, 0.5, "uniform", seed=0, exclude=["5"])
    assert isinstance(model[0], SparseConv2d) and isinstance(model[3], SparseLinear)
    assert isinstance(model[5], nn.Linear) and not isinstance(model[5], SparseLinear)
    assert model[0].nnz == 108 and model[3].nnz == 640
    y = model(x)
    s = sparsestart.summary(model)
    assert [r["name"] for r in s.rows] == ["0", "3", "5"]
    assert s.rows[0]["nnz"] == 108 and s.rows[2]["density"] == 1.0
    assert s.total["nnz"] == 108 + 640 + 20
    # int32 index: col, slot, row, slot_t (4 bytes each per slot of capacity) and the row and column
    # pointers; a 4-byte value per slot
    for r, m in ((s.rows[0], model[0]), (s.rows[1], model[3])):
        rows, cols = m.matrix_shape
        index = 16 * m.sparse_weight.capacity + 4 * (rows + 1 + cols + 1)
        assert r["index_bytes"] == index and r["index_bytes_per_nnz"] == index / r["nnz"]
        assert r["weight_bytes_per_nnz"] == (index + 4 * m.sparse_weight.capacity) / r["nnz"]
    assert s.rows[2]["weight_bytes_per_nnz"] == 4.0 and s.rows[2]["index_bytes_per_nnz"] == 0.0
    assert "total" in str(s) and "B/nnz" in str(s)
    dense = sparsestart.densify(model)
    assert not any(isinstance(m, sparsestart.nn.SparseLayer) for m in dense.modules())
    torch.testing.assert_close(dense(x), y)


def test_sparsify_exclude_glob_dict_and_errors():
    def make():
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))

    m = sparsestart.sparsify(make(), 0.5, "uniform", exclude="0.*")
    assert [type(x).__name__ for x in (m[0][0], m[0][1], m[1])] == ["Linear", "Linear", "SparseLinear"]
    m = sparsestart.sparsify(make(), {"0.0": 0.25, "0.1": 1.0, "1": 0.5})
    assert m[0][0].nnz == 4 and m[0][1].nnz == 16 and m[1].nnz == 4
    with pytest.raises(ValueError, match="missing"):
        sparsestart.sparsify(make(), {"0.0": 0.25})
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        sparsestart.sparsify(nn.ReLU(), 0.5)
    with pytest.raises(ValueError, match="density must lie in"):
        sparsestart.sparsify(make(), 1.5)
    with pytest.raises(NotImplementedError, match="exclude"):
        sparsestart.sparsify(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), 0.5)
    a = sparsestart.sparsify(make(), 0.5, seed=3)
    b = sparsestart.sparsify(make(), 0.5, seed=3)
    assert all(torch.equal(p.mask(), q.mask()) for p, q in zip(
        [a[0][0], a[0][1], a[1]], [b[0][0], b[0][1], b[1]]))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_set_capacity_keeps_entries_and_values(fmt):
    kw = dict(format=fmt, block_size=2) if fmt == "bsr" else {}
    layer = SparseLinear(8, 6, density=0.5, seed=0, **kw)
    before_mask, before_weight = layer.mask().clone(), layer.dense_weight().detach().clone()
    nnz = layer.sparse_weight.nnz
    layer.set_capacity(nnz + 5)
    assert layer.sparse_weight.capacity == nnz + 5 and layer.values.requires_grad
    layer.sparse_weight.validate()
    assert torch.equal(layer.mask(), before_mask)
    assert torch.equal(layer.dense_weight().detach(), before_weight)
    free = layer.sparse_weight.slot[nnz:].long()
    assert bool((layer.values.detach()[free] == 0).all())
    with pytest.raises(ValueError, match=r"capacity must be an int >= the layer's stored entries"):
        layer.set_capacity(nnz - 1)
    with pytest.raises(ValueError, match="capacity"):
        layer.set_capacity(float(nnz + 1))


def test_conv_algorithm_choice_reads_the_density_once_per_structure_version(monkeypatch):
    """The "auto" choice runs every forward; reading nnz (rowptr[-1]) would be a host
    synchronisation per layer and call on a GPU, so it is read once per structure version."""
    from sparsestart.nn import SparseConv2d
    from sparsestart.nn import modules as modules_mod

    layer = SparseConv2d(8, 16, 3, padding=1, density=0.3, seed=0)
    reads = []
    real = modules_mod.SparseLayer.density.fget
    monkeypatch.setattr(modules_mod.SparseLayer, "density", property(lambda self: reads.append(1) or real(self)))
    x = torch.randn(2, 8, 6, 6)
    layer(x)
    layer(x)
    assert len(reads) == 1
    with torch.no_grad():
        layer.rowptr.add_(0)  # any in-place write to the index, as structure updates do, bumps its version
    layer(x)
    assert len(reads) == 2
