"""Model zoo: shapes, parameter counts, backward, registry, argument errors, layer order."""
import pytest
import torch
from torch import nn

import sparsestart.models as M

# Builders taking (in_channels, num_classes, input_size); mlp is handled separately.
IMAGE_MODELS = [n for n in M.names() if n != "mlp"]
INPUTS = [(1, 28), (3, 32)]  # (channels, side)


def _build(name, channels, side, num_classes=10):
    if name == "mlp":
        return M.get("mlp", sizes=[channels * side * side, 32, 16, num_classes])
    return M.get(name, in_channels=channels, num_classes=num_classes, input_size=side)


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_names_sorted_and_complete():
    expected = {"mlp", "lenet5", "convnet_small", "vgg11", "vgg13", "vgg16", "vgg19",
                "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18"}
    assert set(M.names()) == expected
    assert M.names() == sorted(M.names())
    for n in expected:
        assert callable(getattr(M, n))


@pytest.mark.parametrize("channels,side", INPUTS)
@pytest.mark.parametrize("name", ["mlp"] + IMAGE_MODELS)
def test_forward_backward_shapes(name, channels, side):
    model = _build(name, channels, side, num_classes=7)
    x = torch.randn(2, channels, side, side)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["mlp"] + IMAGE_MODELS)
def test_layer_registration_order_equals_execution_order(name):
    model = _build(name, 3, 32)
    registered = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    executed = []
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: executed.append(n))
               for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert executed == registered
    # First masked layer reads the input; the classifier is the last Linear.
    first, last = dict(model.named_modules())[registered[0]], dict(model.named_modules())[registered[-1]]
    assert (first.in_features if isinstance(first, nn.Linear) else first.in_channels) in (3, 3 * 32 * 32)
    assert isinstance(last, nn.Linear) and last.out_features == 10


@pytest.mark.parametrize("name,low,high", [
    ("resnet20", 0.26e6, 0.28e6),
    ("resnet18", 11.1e6, 11.3e6),
    ("vgg16", 14.6e6, 14.8e6),
])
def test_parameter_counts(name, low, high):
    assert low <= _nparams(M.get(name)) <= high


def test_exact_layer_sizes():
    assert M.convnet_small().classifier.fc1.in_features == 3136
    assert M.convnet_small(input_size=32).classifier.fc1.in_features == 64 * 8 * 8
    assert M.lenet5().classifier.fc1.in_features == 16 * 4 * 4
    assert M.lenet5(in_channels=3, input_size=32).classifier.fc1.in_features == 16 * 5 * 5
    m = M.mlp([784, 300, 100, 10])
    assert [l.out_features for l in m.modules() if isinstance(l, nn.Linear)] == [300, 100, 10]
    assert _nparams(m) == 266610
    assert _nparams(M.mlp([784, 300, 100, 10], bias=False)) == 784 * 300 + 300 * 100 + 100 * 10
    assert isinstance(M.mlp([4, 8, 2], activation="tanh").act1, nn.Tanh)


def test_resnet_structure():
    m = M.resnet20()
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    # stem + 18 block convs + 2 projection shortcuts (16->32, 32->64)
    assert len(convs) == 21
    assert all(c.bias is None for c in convs)
    assert m.fc.bias is not None and m.fc.in_features == 64
    assert sum(1 for c in convs if c.kernel_size == (1, 1)) == 2
    assert M.resnet110().fc.in_features == 64
    assert sum(1 for mod in M.resnet56().modules() if isinstance(mod, nn.Conv2d)) == 1 + 54 + 2
    wide = M.resnet20(width=2)
    assert wide.fc.in_features == 128
    assert 3.8 < _nparams(wide) / _nparams(m) < 4.1
    r18 = M.resnet18(width=0.5)
    assert r18.fc.in_features == 256
    assert not any(isinstance(mod, nn.MaxPool2d) for mod in r18.modules())


def test_vgg_structure():
    for name, n_conv in [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)]:
        m = M.get(name)
        convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
        linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        assert len(convs) == n_conv and all(c.bias is None for c in convs)
        assert len(linears) == 1 and linears[0].in_features == 512
        assert sum(1 for mod in m.modules() if isinstance(mod, nn.MaxPool2d)) == 5
    assert M.vgg16(width=0.25).classifier.in_features == 128
    # Larger inputs work through the adaptive pool.
    assert M.vgg11(input_size=64)(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_get_is_case_insensitive_and_forwards_kwargs():
    assert isinstance(M.get("ResNet-20", num_classes=100), M.ResNet)
    assert M.get("VGG16", num_classes=100).classifier.out_features == 100
    assert isinstance(M.get("mlp", sizes=[10, 2]), M.MLP)


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        M.get("resnet21")
    msg = str(e.value)
    assert "resnet21" in msg
    for n in M.names():
        assert n in msg
    with pytest.raises(TypeError):
        M.get(20)


@pytest.mark.parametrize("call,needle", [
    (lambda: M.resnet20(num_classes=0), "num_classes=0"),
    (lambda: M.vgg16(num_classes=-3), "num_classes=-3"),
    (lambda: M.lenet5(in_channels=0), "in_channels=0"),
    (lambda: M.lenet5(input_size=12), "input_size=12"),
    (lambda: M.convnet_small(input_size=3), "input_size=3"),
    (lambda: M.resnet18(input_size=0), "input_size=0"),
    (lambda: M.vgg19(width=0), "width=0"),
    (lambda: M.resnet32(width=-1), "width=-1"),
    (lambda: M.get("lenet5", num_classes=0), "num_classes=0"),
    (lambda: M.mlp([784]), "sizes"),
    (lambda: M.mlp([784, 0, 10]), "sizes[1]=0"),
    (lambda: M.mlp([4, 2], activation="swishy"), "activation='swishy'"),
    (lambda: M.cifar_resnet(21), "depth=21"),
])
def test_invalid_arguments_raise_value_error(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


def test_invalid_argument_types():
    with pytest.raises(TypeError):
        M.resnet20(num_classes=2.5)
    with pytest.raises(TypeError):
        M.lenet5(input_size=True)
    with pytest.raises(TypeError):
        M.mlp("784,10")
    with pytest.raises(TypeError):
        M.resnet20(foo=1)


def test_mlp_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="784"):
        M.mlp([784, 10])(torch.randn(2, 3, 32, 32))


def test_minimum_input_sizes_work():
    assert M.lenet5(input_size=16)(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert M.convnet_small(input_size=4)(torch.randn(2, 1, 4, 4)).shape == (2, 10)
