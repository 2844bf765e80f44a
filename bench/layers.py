"""Layer benchmarks: SparseLinear / SparseConv2d against nn.Linear / nn.Conv2d.

Three implementations of the same layer (same kept weights) are timed:

    sparse   sparsestart.nn.SparseLinear / SparseConv2d (format csr unless stated)
    dense    the dense torch layer (all weights)
    masked   the dense layer computing with weight * mask, as the papers' code trains

Passes: ``forward`` runs under torch.no_grad() (inference); ``forward+backward``
runs the forward with autograd and backward from a fixed output gradient, with the
input requiring grad (a hidden layer: weight, bias and input gradients are all
computed). Gradients are reset to None before every call.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from . import common


def _configs(quick: bool):
    if quick:
        return [
            dict(kind="linear", name="linear 64->48", in_f=64, out_f=48, batch=16),
            dict(kind="conv", name="conv3x3 8->8 @6x6", cin=8, cout=8, hw=6, batch=2),
        ]
    return [
        dict(kind="linear", name="linear 1024->1024", in_f=1024, out_f=1024, batch=256),
        dict(kind="linear", name="linear 4096->4096", in_f=4096, out_f=4096, batch=256),
        dict(kind="conv", name="conv3x3 64->64 @32x32", cin=64, cout=64, hw=32, batch=64),
        dict(kind="conv", name="conv3x3 256->256 @8x8", cin=256, cout=256, hw=8, batch=64),
    ]


def _build(cfg, density: float, fmt: str, seed: int):
    import sparsestart.nn as snn

    torch.manual_seed(seed)
    if cfg["kind"] == "linear":
        dense = nn.Linear(cfg["in_f"], cfg["out_f"])
        sparse = snn.SparseLinear.from_dense(dense, density=density, format=fmt, seed=seed)
        x = torch.randn(cfg["batch"], cfg["in_f"])

        def masked_fn(inp, w, bias, mask):
            return F.linear(inp, w * mask, bias)
    else:
        dense = nn.Conv2d(cfg["cin"], cfg["cout"], 3, padding=1)
        sparse = snn.SparseConv2d.from_dense(dense, density=density, format=fmt, seed=seed)
        x = torch.randn(cfg["batch"], cfg["cin"], cfg["hw"], cfg["hw"])

        def masked_fn(inp, w, bias, mask):
            return F.conv2d(inp, w * mask, bias, padding=1)
    kept = sparse.to_dense()  # the dense layer with the kept weights (zeros elsewhere)
    mask = sparse.sparse_weight.mask().reshape(kept.weight.shape)
    with torch.no_grad():
        dense.weight.copy_(kept.weight)  # dense and masked compute with the same numbers
    return dense, sparse, x, mask, masked_fn


def bench_layer(cfg, density: float, rounds: int, fmt: str = "csr", seed: int = 0) -> List[dict]:
    dense, sparse, x, mask, masked_fn = _build(cfg, density, fmt, seed)
    w, bias = dense.weight, dense.bias
    with torch.no_grad():
        y_dense = dense(x)
        y_sparse = sparse(x)
    err = common.rel_err(y_sparse, y_dense)
    if not err <= 1e-4:
        raise AssertionError(f"{cfg['name']} d={density}: sparse layer differs from the masked dense layer ({err:.3g})")
    gy = torch.randn_like(y_dense)
    xg = x.clone().requires_grad_(True)
    params = [p for m_ in (dense, sparse) for p in m_.parameters()]

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x)
        return run

    def fwd_bwd(fn):
        return common.forward_backward(fn, params, xg, gy)

    # check the gradients once: sparse values' grad equals the masked dense weight grad at the kept entries
    fwd_bwd(lambda inp: sparse(inp))()
    gx_sparse = xg.grad.clone()
    fwd_bwd(lambda inp: masked_fn(inp, w, bias, mask))()
    gx_masked = xg.grad.clone()
    gerr = common.rel_err(gx_sparse, gx_masked)
    if not gerr <= 1e-4:
        raise AssertionError(f"{cfg['name']} d={density}: input gradients differ ({gerr:.3g})")

    impls = {
        "forward/sparse": fwd(sparse),
        "forward/dense": fwd(dense),
        "forward/masked": fwd(lambda inp: masked_fn(inp, w, bias, mask)),
        "forward+backward/sparse": fwd_bwd(sparse),
        "forward+backward/dense": fwd_bwd(dense),
        "forward+backward/masked": fwd_bwd(lambda inp: masked_fn(inp, w, bias, mask)),
    }
    idle = common.idle_fraction()
    stats = common.interleaved(impls, rounds, min_sample=5e-3, max_inner=50)
    sw = sparse.sparse_weight
    out = []
    for pass_ in ("forward", "forward+backward"):
        times = {k.split("/")[1]: v for k, v in stats.items() if k.startswith(pass_ + "/")}
        t = times["sparse"]["median"]
        out.append({
            "layer": cfg["name"], "kind": cfg["kind"], "batch": cfg["batch"], "format": fmt, "density": density,
            "density_actual": sw.density, "nnz_elements": sw.nnz_elements, "pass": pass_, "idle_before": idle,
            "rel_error_forward": err, "rel_error_input_grad": gerr, "times": times,
            "speedup_vs_dense": times["dense"]["median"] / t, "speedup_vs_masked": times["masked"]["median"] / t,
        })
    return out


def run(args, log=print) -> dict:
    try:
        import sparsestart.nn as snn  # noqa: F401
        snn.SparseLinear, snn.SparseConv2d  # noqa: B018
    except (ImportError, AttributeError) as exc:
        log(f"  layers skipped: sparsestart.nn is not available ({exc})")
        return {"records": [], "skipped": str(exc)}
    records = []
    for cfg in _configs(args.quick):
        for d in args.densities:
            if args.wait_quiet:
                common.wait_quiet(args.wait_quiet)
            recs = bench_layer(cfg, d, args.layer_rounds, seed=args.seed)
            records += recs
            for r in recs:
                log(f"  {r['layer']:24s} d={d:<6g} {r['pass']:17s} sparse {r['times']['sparse']['median'] * 1e3:8.2f} ms"
                    f"  dense {r['times']['dense']['median'] * 1e3:8.2f} ms  x{r['speedup_vs_dense']:.2f}"
                    f"  (masked x{r['speedup_vs_masked']:.2f})")
    return {"records": records}
