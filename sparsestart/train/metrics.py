"""Evaluation beyond accuracy (ALGORITHMS.md §5): NLL, calibration, OoD detection, FGSM robustness, FLOPs.

Pure metric functions (tensors in, float out) come first; :func:`evaluate_model`
runs a model over a test split and the out-of-distribution sets.

Definitions
    accuracy       top-1 fraction correct
    nll            mean of -log softmax(logits)[true class]
    ece            15 equal-width confidence bins (lo, hi] over [0, 1],
                   sum_b (n_b / n) |acc_b - conf_b| (Guo et al. 2017); confidence is
                   the maximum softmax probability
    ood_auroc      area under the ROC curve separating in-distribution test images
                   (positives) from an OoD set by the maximum softmax probability
                   (sklearn.metrics.roc_auc_score); OoD sets: Gaussian noise with the
                   training set's per-channel mean and std clipped to [0, 1], uniform
                   noise U[0, 1], and a real shifted set (each as many images as the
                   test set; a seeded subset of a larger shifted set) (Fashion-MNIST: scikit-learn's
                   digits at 28x28; digits: the Fashion-MNIST test set when installed;
                   CIFAR: the test split of a dataset given by --ood-dir, else skipped)
    fgsm_accuracy  accuracy on x' = clip(x + eps * sign(grad_x CE), 0, 1) with x in
                   [0, 1] pixel space before normalisation, eps = 8/255

Devices: the model passes (logits, FGSM gradients) run on the model's device,
batch by batch, whatever device the images are on; the noise images are drawn
from a seeded CPU generator (the same on every device). The per-image logits
then come to the CPU for the reductions (accuracy, NLL, ECE, AUROC): a few
floats per image, reduced in float64 in a fixed order, so the metrics do not
depend on atomics of GPU reductions. ``autocast`` (a function returning a
context manager, e.g. bf16 autocast) is entered around every forward pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["accuracy", "nll", "ece", "max_softmax", "ood_auroc", "predict_logits", "fgsm_accuracy", "model_device",
           "noise_sets", "evaluate_model", "forward_flops", "basic_metrics"]


# ---------------------------------------------------------------------------------------------- pure metrics
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of logits (or probabilities) [n, classes] against labels [n]."""
    if logits.shape[0] == 0:
        return float("nan")
    return float((logits.argmax(dim=1) == labels).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits)."""
    if logits.shape[0] == 0:
        return float("nan")
    return float(F.cross_entropy(logits.double(), labels.long(), reduction="mean"))


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (lo, hi] of the top-class probability."""
    if probs.shape[0] == 0:
        return float("nan")
    probs = probs.double()
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 joins bin 0.
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    n = conf.numel()
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    nonempty = count > 0
    gap = (acc_sum[nonempty] / count[nonempty] - conf_sum[nonempty] / count[nonempty]).abs()
    return float((count[nonempty] / n * gap).sum())


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=1).max(dim=1).values


def ood_auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """AUROC of in-distribution (label 1) vs OoD (label 0) by score (higher = more in-distribution)."""
    from sklearn.metrics import roc_auc_score

    if in_scores.numel() == 0 or out_scores.numel() == 0:
        return float("nan")
    y = torch.cat([torch.ones(in_scores.numel()), torch.zeros(out_scores.numel())]).numpy()
    s = torch.cat([in_scores.detach().double().flatten().cpu(), out_scores.detach().double().flatten().cpu()]).numpy()
    return float(roc_auc_score(y, s))


# ---------------------------------------------------------------------------------------------- model passes
def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


_NO_AUTOCAST: Callable[[], ContextManager] = contextlib.nullcontext


@torch.no_grad()
def predict_logits(model: nn.Module, images, batch_size: int = 256,
                   autocast: Optional[Callable[[], ContextManager]] = None) -> torch.Tensor:
    """Float32 logits [n, classes] in eval mode, on the CPU; ``images`` is a float tensor or a callable
    slice -> tensor, on any device (batches move to the model's device)."""
    get = images if callable(images) else (lambda s: images[s])
    n = images_len(images)
    dev = model_device(model)
    amp = autocast or _NO_AUTOCAST
    was_training = model.training
    model.eval()
    try:
        outs = []
        for s in _batches(n, batch_size):
            x = get(s).to(dev)
            with amp():
                outs.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(outs).cpu() if outs else torch.empty(0, 0)


def images_len(images) -> int:
    return images.n if callable(images) and hasattr(images, "n") else len(images)


class _Pixels:
    """Lazy float view of a Split's images (avoids holding all test pixels as float at once)."""

    def __init__(self, split):
        self.split, self.n = split, len(split)

    def __call__(self, s):
        return self.split.pixels(s)


def fgsm_accuracy(model: nn.Module, images, labels: torch.Tensor, eps: float = 8 / 255,
                  batch_size: int = 256, autocast: Optional[Callable[[], ContextManager]] = None) -> float:
    """Accuracy under a one-step FGSM attack of size ``eps`` in [0, 1] pixel space (model in eval mode).

    ``model`` must take [0, 1] pixels (normalisation inside, see NormalizedModel).
    Parameters are frozen during the attack so that no weight gradient is computed.
    Runs on the model's device (images and labels may be elsewhere); the
    perturbation is computed in float32 pixel space also under ``autocast``.
    """
    get = images if callable(images) else (lambda s: images[s])
    n = images_len(images)
    if n == 0:
        return float("nan")
    dev = model_device(model)
    amp = autocast or _NO_AUTOCAST
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    correct = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        hits = torch.zeros((), dtype=torch.int64, device=dev)  # read once at the end: no sync per batch
        for s in _batches(n, batch_size):
            x = get(s).to(dev).float().clone().requires_grad_(True)
            y = labels[s].to(dev)
            with torch.enable_grad():
                # Sum, not mean: the sign is the same and small gradients do not underflow.
                with amp():
                    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
            x_adv = (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0)
            with torch.no_grad(), amp():
                hits += (model(x_adv).argmax(dim=1) == y).sum()
        correct = int(hits)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return correct / n


def noise_sets(shape, n: int, mean, std, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian (training mean/std per channel, clipped to [0, 1]) and uniform U[0, 1] noise images
    (on the CPU, from a seeded CPU generator: the same images for a run on any device)."""
    g = torch.Generator().manual_seed(int(seed))
    c, h, w = shape
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    gauss = (m + sd * torch.randn((n, c, h, w), generator=g)).clamp_(0.0, 1.0)
    uniform = torch.rand((n, c, h, w), generator=g)
    return {"gaussian": gauss, "uniform": uniform}


def basic_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """accuracy, nll and ece of logits (reduced on the CPU, see the module's docstring)."""
    logits, labels = logits.detach().cpu(), labels.cpu()
    return dict(accuracy=accuracy(logits, labels), nll=nll(logits, labels),
                ece=ece(torch.softmax(logits.double(), dim=1), labels))


def evaluate_model(model: nn.Module, test, *, mean, std, shifted: Optional[tuple] = None, fgsm_eps: float = 8 / 255,
                   batch_size: int = 256, seed: int = 0, fgsm: bool = True, ood: bool = True,
                   progress: Optional[Callable[[str], None]] = None,
                   autocast: Optional[Callable[[], ContextManager]] = None) -> dict:
    """All §5 metrics of ``model`` (taking [0, 1] pixels) on the Split ``test``.

    ``shifted`` = (name, float images [n, C, H, W] in [0, 1]) or (None, reason it is skipped).
    The model passes run on the model's device (``test`` may be held there or on
    the CPU), inside ``autocast()`` when given.
    """
    say = progress or (lambda msg: None)
    pixels = _Pixels(test)
    say("test set")
    logits = predict_logits(model, pixels, batch_size, autocast)
    out = basic_metrics(logits, test.labels)
    out["n"] = len(test)
    if ood:
        msp_in = max_softmax(logits)
        shape = tuple(test.images.shape[1:])
        aur = {}
        for name, x in noise_sets(shape, len(test), mean, std, seed).items():
            say(f"OoD {name} noise")
            aur[name] = ood_auroc(msp_in, max_softmax(predict_logits(model, x, batch_size, autocast)))
        shifted_name, shifted_x = shifted if shifted is not None else (None, "no shifted set")
        if shifted_name is not None:
            if len(shifted_x) > len(test):
                # As many OoD images as test images (a seeded subset): balanced AUROC, bounded cost.
                keep = torch.randperm(len(shifted_x), generator=torch.Generator().manual_seed(int(seed)))[:len(test)]
                shifted_x = shifted_x[keep]
            say(f"OoD shifted set ({shifted_name}, {len(shifted_x)} images)")
            aur["shifted"] = ood_auroc(msp_in, max_softmax(predict_logits(model, shifted_x, batch_size, autocast)))
            out["ood_shifted_set"] = shifted_name
        else:
            aur["shifted"] = None
            out["ood_shifted_set"] = None
            out["ood_shifted_skipped"] = shifted_x
        out["ood_auroc"] = aur
    if fgsm:
        say(f"FGSM eps={fgsm_eps:.4g}")
        out["fgsm_eps"] = fgsm_eps
        out["fgsm_accuracy"] = fgsm_accuracy(model, pixels, test.labels, fgsm_eps, batch_size, autocast)
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def forward_flops(net: nn.Module, input_shape) -> dict:
    """Per-sample multiply-adds of every Linear/Conv2d (sparse: stored nonzeros only) via forward hooks.

    Returns {"sparse": int, "dense": int, "layers": [rows of sparsestart.summary]}.
    """
    from ..nn import summary

    s = summary(net, tuple(int(v) for v in input_shape))
    t = s.total
    return {"sparse": int(t["sparse_flops"]), "dense": int(t["dense_flops"]), "summary": s}

