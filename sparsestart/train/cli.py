"""``sparsestart train`` and ``sparsestart evaluate``.

See docs/training.md. Options not given on the command line come from
``--config FILE`` (YAML or TOML, keys = long option names), then from the
defaults of :class:`~sparsestart.train.config.TrainConfig`. Without any option,
``sparsestart train`` runs a short demonstration (:data:`~sparsestart.train.config.QUICK`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

__all__ = ["register", "OPTIONS", "add_options", "gather_options", "error"]

# dest -> (flags, argparse kwargs); every dest is a TrainConfig field. Shared with ``sparsestart sweep``.
_S = argparse.SUPPRESS
_DEVICE_HELP = ("auto (cuda if available, else cpu), cpu, cuda (under torchrun: the rank's GPU) or cuda:N; the "
                "model, the whole dataset, the method and the metrics run there")
_PRECISION_HELP = ("fp32 (IEEE: TF32 off), tf32 (TF32 matmuls and convolutions on GPUs), bf16 (autocast of forward "
                   "pass and loss to bfloat16; fp32 weights and optimizer state)")
OPTIONS = [
    # what to train
    ("model", ["--model"], dict(metavar="NAME", help="zoo model (convnet_small, mlp, lenet5, vgg11..19, resnet20.., "
                                                     "resnet18); default convnet_small")),
    ("model_options", ["--model-option"], dict(action="append", metavar="KEY=VALUE",
                                               help="builder argument, e.g. width=2 or hidden=[512,256] (mlp)")),
    ("dataset", ["--dataset"], dict(metavar="NAME", help="fashion-mnist, cifar10, cifar100, digits; default "
                                                         "fashion-mnist if installed, else digits")),
    ("data_dir", ["--data-dir"], dict(metavar="DIR", help="where the dataset files are (also $SPARSESTART_DATA)")),
    ("val_fraction", ["--val-fraction"], dict(type=float, metavar="F", help="validation split (default 0.1)")),
    ("split_seed", ["--split-seed"], dict(type=int, metavar="N", help="seed of the validation split (default 0)")),
    ("train_limit", ["--train-limit"], dict(type=int, metavar="N", help="train on the first N shuffled images")),
    ("test_limit", ["--test-limit"], dict(type=int, metavar="N", help="evaluate on the first N test images")),
    ("augment", ["--augment"], dict(action=argparse.BooleanOptionalAction,
                                    help="pad-4 random crop + flip (default: on for CIFAR only)")),
    # sparsity
    ("density", ["--density"], dict(type=float, metavar="D", help="fraction of weights kept; 1.0 = dense baseline "
                                                                  "(default 0.1)")),
    ("distribution", ["--distribution"], dict(metavar="NAME", help="layer-wise densities (default erk if "
                                                                   "available, else uniform)")),
    ("distribution_options", ["--distribution-option"], dict(action="append", metavar="KEY=VALUE")),
    ("format", ["--format"], dict(metavar="FMT", help="csr (default) or bsr")),
    ("block_size", ["--block-size"], dict(type=int, metavar="B", help="block size for --format bsr")),
    ("exclude", ["--exclude"], dict(action="append", metavar="PATTERN", help="keep these layers dense (repeat)")),
    ("flow", ["--flow"], dict(metavar="NAME", help="repair dead units: random_addition or rejection")),
    ("method", ["--method"], dict(metavar="NAME", help="static, imp, str, rigl, set, gradual, edgepopup (default "
                                                      "rigl if available, else static)")),
    ("method_options", ["--method-option"], dict(action="append", metavar="KEY=VALUE",
                                                 help="method option (repeat), e.g. update_every=50 for rigl, "
                                                      "final_density=0.02 or prune_fraction=0.3 for imp (which "
                                                      "derives its number of levels from them)")),
    # optimisation
    ("optimizer", ["--optimizer"], dict(metavar="NAME", help="sgd (default) or adamw")),
    ("lr", ["--lr"], dict(type=float, help="base learning rate (default 0.1)")),
    ("momentum", ["--momentum"], dict(type=float, help="SGD momentum (default 0.9)")),
    ("nesterov", ["--nesterov"], dict(action=argparse.BooleanOptionalAction)),
    ("weight_decay", ["--weight-decay"], dict(type=float, metavar="WD", help="default 5e-4")),
    ("schedule", ["--schedule"], dict(metavar="NAME", help="cosine (default), step (x0.1 at 50%%, 75%%), constant")),
    ("lr_min", ["--lr-min"], dict(type=float, metavar="LR", help="where the cosine schedule ends (default 0; "
                                                                  "the paper's IMP runs anneal to 0.01)")),
    ("warmup_epochs", ["--warmup-epochs"], dict(type=float, metavar="E")),
    ("epochs", ["--epochs"], dict(type=int, metavar="N", help="default 2")),
    ("batch_size", ["--batch-size"], dict(type=int, metavar="N", help="default 128")),
    ("eval_batch_size", ["--eval-batch-size"], dict(type=int, metavar="N", help="default 128")),
    ("seed", ["--seed"], dict(type=int, help="default 0")),
    # hardware
    ("device", ["--device"], dict(metavar="DEV", help=_DEVICE_HELP + "; default auto. --resume keeps the run's "
                                                      "device unless given (a GPU run continues on the CPU with "
                                                      "--device cpu)")),
    ("precision", ["--precision"], dict(metavar="P", help=_PRECISION_HELP + "; default fp32")),
    ("compile", ["--compile"], dict(action=argparse.BooleanOptionalAction,
                                    help="torch.compile the training step's model (the dense ops around the sparse "
                                         "layers are fused; the first steps compile, ~10-20 s on a CPU; faster for "
                                         "VGG-style nets, slower for MLPs on the CPU: docs/training.md; default off)")),
    # evaluation
    ("fgsm_eps", ["--fgsm-eps"], dict(type=float, metavar="EPS", help="default 8/255")),
    ("ood_dir", ["--ood-dir"], dict(metavar="DIR", help="dataset dir whose test split is the shifted OoD set")),
    ("final_eval", ["--final-eval"], dict(action=argparse.BooleanOptionalAction,
                                          help="OoD + FGSM evaluation at the end (default on)")),
    # runtime
    ("threads", ["--threads"], dict(type=int, metavar="N", help="torch threads")),
    ("tensorboard", ["--tensorboard"], dict(action=argparse.BooleanOptionalAction,
                                            help="also log to DIR/tensorboard (needs tensorboard)")),
    ("progress", ["--progress"], dict(action=argparse.BooleanOptionalAction, help="tqdm progress bars (default on)")),
    ("retain_memory", ["--retain-memory"], dict(action=argparse.BooleanOptionalAction,
                                                help="keep freed memory in the process instead of page-faulting "
                                                     "fresh activations every step (glibc mallopt; default on; "
                                                     "docs/benchmarks.md)")),
]
_KEY_VALUE = {"model_options", "distribution_options", "method_options"}
# Options that do not change what is trained: they do not switch off the no-argument demonstration.
_NEUTRAL = {"data_dir", "threads", "tensorboard", "progress", "retain_memory", "device", "precision", "compile"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a sparse (or dense) model; metrics, checkpoints, evaluation",
                       description="Train a model that is sparse from the first step. Without options: a short "
                                   "demonstration (convnet_small, density 0.1, one epoch on part of Fashion-MNIST "
                                   "or digits). See docs/training.md.")
    p.add_argument("--config", metavar="FILE", help="YAML or TOML file of options (command line wins)")
    p.add_argument("--quick", action="store_true", help="start from the short demonstration settings")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<dataset>-<model>-<density>-<method>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation (resume later)")
    add_options(p)
    p.set_defaults(func=_train_main)

    e = sub.add_parser("evaluate", help="re-evaluate a saved run: accuracy, NLL, ECE, OoD AUROC, FGSM",
                       description="Evaluate the final (or best-validation) model of a run directory on its test "
                                   "split and print/save the metrics.")
    e.add_argument("run_dir", metavar="DIR")
    e.add_argument("--which", choices=("final", "best"), default="final",
                   help="final: checkpoint.pt (last epoch); best: best.pt (best validation accuracy)")
    e.add_argument("--data-dir", metavar="DIR")
    e.add_argument("--ood-dir", metavar="DIR")
    e.add_argument("--test-limit", type=int, metavar="N")
    e.add_argument("--fgsm-eps", type=float, metavar="EPS")
    e.add_argument("--eval-batch-size", type=int, metavar="N")
    e.add_argument("--threads", type=int, metavar="N")
    e.add_argument("--device", metavar="DEV", help=_DEVICE_HELP + "; default auto (not the run's device)")
    e.add_argument("--precision", metavar="P", help=_PRECISION_HELP + "; default: the run's")
    e.add_argument("--output", metavar="FILE", help="where to write the JSON (default DIR/evaluation-<which>.json)")
    e.set_defaults(func=_evaluate_main)


def add_options(parser, skip=()) -> None:
    """Add the training options of :data:`OPTIONS` (but the dests in ``skip``) to ``parser``.

    Options not given stay absent from the parsed namespace (``argparse.SUPPRESS``),
    so :func:`gather_options` can tell given options from defaults.
    """
    for dest, flags, kw in OPTIONS:
        if dest not in skip:
            parser.add_argument(*flags, dest=dest, default=_S, **kw)


def error(cmd: str, msg) -> int:
    """Print ``sparsestart CMD: error: MSG`` to stderr; the exit code 2."""
    print(f"sparsestart {cmd}: error: {msg}", file=sys.stderr)
    return 2


def gather_options(args) -> tuple[dict, set]:
    """(options dict, explicit keys): config file values overridden by command-line values."""
    from .config import load_config_file, parse_key_values

    values = {}
    if args.config:
        values.update(load_config_file(args.config))
    cli = {dest: getattr(args, dest) for dest, _, _ in OPTIONS if hasattr(args, dest)}
    for key in _KEY_VALUE & set(cli):
        merged = dict(values.get(key) or {})
        merged.update(parse_key_values(cli[key], "--" + key[:-1].replace("_", "-")))
        cli[key] = merged
    values.update(cli)
    return values, set(values)


def _train_main(args) -> int:
    from .checkpoint import CheckpointError
    from .config import QUICK, QUICK_FALLBACK, config_from_dict, resolve
    from .data import DatasetNotFoundError
    from .paths import DiskFullError, RunLockedError
    from .trainer import Trainer

    fallback = False
    try:
        values, explicit = gather_options(args)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
        if args.resume:
            if args.out and Path(args.out) != Path(args.resume):
                raise ValueError(f"--out {args.out} and --resume {args.resume} name different directories")
            if args.quick or args.config:
                raise ValueError("--resume takes the configuration from the checkpoint; drop --quick/--config")
            trainer = Trainer(None, args.resume, resume=True, overrides=values)
            print(f"resuming {args.resume} at epoch {trainer.epoch}/{trainer.cfg.epochs} on {_where(trainer)}")
        else:
            quick = args.quick or (not args.config and not (explicit - _NEUTRAL))
            base = dict(QUICK) if quick else {}
            if quick and not args.quick:
                print("sparsestart train: no options given, running the short demonstration "
                      f"({', '.join(f'{k}={v}' for k, v in QUICK.items())}); see `sparsestart train --help`")
            cfg = resolve(config_from_dict({**base, **values}))
            if quick and cfg.dataset == "digits":
                # digits is ~10 steps an epoch: the short demonstration trains it longer (QUICK_FALLBACK).
                extra = {k: v for k, v in QUICK_FALLBACK.items() if k not in values}
                cfg = dataclasses.replace(cfg, **extra)
                base.update(extra)
                if "dataset" not in values:
                    fallback = True
                    print(_fallback_notice(cfg))
            if quick and cfg.method in ("rigl", "set", "gradual") and "update_every" not in cfg.method_options:
                # The algorithms' default (every 100 steps) would hardly update within the short demonstration.
                cfg.method_options = {**cfg.method_options, "update_every": 10}
            out = args.out or (f"runs/{cfg.dataset}-{cfg.model}-d{cfg.density:g}-{cfg.method}-"
                               f"{time.strftime('%Y%m%d-%H%M%S')}")
            trainer = Trainer(cfg, out, explicit=frozenset(explicit | (set(base) if quick else set())))
            d = trainer.run.data
            sparsity = "dense baseline" if float(cfg.density) == 1.0 else \
                f"density {cfg.density:g} ({cfg.distribution}, {cfg.format})"
            print(f"training {cfg.model} on {d.name} ({len(d.train)} train / {len(d.val)} val / {len(d.test)} test, "
                  f"from {d.source}), {sparsity}, method {cfg.method}, {cfg.optimizer} lr {cfg.lr:g}, "
                  f"{cfg.epochs} epoch(s) on {_where(trainer)} -> {out}")
    except (ValueError, TypeError, DatasetNotFoundError, CheckpointError, RunLockedError) as exc:
        return error("train", exc)
    except DiskFullError as exc:
        error("train", exc)
        return 1
    try:
        trainer.fit(stop_after=args.stop_after)
    except (CheckpointError, RunLockedError) as exc:  # another process wrote or holds the run directory
        return error("train", exc)
    except DiskFullError as exc:  # the message says which epoch is saved and how to continue
        error("train", exc)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last completed epoch is saved. Continue with: sparsestart train --resume "
              f"{trainer.out}", file=sys.stderr)
        return 130
    if fallback:
        print("  dataset   scikit-learn's digits, the FALLBACK (Fashion-MNIST is not installed): `sudo apt-get "
              "install dataset-fashion-mnist` or `make setup` gets the real data")
    return 0


def _fallback_notice(cfg) -> str:
    """What the short demonstration prints when it falls back to digits: why, what runs instead, how to get the data."""
    import os

    from . import data

    looked = [f"${data.ENV_VAR}={os.environ[data.ENV_VAR]}"] if os.environ.get(data.ENV_VAR) else []
    if data._system_data_enabled():
        looked.append(data.DEBIAN_FASHION_MNIST)
        where = f"not found in {' or '.join(looked)}"
    else:
        where = (f"{'not found in ' + looked[0] + '; ' if looked else ''}the system copy in "
                 f"{data.DEBIAN_FASHION_MNIST} is hidden by ${data.SYSTEM_DATA_ENV}={os.environ.get(data.SYSTEM_DATA_ENV)}")
    return (f"sparsestart train: FALLBACK: Fashion-MNIST is not installed ({where}), so the "
            f"demonstration trains on scikit-learn's bundled digits (1,797 8x8 images, upsampled to 28x28) for "
            f"{cfg.epochs} epochs instead.\n"
            f"  To run it on the real data: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` "
            f"tries this), or put the four Fashion-MNIST idx files into DIR and set ${data.ENV_VAR}=DIR.")


def _where(trainer) -> str:
    """"cuda:0 (NVIDIA H100 80GB HBM3), bf16" or "cpu, fp32" (", compiled" with --compile)."""
    from .device import gpu_name

    dev = trainer.run.device
    name = gpu_name(dev)
    return f"{dev}{f' ({name})' if name else ''}, {trainer.cfg.precision}{', compiled' if trainer.cfg.compile else ''}"


def _evaluate_main(args) -> int:
    from .checkpoint import CheckpointError, atomic_write_text
    from .data import DatasetNotFoundError
    from .evaluate import evaluate_run
    from .paths import DiskFullError, check_output_file

    try:
        # Checked before the evaluation, which may take long: its result used to be lost to a read-only --output.
        out = check_output_file(Path(args.output) if args.output else
                                Path(args.run_dir) / f"evaluation-{args.which}.json",
                                "--output" if args.output else "the default --output")
        res = evaluate_run(args.run_dir, args.which, data_dir=args.data_dir, ood_dir=args.ood_dir,
                           test_limit=args.test_limit, fgsm_eps=args.fgsm_eps, eval_batch_size=args.eval_batch_size,
                           threads=args.threads, device=args.device, precision=args.precision,
                           log=lambda m: print(m, file=sys.stderr))
    except (ValueError, TypeError, DatasetNotFoundError, CheckpointError) as exc:
        return error("evaluate", exc)
    text = json.dumps(res, indent=2)
    print(text)  # first: a failure to save below does not lose the result
    try:
        atomic_write_text(out, text + "\n")
    except DiskFullError as exc:
        error("evaluate", f"{exc}; the result is printed above")
        return 1
    return 0
