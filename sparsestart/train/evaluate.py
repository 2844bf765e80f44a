"""Re-evaluating a saved run (``sparsestart evaluate``): load its checkpoint onto a device, then the
metrics of a finished run (accuracy, NLL, ECE, OoD AUROC, FGSM) on its test split."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import config_from_dict, resolve_device
from .data import NormalizedModel, load_dataset
from .device import autocast, describe, precision_flags, torch_device
from .methods import make_algorithm
from .metrics import _Pixels, basic_metrics, evaluate_model, predict_logits
from .run import _load_model, _seed_everything, _sparsify, build_net
from .trainer import BEST, CHECKPOINT, _jsonable, _on_device, _validate_given, shifted_set

#: The saved settings that ``sparsestart evaluate`` may override.
_EVALUATE_OVERRIDES = ("data_dir", "ood_dir", "test_limit", "fgsm_eps", "eval_batch_size", "threads")


def load_for_eval(run_dir, which: str = "final", **overrides):
    """(config, dataset, model, checkpoint) of a finished or interrupted run, ready to evaluate.

    ``which``: "final" (checkpoint.pt, the last completed epoch) or "best"
    (best.pt, the epoch of the best validation accuracy). ``overrides`` may set
    data_dir, ood_dir, test_limit, fgsm_eps, eval_batch_size, threads, device
    (default auto: CUDA when available, wherever the run trained) and precision
    (default: the run's). The model and the data are on that device.
    """
    from .device import check_precision

    run_dir = Path(run_dir)
    if which not in ("final", "best"):
        raise ValueError(f"which must be 'final' or 'best', got {which!r}")
    device = resolve_device(overrides.pop("device", None) or "auto")
    ckpt = load_checkpoint(run_dir / (CHECKPOINT if which == "final" else BEST))
    cfg = config_from_dict(ckpt["config"], where=str(run_dir))
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.device = device
    cfg.precision = check_precision(cfg.precision)
    # --fgsm-eps -1 would report an anti-adversarial step as robustness; --test-limit 0 and --eval-batch-size 0
    # would fail deep inside the evaluation: checked as for a new run, before any data is read.
    saved_in = run_dir / (CHECKPOINT if which == "final" else BEST)
    _validate_given(cfg, overrides, f"the configuration saved in {saved_in}", _EVALUATE_OVERRIDES)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    data = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                        train_limit=cfg.train_limit, test_limit=cfg.test_limit, augment=cfg.augment)
    saved = ckpt.get("dataset", {})
    if saved and (list(saved.get("shape", [])) != list(data.shape) or saved.get("num_classes") != data.num_classes):
        raise CheckpointError(f"{run_dir}: the model was trained on {saved.get('name')} {saved.get('shape')} with "
                              f"{saved.get('num_classes')} classes; the data found now is {data.name} "
                              f"{list(data.shape)} with {data.num_classes}")
    _seed_everything(int(cfg.seed))
    net = build_net(cfg, data)
    _sparsify(net, cfg, data)
    dev = torch_device(cfg.device)
    model = NormalizedModel(net, data.mean, data.std).to(dev)
    data = data.to(dev)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    steps = -(-len(data.train) // int(cfg.batch_size)) * int(cfg.epochs)
    algorithm = make_algorithm(cfg.method, net, optimizer, steps, cfg.method_options, seed=int(cfg.seed))
    _load_model(model, ckpt["model"], optimizer)
    try:
        algorithm.load_state_dict(ckpt["algorithm"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{run_dir}: the saved method state does not fit: {exc}") from None
    model.eval()
    return cfg, data, model, ckpt


def evaluate_run(run_dir, which: str = "final", *, log: Callable[[str], None] = print, **overrides) -> dict:
    """Re-evaluate a saved run (accuracy, NLL, ECE, OoD AUROC, FGSM) on its test split.

    ``overrides``: see :func:`load_for_eval` (``device``, ``precision`` among them)."""
    cfg, data, model, ckpt = load_for_eval(run_dir, which, **overrides)
    t0 = time.perf_counter()
    try:
        shifted = shifted_set(cfg, data)
    except (FileNotFoundError, ValueError) as exc:
        shifted = (None, f"shifted set unavailable: {exc}")
    dev = next(iter(model.buffers())).device  # the Normalize buffers: there even for a model without parameters
    amp = (lambda: autocast(cfg.precision, dev))
    with precision_flags(cfg.precision), _on_device(dev):
        res = evaluate_model(model, data.test, mean=data.mean, std=data.std, shifted=shifted, fgsm_eps=cfg.fgsm_eps,
                             batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=lambda m: log(f"  evaluating {m}"),
                             autocast=amp)
        val = basic_metrics(predict_logits(model, _Pixels(data.val), cfg.eval_batch_size, autocast=amp),
                            data.val.labels)
    return _jsonable({"run": str(run_dir), "which": which, "epoch": ckpt["epoch"], "dataset": data.describe(),
                      "val": val, "test": res, **describe(dev, cfg.precision), "seconds": time.perf_counter() - t0})
