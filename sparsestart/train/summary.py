"""What a finished run reports: the final evaluation (test, OoD with the shifted set, FGSM) and summary.json
(configuration, metrics, layers, multiply-adds, memory, time, device), plus the counts the trainer keeps for it
while it trains (stored weights, dense-gradient steps)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import nn as snn
from .. import runtime
from .config import TrainConfig
from .data import Dataset, adapt_images, fashion_mnist_available, load_dataset, load_digits_images, load_image_dir
from .device import describe
from .metrics import evaluate_model, forward_flops
from .rundir import BEST, jsonable

__all__ = ["shifted_set", "layer_stats", "layer_densities", "dense_gradient_updates", "final_evaluation",
           "run_summary"]


def shifted_set(cfg: TrainConfig, data: Dataset):
    """(description, float images in [0, 1] shaped like the data) of the shifted OoD set, or (None, reason)."""
    if cfg.ood_dir:
        split, desc = load_image_dir(cfg.ood_dir)
        return desc, adapt_images(split.pixels(), data.shape)
    if data.name == "fashion-mnist":
        x, _ = load_digits_images(28)
        return "digits (scikit-learn, upsampled to 28x28)", adapt_images(x, data.shape)
    if data.name == "digits":
        if fashion_mnist_available(cfg.data_dir):
            fm = load_dataset("fashion-mnist", cfg.data_dir, test_limit=2000)
            return "fashion-mnist test (first 2000)", adapt_images(fm.test.pixels(), data.shape)
        if cfg.data_dir:
            return None, f"Fashion-MNIST is not in --data-dir {cfg.data_dir}"
        return None, "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
    return None, "no --ood-dir given for a real shifted set"


def layer_stats(net: nn.Module) -> tuple[int, int]:
    """(stored weights, dense weights) of the sparse layers (of all Linear/Conv2d layers if none is sparse)."""
    sparse = [m for m in net.modules() if isinstance(m, snn.SparseLayer)]
    if sparse:
        return sum(m.nnz for m in sparse), sum(math.prod(m.weight_shape) for m in sparse)
    dense = [m.weight.numel() for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(dense), sum(dense)


def layer_densities(net: nn.Module) -> dict:
    """{layer name: stored / dense weights} of each sparse layer."""
    return {name: m.nnz / math.prod(m.weight_shape) for name, m in net.named_modules()
            if isinstance(m, snn.SparseLayer)}


def dense_gradient_updates(algorithm) -> int:
    """Steps so far at which the method computed a dense gradient (RigL-style gradient growth).

    RigL and gradual prune-and-regrow with gradient growth capture the dense
    gradient every ``update_every`` steps before ``end_step``.
    """
    if getattr(algorithm, "growth", None) != "gradient" or not getattr(algorithm, "drop_fraction", 0):
        return 0
    every, end = getattr(algorithm, "update_every", None), getattr(algorithm, "end_step", None)
    steps = getattr(algorithm, "step_count", None)
    if not all(isinstance(v, int) for v in (every, end, steps)) or every < 1:
        return 0
    return max(0, min(steps, end - 1)) // every


def _backend_name(net: nn.Module, device: torch.device) -> str:
    """The sparse backend the run's SpMM runs on (what summary.json records)."""
    if device.type == "cpu":
        return "cpu (C++)" if getattr(__import__("sparsestart").ops, "NATIVE_AVAILABLE", False) \
            else "reference (pure PyTorch)"
    layer = next((m for m in net.modules() if isinstance(m, snn.SparseLayer)), None)
    if layer is None:
        return "none (dense model)"
    try:
        from ..ops import registry

        x = torch.zeros(layer.matrix_shape[1], 8, dtype=layer.values.dtype, device=layer.values.device)
        return registry.choose("spmm", [layer.values, layer.rowptr, x]).name  # the probe of ops.library
    except Exception as exc:  # a description only: never fail a finished run over it
        return f"unknown ({type(exc).__name__})"


def final_evaluation(run, cfg: TrainConfig, epoch: int, last: dict, log) -> dict:
    """``final`` of summary.json: the last epoch's validation metrics and, with ``cfg.final_eval``, the full
    test evaluation (OoD against Gaussian, uniform and the shifted set; FGSM); otherwise the last epoch's
    test metrics."""
    final = {"epoch": epoch, "val": {k[4:]: v for k, v in last.items() if k.startswith("val_")}}
    if cfg.final_eval:
        log("final evaluation: test, OoD (Gaussian, uniform, shifted), FGSM ...")
        try:
            shifted = shifted_set(cfg, run.data)
        except (FileNotFoundError, ValueError) as exc:
            shifted = (None, f"shifted set unavailable: {exc}")
        final["test"] = evaluate_model(run.model, run.data.test, mean=run.data.mean, std=run.data.std,
                                       shifted=shifted, fgsm_eps=cfg.fgsm_eps, batch_size=cfg.eval_batch_size,
                                       seed=cfg.seed, autocast=run.autocast)
    else:
        final["test"] = {k[5:]: v for k, v in last.items() if k.startswith("test_")}
    return final


def run_summary(run, cfg: TrainConfig, *, run_id: str, epochs: int, final: dict, best_epoch: Optional[int],
                best_row: dict, train_flops: int, samples_seen: int, train_seconds: float,
                final_eval_seconds: float, wall_time_seconds: float) -> dict:
    """summary.json of a finished run (JSON-ready)."""
    r = run
    fl = forward_flops(r.net, r.data.shape)
    s = fl["summary"]
    tot = s.total
    model_bytes = sum(t.numel() * t.element_size() for t in r.net.parameters()) + \
        sum(t.numel() * t.element_size() for t in r.net.buffers())
    layers = [{k: row[k] for k in ("name", "type", "shape", "numel", "nnz", "density", "sparse_bytes",
                                   "dense_bytes", "index_bytes", "weight_bytes_per_nnz", "index_bytes_per_nnz",
                                   "sparse_flops", "dense_flops")}
              for row in s.rows]
    summary = {
        "run_id": run_id,
        "config": cfg.to_dict(),
        "dataset": r.data.describe(),
        "epochs": epochs,
        "final": final,
        "best_val": {"epoch": best_epoch,
                     "val": {k[4:]: v for k, v in best_row.items() if k.startswith("val_")},
                     "test": {k[5:]: v for k, v in best_row.items() if k.startswith("test_")},
                     "model_file": BEST},
        "layers": layers,
        "density": (lambda a, b: a / b if b else 1.0)(*layer_stats(r.net)),
        "flops": {"forward_per_sample": fl["sparse"], "dense_forward_per_sample": fl["dense"],
                  "training_total": train_flops, "samples_seen": samples_seen,
                  "dense_training_total": 3 * fl["dense"] * samples_seen,
                  "note": "multiply-adds of Linear/Conv2d layers counting stored nonzeros; training = "
                          "3 x forward per sample seen (+ dense gradients at RigL-style updates)"},
        "memory": {"layers_bytes": tot["sparse_bytes"], "layers_dense_bytes": tot["dense_bytes"],
                   "layers_index_bytes": tot["index_bytes"], "model_bytes": model_bytes,
                   "model_dense_bytes": model_bytes - tot["sparse_bytes"] + tot["dense_bytes"]},
        "method": {"name": cfg.method, "history": jsonable(getattr(r.algorithm, "history", []))},
        "flow_report": jsonable(getattr(getattr(r.net, "flow_report", None), "__dict__", None)),
        "train_seconds": train_seconds,
        "final_eval_seconds": final_eval_seconds,
        "wall_time_seconds": wall_time_seconds,
        **describe(r.device, cfg.precision),
        "threads": torch.get_num_threads(),
        "malloc": runtime.malloc_settings(),
        "backend": _backend_name(r.net, r.device),
    }
    return jsonable(summary)
