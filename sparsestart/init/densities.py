"""Layer-wise densities: how an overall density is split among the masked layers.

Which layers are masked
    Every ``nn.Linear`` and ``nn.Conv2d`` of the model (weights only: biases and
    normalisation parameters are never masked), as in the released code of both
    papers (Liu et al. 2022; Gadhikar et al. 2023). ``exclude`` removes layers by
    qualified name or glob pattern (``"features.0"``, ``"classifier"``,
    ``"*.shortcut.*"``); see :func:`sparsestart.nn.maskable_layers`. Layers are
    taken in registration order, which is forward order for every model of
    :mod:`sparsestart.models` and for sequentially built models; rules that
    single out the first or last layer (``uniform_plus``, ``erk_plus``,
    ``pyramidal``) rely on that order, never on layer names.

The budget
    The overall density ``d`` refers to the masked layers only: excluded layers
    stay dense and are simply not part of the budget (the whole model is
    therefore denser than ``d`` when something is excluded). With N_l weights in
    masked layer l and N = sum N_l, every rule returns densities p_l with
    0 < p_l <= 1 and sum_l round(p_l N_l) == round(d N) exactly: the real-valued
    targets of a rule are turned into integer counts k_l (largest remainder,
    never below one weight and never above N_l) and p_l = k_l / N_l is
    returned, so ER sampling of exactly round(p_l N_l) weights per layer (what
    :func:`sparsestart.init.er_indices` does) reproduces the budget to the
    weight. The only exception is a budget smaller than one weight per layer:
    every layer keeps at least one weight. Where a rule would give p_l > 1 the
    layer becomes dense and its surplus is redistributed among the others by the
    same rule until nothing exceeds 1 (the released code of both papers misses
    the budget there). The one deliberate exception is
    ``balanced`` with ``exact_budget=False``, the paper's own formula, kept for
    like-for-like comparisons with its tables.

See docs/densities.md for the rules, their options and a worked example.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.walk import infer_input_shape, maskable_layers
from ..selection import top_k_mask
from .sampling import check_density

__all__ = ["allocate_densities", "DISTRIBUTIONS", "layer_budget"]

#: Names accepted by :func:`allocate_densities`, with their options and defaults.
_OPTIONS: dict[str, dict] = {
    "uniform": {},
    "uniform_plus": {"last_min_density": 0.2},
    "er": {},
    "erk": {"power": 1.0},
    "erk_plus": {"last_density": 1.0, "power": 1.0},
    "balanced": {"exact_budget": True},
    "pyramidal": {},
    "snip": {"data": None, "loss_fn": None},
    "grasp": {"data": None, "loss_fn": None, "temperature": 200.0},
    "synflow": {"input_shape": None, "rounds": 100},
    "custom": {"densities": None, "rescale": False},
}
DISTRIBUTIONS = tuple(_OPTIONS)


# ---------------------------------------------------------------------------- public entry point
def allocate_densities(model: nn.Module, density: Optional[float], distribution: str = "erk", *,
                       exclude: Union[str, Iterable[str]] = (), block_size: int = 1,
                       **options) -> dict[str, float]:
    """Per-layer densities {qualified name: p_l} for the masked layers of ``model``, in forward order.

    density       overall density d in (0, 1] of the masked layers (``None`` only for
                  ``distribution="custom"``: take the given densities as they are)
    distribution  one of ``DISTRIBUTIONS``:

        uniform       p_l = d
        uniform_plus  first Conv2d dense, last Linear at least ``last_min_density``
                      (0.2), the rest uniform (Gale et al. 2019)
        er            p_l proportional to (n_in + n_out) / (n_in n_out), channel counts
                      (Mocanu et al. 2018)
        erk           p_l proportional to (sum of weight dims / product of weight dims)
                      ** ``power`` (Evci et al. 2020)
        erk_plus      last Linear at ``last_density`` (1.0: dense), ERK over the rest
                      (Liu et al. 2022); a model without Linear gets plain ERK
        balanced      the same number of weights in every layer, p_l = min(1, x / N_l)
                      (Gadhikar et al. 2023), x solved so the budget is exact;
                      ``exact_budget=False``: the paper's formula and released code,
                      x = d N / L, which loses the budget of saturated layers (CIFAR
                      VGG-16 at d = 0.1 gets 0.0794 overall)
        pyramidal     p_l = q ** l (l = 1 for the first layer), q solved by bisection
        snip          ratios of SNIP (Lee et al. 2019), ``data=(x, y)`` and optional
                      ``loss_fn`` (default cross-entropy)
        grasp         ratios of GraSP (Wang et al. 2020), ``data=(x, y)``, ``loss_fn``,
                      ``temperature`` (200); the paper uses ~10 samples per class
        synflow       ratios of SynFlow (Tanaka et al. 2020), data-free; ``input_shape``
                      (without batch; inferred for sparsestart.models) and ``rounds`` (100)
        custom        ``densities={name: p_l}`` for every masked layer; with a density,
                      their overall density must match it (within one weight per layer)
                      unless ``rescale=True`` scales them to the budget

    exclude       names or glob patterns of Linear/Conv2d layers to leave dense and
                  outside the budget
    block_size    b > 1 counts weights in b x b blocks (for ``format="bsr"``): the budget
                  is then exact in blocks, round(d N / b^2)

    snip, grasp and synflow score a deep copy of the model (its current weights and
    train/eval mode; synflow uses eval mode and float64), so the model itself is not
    modified. They give ratios only: positions are discarded and an ER structure is
    sampled with the resulting densities.
    """
    if not isinstance(distribution, str) or distribution not in _OPTIONS:
        raise ValueError(f"allocate_densities: unknown distribution {distribution!r}; "
                         f"valid names are {list(DISTRIBUTIONS)}")
    allowed = _OPTIONS[distribution]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"allocate_densities: distribution {distribution!r} takes no option {unknown[0]!r}; "
                        f"its options are {sorted(allowed) or 'none'}")
    opts = {**allowed, **options}
    if density is None:
        if distribution != "custom":
            raise ValueError(f"allocate_densities: density must be a number in (0, 1] for distribution "
                             f"{distribution!r}, got None (None is accepted only with 'custom')")
    else:
        density = check_density(density)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"allocate_densities: block_size must be a positive int, got {block_size!r}")

    layers = _masked_layers(model, exclude)
    names = [n for n, _ in layers]
    numel = [int(m.weight.numel()) for _, m in layers]
    unit = block_size * block_size
    if unit > 1:
        for (name, m), n in zip(layers, numel):
            rows, cols = m.weight.shape[0], n // m.weight.shape[0]
            if rows % block_size or cols % block_size:
                raise ValueError(f"allocate_densities: layer {name!r} has matrix shape ({rows}, {cols}), not a "
                                 f"multiple of block_size={block_size}")
    units = [n // unit for n in numel]

    if distribution == "custom":
        return _custom(names, numel, units, density, opts)

    budget_w = density * sum(numel)            # real budget in weights
    targets = _targets(distribution, model, layers, numel, budget_w, density, opts)  # real weights per layer
    K = round(density * sum(numel) / unit)
    if distribution == "balanced" and not opts["exact_budget"]:
        K = min(K, round(sum(targets) / unit))  # the paper's rule: the saturated layers' surplus is lost
    counts = _integerize([t / unit for t in targets], units, K)
    return {n: k / u for n, k, u in zip(names, counts, units)}


def layer_budget(model: nn.Module, density: float, *, exclude: Union[str, Iterable[str]] = ()) -> int:
    """round(d N): the number of weights the masked layers of ``model`` keep at overall density d."""
    density = check_density(density)
    return round(density * sum(int(m.weight.numel()) for _, m in _masked_layers(model, exclude)))


# ---------------------------------------------------------------------------- helpers
def _masked_layers(model: nn.Module, exclude) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"allocate_densities: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = maskable_layers(model, exclude)
    if not layers:
        raise ValueError("allocate_densities: the model has no nn.Linear or nn.Conv2d layer to mask "
                         f"(exclude={exclude!r} may have matched all of them)")
    return layers


def _kind(m: nn.Module) -> str:
    return "conv" if isinstance(m, nn.Conv2d) else "linear"


def _channels(m: nn.Module) -> tuple[int, int]:
    """(n_in, n_out): input and output channels (features for Linear)."""
    return int(m.weight.shape[1]), int(m.weight.shape[0])


def _scale_to_budget(raw: Sequence[float], numel: Sequence[int], budget: float) -> list[float]:
    """Densities p_l = min(1, eps * raw_l) with sum p_l N_l = budget.

    The solver of ALGORITHMS.md §1: eps = budget left / sum over free layers of
    raw_l N_l; every layer with eps * raw_l > 1 becomes dense and leaves the
    budget; repeat. eps only grows from one round to the next (a layer made
    dense had a share above its size), so a layer found saturated stays so and
    the loop ends after at most L rounds.
    """
    L = len(raw)
    dense = [False] * L
    eps = 0.0
    for _ in range(L + 1):
        free_mass = sum(raw[i] * numel[i] for i in range(L) if not dense[i])
        left = budget - sum(numel[i] for i in range(L) if dense[i])
        if free_mass <= 0:
            break
        eps = max(left, 0.0) / free_mass
        new = [i for i in range(L) if not dense[i] and eps * raw[i] > 1.0 + 1e-12]
        if not new:
            break
        for i in new:
            dense[i] = True
    return [1.0 if dense[i] else min(1.0, eps * raw[i]) for i in range(L)]


def _integerize(targets: Sequence[float], numel: Sequence[int], K: int) -> list[int]:
    """Integer counts 1 <= k_l <= N_l with sum k_l = K, each within one of its real target.

    Start from the floor of each target (clamped to [1, N_l]), then hand out the
    missing units by largest remainder, or take back surplus (only created by
    the one-weight minimum) from the most over-allocated layers.
    """
    L = len(targets)
    k = [min(n, max(1, math.floor(t + 1e-6))) for t, n in zip(targets, numel)]
    diff = K - sum(k)
    while diff > 0:
        cand = sorted((i for i in range(L) if k[i] < numel[i]), key=lambda i: (-(targets[i] - k[i]), i))
        if not cand:
            break
        for i in cand[:diff]:
            k[i] += 1
        diff = K - sum(k)
    while diff < 0:
        cand = sorted((i for i in range(L) if k[i] > 1), key=lambda i: (targets[i] - k[i], -numel[i], i))
        if not cand:
            break  # fewer weights than layers: every layer keeps one
        for i in cand[:-diff]:
            k[i] -= 1
        diff = K - sum(k)
    return k


def _fixed_plus_scaled(numel: Sequence[int], budget: float, fixed: dict[int, float],
                       raw: Sequence[float], rule: str) -> list[float]:
    """Targets (weights) when some layers have fixed demands and the rest follow ``raw`` scaling.

    If the fixed demands do not leave one weight for every other layer they are
    scaled down (with a warning); if the other layers all saturate, the surplus
    goes to the fixed layers (uniformly, capped at dense).
    """
    L = len(numel)
    others = [i for i in range(L) if i not in fixed]
    demand = sum(fixed.values())
    room = budget - len(others)
    if others and demand > room:
        scale = max(room, 0.0) / demand if demand else 0.0
        warnings.warn(f"{rule}: the budget of {budget:.0f} weights cannot hold the fixed layers' "
                      f"{demand:.0f} weights plus one weight per other layer; the fixed layers get "
                      f"{100 * scale:.1f}% of their demand", stacklevel=4)
        fixed = {i: d * scale for i, d in fixed.items()}
    elif not others and demand != budget:
        fixed_raw = [fixed[i] / numel[i] if numel[i] else 0.0 for i in range(L)]
        return [p * n for p, n in zip(_scale_to_budget(fixed_raw, numel, budget), numel)]
    t = [0.0] * L
    for i, d in fixed.items():
        t[i] = min(float(numel[i]), d)
    left = budget - sum(t)
    if others:
        p = _scale_to_budget([raw[i] for i in others], [numel[i] for i in others], left)
        for i, pi in zip(others, p):
            t[i] = pi * numel[i]
    surplus = budget - sum(t)
    if surplus > 1e-6 * max(budget, 1.0) and fixed:
        idx = list(fixed)
        # Spread the surplus over the fixed layers uniformly (each up to dense).
        room_f = [numel[i] - t[i] for i in idx]
        extra = _scale_to_budget([1.0] * len(idx), room_f, surplus) if sum(room_f) > 0 else [0.0] * len(idx)
        for i, e, r in zip(idx, extra, room_f):
            t[i] += e * r
    return t


def _targets(distribution: str, model: nn.Module, layers, numel, budget: float, density: float,
             opts: dict) -> list[float]:
    """Real-valued weights per layer for every rule except custom."""
    L = len(layers)
    if distribution == "uniform":
        return [density * n for n in numel]
    if distribution == "er":
        raw = [(a + b) / (a * b) for a, b in (_channels(m) for _, m in layers)]
        return [p * n for p, n in zip(_scale_to_budget(raw, numel, budget), numel)]
    if distribution in ("erk", "erk_plus"):
        power = _real_option(opts, "power", distribution)
        raw = [(sum(m.weight.shape) / math.prod(m.weight.shape)) ** power for _, m in layers]
        if distribution == "erk":
            return [p * n for p, n in zip(_scale_to_budget(raw, numel, budget), numel)]
        last_density = _unit_interval_option(opts, "last_density", distribution)
        lin = [i for i, (_, m) in enumerate(layers) if _kind(m) == "linear"]
        if not lin:
            return [p * n for p, n in zip(_scale_to_budget(raw, numel, budget), numel)]
        last = lin[-1]
        return _fixed_plus_scaled(numel, budget, {last: last_density * numel[last]}, raw, "erk_plus")
    if distribution == "uniform_plus":
        last_min = _unit_interval_option(opts, "last_min_density", distribution)
        convs = [i for i, (_, m) in enumerate(layers) if _kind(m) == "conv"]
        lins = [i for i, (_, m) in enumerate(layers) if _kind(m) == "linear"]
        fixed: dict[int, float] = {}
        if convs:
            fixed[convs[0]] = float(numel[convs[0]])
        rest = [i for i in range(L) if i not in fixed]
        rest_n = sum(numel[i] for i in rest)
        u = (budget - sum(fixed.values())) / rest_n if rest_n else 1.0
        if lins and u < last_min:
            fixed[lins[-1]] = last_min * numel[lins[-1]]
        return _fixed_plus_scaled(numel, budget, fixed, [1.0] * L, "uniform_plus")
    if distribution == "balanced":
        exact = opts["exact_budget"]
        if not isinstance(exact, bool):
            raise ValueError(f"allocate_densities: balanced option exact_budget must be a bool, got {exact!r}")
        if not exact:  # Gadhikar et al. (2023): x = d N / L, p_l = min(1, x / N_l)
            x = budget / L
            return [min(float(n), x) for n in numel]
        return [p * n for p, n in zip(_scale_to_budget([1.0 / n for n in numel], numel, budget), numel)]
    if distribution == "pyramidal":
        q = pyramidal_ratio(numel, budget)
        return [n * q ** (i + 1) for i, n in enumerate(numel)]
    if distribution in ("snip", "grasp"):
        return [float(k) for k in _data_scores_kept(distribution, model, layers, round(budget), opts)]
    if distribution == "synflow":
        return [float(k) for k in _synflow_kept(model, layers, density, opts)]
    raise AssertionError(distribution)  # pragma: no cover


def pyramidal_ratio(numel: Sequence[int], budget: float) -> float:
    """The q in (0, 1] with sum_l N_l q^l = budget (l from 1), by bisection (the sum increases in q)."""
    total = float(sum(numel))
    if budget >= total:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = sum(n * mid ** (i + 1) for i, n in enumerate(numel))
        if s < budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def _real_option(opts, key, distribution) -> float:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"allocate_densities: {distribution} option {key} must be a finite number, got {v!r}")
    return float(v)


def _unit_interval_option(opts, key, distribution) -> float:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (0.0 < float(v) <= 1.0):
        raise ValueError(f"allocate_densities: {distribution} option {key} must lie in (0, 1], got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------- custom
def _custom(names, numel, units, density, opts) -> dict[str, float]:
    given = opts["densities"]
    if not isinstance(given, dict):
        raise ValueError("allocate_densities: distribution 'custom' needs option densities={layer name: density} "
                         f"for the masked layers {names}, got {given!r}")
    missing = [n for n in names if n not in given]
    extra = sorted(set(given) - set(names))
    if missing:
        raise ValueError(f"allocate_densities: custom densities miss layer {missing[0]!r} "
                         f"(missing: {missing}); the masked layers are {names}")
    if extra:
        raise ValueError(f"allocate_densities: custom densities name {extra[0]!r}, which is not a masked layer "
                         f"(extra: {extra}); the masked layers are {names}")
    p = [check_density(given[n], f"densities[{n!r}]") for n in names]
    unit = numel[0] // units[0] if units[0] else 1
    if density is None:
        counts = [min(u, max(1, round(pi * u))) for pi, u in zip(p, units)]
        return {n: k / u for n, k, u in zip(names, counts, units)}
    budget = density * sum(numel)
    if opts["rescale"]:
        targets = [pi * n for pi, n in zip(_scale_to_budget(p, numel, budget), numel)]
    else:
        got = sum(pi * n for pi, n in zip(p, numel))
        if abs(got - budget) > len(names) * unit:
            raise ValueError(f"allocate_densities: custom densities give overall density {got / sum(numel):.6g} "
                             f"but density={density}; pass density=None to use them as given or "
                             f"rescale=True to scale them to the budget")
        targets = [pi * n for pi, n in zip(p, numel)]
    K = round(budget / unit)
    counts = _integerize([t / unit for t in targets], units, K)
    return {n: k / u for n, k, u in zip(names, counts, units)}


# ---------------------------------------------------------------------------- data-driven ratios
def _check_data(distribution: str, opts) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    data = opts["data"]
    if data is None:
        raise ValueError(f"allocate_densities: distribution {distribution!r} needs a data batch: pass "
                         f"data=(inputs, targets) (one minibatch; GraSP uses ~10 samples per class)")
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise ValueError(f"allocate_densities: data must be a pair of tensors (inputs, targets), got "
                         f"{type(data).__name__}")
    loss_fn = opts["loss_fn"] or F.cross_entropy
    if not callable(loss_fn):
        raise TypeError(f"allocate_densities: loss_fn must be callable (output, target) -> loss, got {loss_fn!r}")
    return data[0], data[1], loss_fn


def _scoring_copy(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, list[torch.Tensor]]:
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("allocate_densities: snip, grasp and synflow need real weights; the model is on the "
                         "meta device")
    c = copy.deepcopy(model)
    weights = [c.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    return c, weights


def _layer_counts(keep: torch.Tensor, numel: Sequence[int]) -> list[int]:
    return torch.stack([part.sum() for part in torch.split(keep, list(numel))]).tolist()  # one host sync


def _data_scores_kept(distribution: str, model, layers, K: int, opts) -> list[int]:
    x, y, loss_fn = _check_data(distribution, opts)
    names = [n for n, _ in layers]
    numel = [int(m.weight.numel()) for _, m in layers]
    c, weights = _scoring_copy(model, names)
    # The batch goes where the model is (a model on a GPU scored with a batch from a CPU loader).
    x, y = x.to(weights[0].device), y.to(weights[0].device)
    with torch.enable_grad():
        if distribution == "snip":
            loss = loss_fn(c(x), y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            scores = [(w.detach() * (g if g is not None else torch.zeros_like(w))).abs().flatten()
                      for w, g in zip(weights, grads)]
            keep = top_k_mask(torch.cat(scores).nan_to_num(0.0), K)
        else:
            T = _real_option(opts, "temperature", "grasp")
            if T <= 0:
                raise ValueError(f"allocate_densities: grasp option temperature must be > 0, got {T}")
            g = torch.autograd.grad(loss_fn(c(x) / T, y), weights, allow_unused=True)
            g = [gi.detach() if gi is not None else torch.zeros_like(w) for gi, w in zip(g, weights)]
            z = torch.autograd.grad(loss_fn(c(x) / T, y), weights, create_graph=True, allow_unused=True)
            dot = sum((zi * gi).sum() for zi, gi in zip(z, g) if zi is not None)
            hg = torch.autograd.grad(dot, weights, allow_unused=True) if torch.is_tensor(dot) and dot.requires_grad \
                else [None] * len(weights)
            # GraSP removes the weights of largest -w * Hg: keep the K smallest.
            scores = [(-(w.detach() * (h if h is not None else torch.zeros_like(w)))).flatten()
                      for w, h in zip(weights, hg)]
            keep = top_k_mask(-torch.cat(scores).nan_to_num(0.0), K)
    return _layer_counts(keep, numel)


def _synflow_kept(model: nn.Module, layers, density: float, opts) -> list[int]:
    shape = opts["input_shape"] or infer_input_shape(model)
    if shape is None:
        raise ValueError("allocate_densities: distribution 'synflow' needs input_shape=(C, H, W) (or (features,)) "
                         "without the batch dimension")
    shape = tuple(int(s) for s in shape)
    rounds = opts["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"allocate_densities: synflow option rounds must be a positive int, got {rounds!r}")
    names = [n for n, _ in layers]
    numel = [int(m.weight.numel()) for _, m in layers]
    N = sum(numel)
    c, weights = _scoring_copy(model, names)
    c = c.double().eval()
    weights = [c.get_submodule(n).weight for n in names]
    with torch.no_grad():
        for t in c.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    w0 = [w.detach().clone() for w in weights]
    keep = torch.ones(N, dtype=torch.bool, device=w0[0].device)
    x = torch.ones((1, *shape), dtype=torch.float64, device=w0[0].device)
    with torch.enable_grad():
        for e in range(1, rounds + 1):
            masks = torch.split(keep, numel)
            with torch.no_grad():
                for w, w_init, m in zip(weights, w0, masks):
                    w.copy_(w_init * m.view_as(w_init))
            R = c(x).sum()
            grads = torch.autograd.grad(R, weights, allow_unused=True)
            scores = torch.cat([(w.detach() * (g if g is not None else torch.zeros_like(w))).abs().flatten()
                                for w, g in zip(weights, grads)]).nan_to_num(0.0)
            scores[~keep] = -1.0  # pruned weights stay pruned
            keep = top_k_mask(scores, round(N * density ** (e / rounds)))
    return _layer_counts(keep, numel)
