"""``sparsestart demo``: a one-minute tour — sparsify an MLP, train it on real data, report size and accuracy.

Uses scikit-learn's bundled digits (8x8 images, no download). The full training
system (``sparsestart train``) builds on the same pieces.
"""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

import sparsestart


def run(density: float = 0.1, epochs: int = 30, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1500], perm[1500:]
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    sparsestart.sparsify(model, density, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train))].split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    s = sparsestart.summary(model)
    return dict(summary=s, accuracy=acc, seconds=seconds, density=density, epochs=epochs)


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a sparse MLP on scikit-learn's digits and report size and accuracy")
    p.add_argument("--density", type=float, default=0.1, help="fraction of weights kept, in (0, 1] (default 0.1)")
    p.add_argument("--epochs", type=int, default=30, help="at least 1 (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_main)


def _check(args) -> None:
    """ValueError naming the option, unless --density lies in (0, 1] and --epochs is at least 1."""
    if not (math.isfinite(args.density) and 0.0 < args.density <= 1.0):
        raise ValueError(f"--density: {args.density!r} is outside the accepted range (0, 1]")
    if args.epochs < 1:
        raise ValueError(f"--epochs: {args.epochs!r} is outside the accepted range [1, inf]")


def _main(args) -> int:
    try:
        _check(args)
    except ValueError as exc:
        print(f"sparsestart demo: error: {exc}", file=sys.stderr)
        return 2
    r = run(args.density, args.epochs, args.seed)
    print(r["summary"])
    t = r["summary"].total
    print(f"\nstored bytes: {t['sparse_bytes']} sparse vs {t['dense_bytes']} dense "
          f"({t['sparse_bytes'] / t['dense_bytes']:.2f}x); backend: "
          f"{'cpu (C++)' if sparsestart.ops.NATIVE_AVAILABLE else 'reference (pure PyTorch)'}")
    print(f"test accuracy after {r['epochs']} epochs at density {r['density']}: {r['accuracy']:.3f} "
          f"({r['seconds']:.1f} s of training)")
    return 0
