"""Reporting: FLOPs and bytes in sparsestart.summary; the ``sparsestart densities`` command."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

import sparsestart
from sparsestart.init import allocate_densities
from sparsestart.init import cli as dcli

from . import shapes


def _model():
    torch.manual_seed(0)
    # conv 3->8 (3x3, padding 1, stride 2) on 10x10 -> 5x5; conv 8->4 (1x1) -> 5x5; linear 100 -> 6 (dense, excluded)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                      nn.Flatten(), nn.Linear(100, 6))
    return sparsestart.sparsify(m, 0.3, "uniform", seed=0, exclude=["4"])


def test_summary_flops_need_input_size_for_convolutions():
    m = _model()
    rows = {r["name"]: r for r in sparsestart.summary(m).rows}
    assert rows["0"]["sparse_flops"] is None and rows["2"]["dense_flops"] is None
    assert rows["4"]["sparse_flops"] == rows["4"]["dense_flops"] == 600  # Linear: one position per sample
    assert sparsestart.summary(m).total["sparse_flops"] is None


def test_summary_flops_with_input_size():
    m = _model()
    m.train()
    s = sparsestart.summary(m, input_size=(3, 10, 10))
    assert m.training and all(mod.training for mod in m.modules())  # mode restored
    rows = {r["name"]: r for r in s.rows}
    assert rows["0"]["nnz"] == round(0.3 * 216)
    assert rows["0"]["sparse_flops"] == rows["0"]["nnz"] * 25 and rows["0"]["dense_flops"] == 216 * 25
    assert rows["2"]["sparse_flops"] == rows["2"]["nnz"] * 25 and rows["2"]["dense_flops"] == 32 * 25
    assert rows["4"]["sparse_flops"] == 600
    assert s.total["sparse_flops"] == sum(r["sparse_flops"] for r in s.rows)
    assert "sparse MACs" in str(s) and f"{s.total['dense_flops']:,}" in str(s)
    # Bytes: parameters (values at capacity + bias) and index add up to what the layer stores.
    layer = m[0]
    assert rows["0"]["param_bytes"] == layer.values.numel() * 4 + 8 * 4
    assert rows["0"]["param_bytes"] + rows["0"]["index_bytes"] == rows["0"]["sparse_bytes"]
    assert rows["4"]["param_bytes"] == (600 + 6) * 4 and rows["4"]["index_bytes"] == 0
    with pytest.raises(ValueError, match="input_size must be the per-sample input shape"):
        sparsestart.summary(m, input_size=(3, 0, 10))


def test_summary_linear_positions_follow_leading_dims():
    m = sparsestart.sparsify(nn.Sequential(nn.Linear(8, 4)), 0.5, "uniform", seed=0)
    s = sparsestart.summary(m, input_size=(7, 8))  # a sequence of 7 tokens per sample
    assert s.rows[0]["sparse_flops"] == 16 * 7 and s.rows[0]["dense_flops"] == 32 * 7


def test_densities_command_table_and_plot(tmp_path, capsys):
    out = tmp_path / "fig.png"
    assert dcli.main(["--model", "mlp:784,300,100,10", "--density", "0.1", "--distribution", "balanced",
                      "--plot", str(out), "--compare", "uniform", "erk"]) == 0
    text = capsys.readouterr().out
    expected = list(allocate_densities(shapes.mlp(), 0.1, "balanced").values())
    lines = [ln.split() for ln in text.splitlines()]
    table = [float(ln[-2]) for ln in lines if len(ln) > 1 and ln[1] == "linear"]
    assert table == pytest.approx(expected, abs=1e-5)
    total = next(ln for ln in lines if ln and ln[0] == "total")
    assert total[-1] == str(round(0.1 * 266200)) and float(total[-2]) == pytest.approx(0.1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_densities_command_zoo_model_registered():
    pytest.importorskip("sparsestart.models")
    from sparsestart.cli import _COMMANDS

    assert "sparsestart.init.cli" in _COMMANDS
    parser = argparse.ArgumentParser()
    dcli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["densities", "--model", "vgg16", "--density", "0.01", "--distribution", "pyramidal"])
    assert args.func(args) == 0
    model = dcli.build_model("resnet18", num_classes=100)
    assert next(model.parameters()).is_meta and model.fc.out_features == 100


def test_densities_command_errors(capsys):
    for argv, msg in ((["--model", "nosuch", "--density", "0.1"], "unknown model name 'nosuch'"),
                      (["--model", "mlp:784,x", "--density", "0.1"], "integer layer sizes"),
                      (["--model", "mlp:784,10", "--density", "2"], "density must lie in (0, 1], got 2.0"),
                      (["--model", "mlp:784,10", "--density", "0.1", "--distribution", "snip"], "invalid choice")):
        with pytest.raises(SystemExit) as exc:
            dcli.main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


def test_densities_exclude_that_matches_no_layer_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        dcli.main(["--model", "mlp:784,300,10", "--density", "0.1", "--exclude", "nope*"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--exclude 'nope*' matches no Linear/Conv2d layer" in err and "fc1, fc2" in err, err
    # a pattern that matches leaves that layer out of the table
    assert dcli.main(["--model", "mlp:784,300,10", "--density", "0.1", "--exclude", "fc2"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if " linear " in ln]
    assert names == ["fc1"]
