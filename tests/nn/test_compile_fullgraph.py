"""torch.compile(fullgraph=True) of models made of sparse layers.

SparseConv2d's conv_algorithm="auto" chooses its algorithm from the layer's density, which
is read from the index (rowptr[-1]); traced, that read is a data-dependent value and the
choice a data-dependent branch, which fullgraph cannot compile. The choice must be made
from a value known outside the traced region, and the compiled model must compute what
the eager one does. Compiling on a CPU is slow: "aot_eager" (dynamo + AOTAutograd, the
stages that trace the layers) and dynamo's counting backend keep this file to seconds.
"""
import pytest
import torch
import torch._dynamo
from torch import nn

from sparsestart.nn import SparseConv2d, SparseLinear, autotune


@pytest.fixture(autouse=True)
def threshold_rule(monkeypatch):
    """These tests follow the threshold rule's choices ("auto" with tuning off) through compilation,
    whatever SPARSESTART_AUTOTUNE says; compiling with measured choices: tests/nn/test_autotune.py."""
    monkeypatch.setattr(autotune, "_enabled", False)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        SparseConv2d(8, 8, 3, padding=1, density=0.6, seed=0),     # fan-in 72, dense enough: "dense"
        nn.ReLU(),
        SparseConv2d(8, 8, 3, padding=1, density=0.1, seed=1),     # sparse, 6x6 planes: "direct"
        nn.ReLU(),
        SparseConv2d(8, 4, 3, stride=2, density=0.3, seed=2),      # strided: "unfold"
        nn.Flatten(),
        SparseLinear(4 * 2 * 2, 3, density=0.5, seed=3),
    )


def _auto_choices(model: nn.Sequential, x: torch.Tensor) -> list:
    """The algorithm each SparseConv2d chooses for the activations it gets in model(x)."""
    choices = []
    for layer in model:
        if isinstance(layer, SparseConv2d):
            choices.append(layer._algorithm(x, layer._explicit_padding()))
        x = layer(x)
    return choices


def test_compile_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 8, 6, 6)
    # the model covers every "auto" choice and SparseLinear, so every branch is traced
    assert _auto_choices(model, x) == ["dense", "direct", "unfold"]

    y_eager = model(x)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    for p, g in zip(model.parameters(), grads_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_compiled_choice_follows_a_loaded_structure_without_recompiling_per_call():
    """The compiled graph holds one algorithm; a new structure (here loaded, of another density
    but the same capacity, so no tensor shape changes) must reach it, and an unchanged one must
    not recompile on every call."""
    torch._dynamo.reset()
    capacity = 8 * 8 * 9
    layer = SparseConv2d(8, 8, 3, padding=1, density=0.6, capacity=capacity, seed=0)
    sparser = SparseConv2d(8, 8, 3, padding=1, density=0.05, capacity=capacity, seed=1)
    x = torch.randn(2, 8, 6, 6)
    pad = layer._explicit_padding()
    assert layer._algorithm(x, pad) == "dense" and sparser._algorithm(x, pad) == "direct"

    graphs = []  # the code of each graph dynamo compiles

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=recording_backend)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    compiled(x)
    assert len(graphs) == 1 and "conv2d" in graphs[0] and "sparsestart.conv2d" not in graphs[0]

    layer.load_state_dict(sparser.state_dict())
    expected = sparser(x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 2 and "sparsestart.conv2d" in graphs[1]  # recompiled once, for "direct"
    compiled(x)
    assert len(graphs) == 2


@pytest.mark.parametrize("stride, size", [(2, 8), (2, 6)])
def test_compiled_backward_through_batchnorm_after_an_unfolded_conv(stride, size):
    """The unfold algorithm's output is a batch-inner view; compiled, a BatchNorm2d after it traced output
    strides that its kernel did not produce, and the backward's view of the gradient failed ("view size is
    not compatible", ResNet-20 under torch.compile). Compiled forward and backward equal eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(8, 16, 3, stride=stride, padding=1, density=0.3, seed=0), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.Flatten(), SparseLinear(16 * (size // stride) ** 2, 3, density=0.5, seed=1))
    x = torch.randn(4, 8, size, size)
    assert model[0]._algorithm(x, model[0]._explicit_padding()) == "unfold"
    y_eager = model(x)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for p, g in zip(model.parameters(), grads_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_sparse_ops_and_computes_as_eager():
    """torch.export (deployment) of a model with both layers: the graph holds the sparse ops themselves
    (no dense weight materialised), and the exported program computes what the model does."""
    model = nn.Sequential(SparseConv2d(3, 8, 3, padding=1, density=0.3, seed=0), nn.ReLU(), nn.Flatten(),
                          SparseLinear(8 * 6 * 6, 4, density=0.3, seed=1)).eval()
    model[0].conv_algorithm = "direct"
    model[3].linear_algorithm = "sparse"
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"sparsestart.conv2d.default", "sparsestart.spmm.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-6, atol=1e-6)
        x2 = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(program.module()(x2), model(x2), rtol=1e-6, atol=1e-6)
