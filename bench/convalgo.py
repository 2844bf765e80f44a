"""Which convolution algorithm each layer of a sparse VGG-11 should use: every SparseConv2d
algorithm against the dense nn.Conv2d, per layer, at the layer's own ERK density and input.

SparseConv2d.conv_algorithm="auto" picks "dense", "direct" or "unfold" by timing them on the
first call for each input shape, density bucket and thread count (sparsestart.nn.autotune; with
SPARSESTART_AUTOTUNE=0 it applies the threshold rule of "heuristic": density, fan-in and
output-plane size, thresholds in sparsestart/nn/conv.py). This suite measures all of them, and
reports what "auto" and the rule pick, on the layers that motivated the thresholds: VGG-11-BN at
3x32x32 (maps 32x32 .. 2x2), batch 64, sparsify(..., distribution) at the training densities. Each layer sees the input it
gets in the model's forward pass. Forward+backward (input requiring grad, fixed output
gradient), interleaved, median of rounds, after checking every algorithm against the dense
convolution with the same kept weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import common, training

ALGORITHMS = ("direct", "unfold", "dense")


def _layers_and_inputs(cfg: dict, density: float, distribution: str, seed: int):
    """[(name, SparseConv2d, its input)] of the sparse model, inputs captured in one forward pass."""
    import sparsestart.nn as snn

    _, model = training.sparse_model(cfg, density, distribution, seed)
    x, _ = training.batch(cfg, seed)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, snn.SparseConv2d)]
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, i[0].detach().clone()))
             for n, m in convs]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return [(n, m, inputs[n]) for n, m in convs]


def bench_layer(name: str, layer, x: torch.Tensor, rounds: int) -> dict:
    dense = layer.to_dense()
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        y_ref = dense(x)
    gy = torch.randn_like(y_ref)
    pad = layer._explicit_padding()
    # What "auto" picks for the call measured here (input requiring grad: the autotuner's key for
    # training), measured by the autotuner itself when tuning is on, and what the threshold rule picks.
    from sparsestart.nn import autotune

    layer.conv_algorithm = "auto"
    with torch.enable_grad():
        chosen = layer._algorithm(xg, pad)
    layer.conv_algorithm = "heuristic"
    rule = layer._algorithm(xg, pad)
    direct_ok = layer.stride == (1, 1) and layer.values.dim() == 1

    def with_algorithm(algorithm):
        def fn(inp):
            layer.conv_algorithm = algorithm
            return layer(inp)
        return fn

    impls = {"dense nn.Conv2d": common.forward_backward(dense, dense.parameters(), xg, gy)}
    errors = {}
    for algorithm in ALGORITHMS:
        if algorithm == "direct" and not direct_ok:
            continue
        layer.conv_algorithm = algorithm
        with torch.no_grad():
            errors[algorithm] = common.rel_err(layer(x), y_ref)
        if not errors[algorithm] <= 1e-4:
            raise AssertionError(f"{name}: conv_algorithm={algorithm!r} differs from the dense convolution "
                                 f"({errors[algorithm]:.3g})")
        impls[algorithm] = common.forward_backward(with_algorithm(algorithm), layer.parameters(), xg, gy)
    times = common.interleaved(impls, rounds, min_sample=5e-3, max_inner=20)
    layer.conv_algorithm = "auto"
    best = min((a for a in ALGORITHMS if a in times), key=lambda a: times[a]["median"])
    return {
        "layer": name, "in_channels": layer.in_channels, "out_channels": layer.out_channels,
        "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "input_hw": list(x.shape[-2:]),
        "batch": x.shape[0], "density": layer.density, "fan_in": layer.fan_in, "auto": chosen,
        "autotuned": autotune.enabled(), "heuristic": rule, "fastest": best,
        "rel_error": errors, "times": times,
        "auto_vs_fastest": times[best]["median"] / times[chosen]["median"],
        "auto_speedup_vs_dense": times["dense nn.Conv2d"]["median"] / times[chosen]["median"],
    }


def run(args, log=print) -> dict:
    cfg = next(c for c in training.configs(args.quick, ["vgg11"], args.vgg_batch))
    records = []
    for density in args.train_densities:
        for name, layer, x in _layers_and_inputs(cfg, density, args.distributions[0], args.seed):
            if args.wait_quiet:
                common.wait_quiet(args.wait_quiet)
            r = bench_layer(name, layer, x, args.layer_rounds)
            r["model_density"] = density
            records.append(r)
            log(f"  {cfg['title']} d={density:<5g} {name:16s} {r['in_channels']:4d}->{r['out_channels']:<4d} "
                f"@{r['input_hw'][0]:<2d} density {r['density']:.3f}  "
                + "  ".join(f"{k} {v['median'] * 1e3:7.2f} ms" for k, v in r["times"].items())
                + f"  auto={r['auto']} rule={r['heuristic']} (fastest {r['fastest']})")
    return {"records": records, "model": cfg["title"], "distribution": args.distributions[0]}


def table(result: dict) -> str:
    """Markdown: one row per layer and model density."""
    rows = []
    for r in result.get("records", []):
        t = r["times"]
        cell = [f"{t[a]['median'] * 1e3:.2f}" if a in t else "–" for a in ALGORITHMS]
        rows.append([f"{r['model_density']:g}", r["layer"], f"{r['in_channels']}->{r['out_channels']}",
                     f"{r['input_hw'][0]}x{r['input_hw'][1]}", f"{r['density']:.3f}", str(r["fan_in"]),
                     *cell, f"{t['dense nn.Conv2d']['median'] * 1e3:.2f}",
                     # tuning off, or a record written before the autotuner: "auto" was the threshold rule
                     r["auto"] if r.get("autotuned") else f"{r['auto']} (rule)", r.get("heuristic", r["auto"]),
                     r["fastest"],
                     f"{r['auto_vs_fastest']:.2f}", f"{r['auto_speedup_vs_dense']:.2f}x"])
    header = ["model density", "layer", "channels", "input", "layer density", "fan-in",
              *(f"{a} ms" for a in ALGORITHMS), "dense nn.Conv2d ms", "auto picks", "rule picks", "fastest",
              "fastest / auto time", "auto x dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
