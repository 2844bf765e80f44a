"""Re-evaluating a saved run (``sparsestart evaluate``): load its checkpoint onto a device, then the
metrics of a finished run (accuracy, NLL, ECE, OoD AUROC, FGSM) on its test split."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import RESUME_CHANGEABLE, config_from_dict, resolve_device
from .data import NormalizedModel, load_dataset
from .device import autocast, describe, precision_flags, torch_device
from .methods import make_algorithm
from .metrics import _Pixels, basic_metrics, evaluate_model, predict_logits
from .run import _load_model, _seed_everything, build_model
from .resume import validate_given as _validate_given
from .rundir import BEST, CHECKPOINT
from .rundir import jsonable as _jsonable
from .summary import shifted_set
from .trainer import _on_device

#: What must agree between best.pt and the run's other files when they carry no run id (saved before run ids).
_DATASET_KEYS = ("name", "shape", "num_classes", "train", "val", "test")


def _experiment(config: dict) -> dict:
    """The settings of a configuration that make the experiment (not threads, device, progress ...), as JSON."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RESUME_CHANGEABLE}, default=str))


def check_best_belongs(run_dir, best: dict) -> None:
    """Refuse (:class:`CheckpointError`) a best.pt that is not the one ``run_dir``'s run saved.

    best.pt carries its own configuration, so a best.pt copied in from another run would otherwise be evaluated
    and reported as this run's result. Every file a run saves carries the run's id (a random id drawn when the
    run starts, kept on resume); best.pt must carry the id of the run's checkpoint.pt (or, when only the
    summary is left, of summary.json). Files saved before run ids existed are compared by their experiment
    settings and dataset instead."""
    run_dir = Path(run_dir)
    best_path = run_dir / BEST
    ref, where = None, None
    if (run_dir / CHECKPOINT).is_file():
        # Only its id and configuration are read: loaded onto the meta device, no tensor data comes into memory.
        ref, where = load_checkpoint(run_dir / CHECKPOINT, map_location="meta"), run_dir / CHECKPOINT
    elif (run_dir / "summary.json").is_file():
        where = run_dir / "summary.json"
        try:
            ref = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{best_path}: cannot check that it belongs to the run in {run_dir}: {where} "
                                  f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ref, dict):
        raise CheckpointError(f"{best_path}: cannot check that it belongs to the run in {run_dir}: neither "
                              f"{CHECKPOINT} nor summary.json is there; evaluate with --which final, or restore them")
    mine, theirs = best.get("run_id"), ref.get("run_id")
    if mine and theirs:
        if mine != theirs:
            raise CheckpointError(f"{best_path} was saved by another run (run id {mine}) than the run in {run_dir} "
                                  f"(run id {theirs}, in {where}): it was copied in from elsewhere and its score "
                                  f"would not be this run's; evaluate the run it comes from, or use --which final")
        return
    diffs = [f"{k}: best.pt {v!r}, {where.name} {_experiment(ref.get('config', {})).get(k)!r}"
             for k, v in _experiment(best.get("config", {})).items()
             if v != _experiment(ref.get("config", {})).get(k)]
    saved, now = best.get("dataset", {}), ref.get("dataset", {})
    diffs += [f"dataset {k}: best.pt {saved.get(k)!r}, {where.name} {now.get(k)!r}" for k in _DATASET_KEYS
              if json.dumps(saved.get(k)) != json.dumps(now.get(k))]
    if diffs:
        raise CheckpointError(f"{best_path} does not belong to the run in {run_dir} (saved without a run id, and its "
                              f"settings differ from {where}: {'; '.join(diffs[:5])}"
                              f"{f'; and {len(diffs) - 5} more' if len(diffs) > 5 else ''}); evaluate the run it "
                              f"comes from, or use --which final")


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
    if which == "best":
        check_best_belongs(run_dir, ckpt)
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
    net = build_model(cfg, data)
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
