"""Cost of one structure update of RigL and SET, as a fraction of the training between two updates.

Three copies of the same sparse model (sparsify, the library's default
distribution, CSR), each with its own SGD-momentum optimizer and algorithm:

    idle   RigL with an update interval longer than the run: every ``algo.step()`` is a
           non-update step (its gradient-capture hooks are installed but idle)
    rigl   RigL(update_every=1): every step is an update step; the forward/backward
           before it keeps each layer's (input, output gradient), and ``algo.step()``
           forms the dense gradient in row chunks, drops the k = ceil(alpha_t * nnz)
           smallest |w| and grows the k absent positions of largest |gradient|
    set    SET(update_every=1, seed): the same drop, regrowth uniformly at random

``total_steps`` is set so large that alpha_t stays at its initial value
(``drop_fraction``, default 0.3): the most expensive updates of a run. A timed
call is one whole training iteration (zero_grad, forward, loss, backward,
optimizer.step(), algo.step()); ``algo.step()`` alone is timed inside it as well.
The cost of an update is

    update cost = median(iteration with an update) - median(idle iteration)

(it includes RigL's capture in forward/backward) and is reported as a fraction of
the training between two updates at interval ΔT: ΔT x median(idle iteration).
Before timing, a few iterations check that every update kept each layer's nnz,
changed the structure and left a valid index (``validate()``), and that the idle
model's structure did not change.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch

from . import common, training

NEVER = 10**12


def updating_algorithms(models: dict, opts: dict, drop_fraction: float, seed: int) -> dict:
    """RigL and SET updating the structure at every step, and an "idle" RigL that never does
    (its step() costs the same bookkeeping, so the difference is the update itself)."""
    from sparsestart import algorithms

    return {
        "idle": algorithms.RigL(models["idle"], opts["idle"], total_steps=NEVER, update_every=NEVER,
                                drop_fraction=drop_fraction),
        "rigl": algorithms.RigL(models["rigl"], opts["rigl"], total_steps=NEVER, update_every=1,
                                drop_fraction=drop_fraction),
        "set": algorithms.SET(models["set"], opts["set"], total_steps=NEVER, update_every=1,
                              drop_fraction=drop_fraction, seed=seed),
    }


def _masks(model) -> Dict[str, torch.Tensor]:
    return {n: m.mask() for n, m in training.sparse_layers(model).items()}


def _check(models, algos, iterations, steps: int = 2) -> dict:
    start = {k: _masks(m) for k, m in models.items()}
    nnz0 = {k: {n: layer.nnz for n, layer in training.sparse_layers(m).items()} for k, m in models.items()}
    for _ in range(steps):
        for k in iterations:
            iterations[k]()
    out = {}
    for k, model in models.items():
        layers = training.sparse_layers(model)
        for layer in layers.values():
            layer.validate()
        changed = sum(int((start[k][n] != layer.mask()).sum()) for n, layer in layers.items())
        nnz_kept = all(layer.nnz == nnz0[k][n] for n, layer in layers.items())
        rewires = sum(1 for h in algos[k].history if h.get("event") == "rewire" and h["dropped"] > 0)
        out[k] = {"changed_positions": changed, "nnz_kept": nnz_kept, "rewire_events": rewires}
        ok = nnz_kept and ((changed > 0 and rewires > 0) if k != "idle" else (changed == 0 and rewires == 0))
        if not ok:
            raise AssertionError(f"{k}: structure check failed after {steps} iterations: {out[k]}")
    return out


def bench_model(cfg: dict, density: float, distribution: str, rounds: int, interval: int, drop_fraction: float,
                seed: int = 0) -> dict:
    _, sparse = training.sparse_model(cfg, density, distribution, seed)
    x, y = training.batch(cfg, seed)
    models = {k: copy.deepcopy(sparse) for k in ("idle", "rigl", "set")}
    opts = {k: training.sgd(m) for k, m in models.items()}
    algos = updating_algorithms(models, opts, drop_fraction, seed)
    algo_times: Dict[str, List[float]] = {k: [] for k in models}

    def iteration(k):
        step = training.make_step(models[k], opts[k], x, y)
        algo, times = algos[k], algo_times[k]

        def run():
            step()
            t0 = time.perf_counter()
            algo.step()
            times.append(time.perf_counter() - t0)
        return run

    iterations = {k: iteration(k) for k in models}
    check = _check(models, algos, iterations)
    idle = common.idle_fraction()
    times = common.interleaved(iterations, rounds, min_sample=5e-3, max_inner=50)
    base = times["idle"]["median"]
    layers = training.sparse_layers(sparse)
    rec = {
        "model": cfg["model"], "title": cfg["title"], "batch": cfg["batch"], "density": density,
        "distribution": distribution, "nnz": sum(m.nnz for m in layers.values()), "update_interval": interval,
        "drop_fraction": drop_fraction, "drop_fraction_used": algos["rigl"].drop_fraction_at(algos["rigl"].step_count),
        "idle_before": idle, "check": check, "times": times,
        "algo_step": {k: common.summarize(common.timed_calls(v, times[k])) for k, v in algo_times.items()},
        "iteration_ms": base * 1e3,
    }
    for k in ("rigl", "set"):
        cost = times[k]["median"] - base
        rec[k] = {"update_cost_ms": cost * 1e3, "step_call_ms": rec["algo_step"][k]["median"] * 1e3,
                  "fraction": cost / (interval * base),
                  "fraction_step_call": rec["algo_step"][k]["median"] / (interval * base)}
    return rec


def run(args, log=print) -> dict:
    records = []
    for cfg in training.configs(args.quick, args.algo_models, args.vgg_batch):
        if args.wait_quiet:
            common.wait_quiet(args.wait_quiet)
        r = bench_model(cfg, args.algo_density, args.distributions[0], args.algo_rounds, args.update_interval,
                        args.drop_fraction, seed=args.seed)
        records.append(r)
        log(f"  {r['title']:34s} batch {r['batch']:<4d} d={r['density']:<5g} iteration {r['iteration_ms']:8.2f} ms"
            + "".join(f"  {k}: update {r[k]['update_cost_ms']:8.2f} ms (step() {r[k]['step_call_ms']:8.2f} ms) = "
                      f"{r[k]['fraction'] * 100:.2f}% of {args.update_interval} steps" for k in ("rigl", "set")))
    return {"records": records}
