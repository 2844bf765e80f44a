"""Flow repair: make every unit of every sparse layer connected (ALGORITHMS.md §2).

In each SparseLinear/SparseConv2d every output unit (row; output channel of a
convolution, counting the whole kernel) needs in-degree >= 1 and every input
unit (input feature; input channel of a convolution) out-degree >= 1. An ER
mask at high sparsity leaves some units without any edge; such a unit is
dead: nothing flows through it, forward or backward.

Methods
    random_addition  connect each dead unit by one new edge at a uniformly
                     random position of its row (output unit) or of its
                     column block (input channel: random output row and kernel
                     offset).
    rejection        redraw the edges of each dead unit: the number of edges is
                     drawn from Binomial(positions, p_l) conditioned on >= 1
                     (p_l the layer density) and placed uniformly in the unit's
                     row or column block, i.e. the unit's ER sample is rejected
                     until it has an edge.

Output units are repaired first, then the input units still dead.

Two counts
    ``FlowReport.total`` is the number of edges (weights) added, what the text
    of Gadhikar et al. (2023, App. A.1) says Tables 6-7 report. The tables
    print something else: their released code
    (ER_DST/sparselearning/core.py, ``Masking.flow_preservation``) adds
    ``(degree == 0).any().sum()`` per layer and direction, i.e. one per
    (layer, direction) pair with at least one dead unit, at most 2 x the masked
    layers (34 for VGG-19, 108 for their 54-layer CIFAR ResNet-50).
    ``FlowReport.flag_count`` is that count (``LayerFlow.flags`` per layer,
    ``FlowReport.max_flags`` its maximum); with it the tables are reproduced
    cell by cell (docs/flow_repair.md). Both are computed from the dead units
    before any repair, as the released code does.
With ``keep_budget=True`` every added edge is paid for by removing a random
existing edge of the same layer whose output unit and input unit both keep
degree >= 1 (so no new dead unit appears); if the layer has too few such edges
(e.g. fewer weights than units) the remainder stays added and is reported as
``over_budget``. All edits go through the formats' ``drop``/``grow`` (drop first,
then grow); when the layer lacks free capacity its structure is rebuilt with a
larger capacity (values kept). New entries get values drawn from the layer's
existing values with random signs (``init="match"``) or zero (``init="zeros"``).

BSR layers are repaired on blocks: a block row is an output unit (all b rows of
a stored block row have in-degree >= 1), an input channel is alive when a stored
block covers one of its columns, and the edges added are counted in weights
(b x b per block).

Cross-layer disconnection
    A unit can be alive in its layer yet useless: every outgoing edge leads to a
    unit of the next layer that itself has no path to the output. The report
    counts such units (``disconnected``, before repair, and
    ``disconnected_after``). This needs to know which layer feeds which: one
    forward pass at batch size 1 (``input_shape``, inferred for
    sparsestart.models) records the autograd graph, and a pair of layers (l, s)
    is analysed when s's input comes from l's output through single-input,
    single-consumer operations only (activations, normalisation, pooling,
    dropout, flatten); s's input unit i then belongs to l's output unit
    i // (in_units(s) / out_units(l)) (channel-major flatten). Units feeding a
    residual addition, a concatenation or several consumers are not analysed
    (the report gives None for layers whose outputs have no analysable
    successor) -- in a ResNet only conv1 -> conv2 inside a block qualifies.
    Within a purely sequential stack, local repair removes every cross-layer
    disconnection, since every unit then has an outgoing edge to a unit that has
    one too, up to the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nn.modules import SparseLayer
from ..nn.walk import infer_input_shape, is_maskable
from .sampling import sample_without_replacement

__all__ = ["repair_flow", "FlowReport", "LayerFlow", "METHODS"]

METHODS = ("random_addition", "rejection")


@dataclass
class LayerFlow:
    """Flow repair of one layer. Edge counts are in weights (b*b per BSR block)."""

    name: str
    edges_added: int = 0
    edges_removed: int = 0
    over_budget: int = 0          # added weights not compensated by a removal (keep_budget=True)
    dead_outputs: int = 0         # output units with in-degree 0 before repair
    dead_inputs: int = 0          # input units with out-degree 0 before repair
    disconnected: Optional[int] = None        # alive in the layer, no path to the output (before repair)
    disconnected_after: Optional[int] = None

    @property
    def flags(self) -> int:
        """0-2: whether any output unit, plus whether any input unit, was dead before repair (the count
        Gadhikar et al.'s Tables 6-7 print per layer)."""
        return int(self.dead_outputs > 0) + int(self.dead_inputs > 0)


@dataclass
class FlowReport:
    """What :func:`repair_flow` did; ``str()`` gives a table."""

    method: str
    keep_budget: bool
    layers: list[LayerFlow] = field(default_factory=list)
    cross_layer: str = "not analysed"

    @property
    def edges_added(self) -> dict[str, int]:
        return {lf.name: lf.edges_added for lf in self.layers}

    @property
    def edges_removed(self) -> dict[str, int]:
        return {lf.name: lf.edges_removed for lf in self.layers}

    @property
    def total(self) -> int:
        """Edges (weights) added over all layers."""
        return sum(lf.edges_added for lf in self.layers)

    @property
    def flag_count(self) -> int:
        """(layer, direction) pairs with at least one dead unit before repair: the count printed in
        Gadhikar et al.'s Tables 6-7 (their code sums ``(degree == 0).any()``), at most ``max_flags``."""
        return sum(lf.flags for lf in self.layers)

    @property
    def max_flags(self) -> int:
        """2 x the number of sparse layers: the largest possible ``flag_count``."""
        return 2 * len(self.layers)

    @property
    def disconnected(self) -> dict[str, Optional[int]]:
        return {lf.name: lf.disconnected for lf in self.layers}

    @property
    def total_disconnected(self) -> int:
        return sum(lf.disconnected or 0 for lf in self.layers)

    @property
    def total_disconnected_after(self) -> int:
        return sum(lf.disconnected_after or 0 for lf in self.layers)

    @property
    def total_dead(self) -> int:
        return sum(lf.dead_outputs + lf.dead_inputs for lf in self.layers)

    def __str__(self) -> str:
        def fmt(v):
            return "-" if v is None else str(v)
        head = (f"{'layer':<28} {'dead out':>8} {'dead in':>8} {'flags':>5} {'added':>8} {'removed':>8} "
                f"{'over':>6} {'discon.':>8} {'after':>6}")
        lines = [f"flow repair: method={self.method}, keep_budget={self.keep_budget}, "
                 f"cross-layer: {self.cross_layer}", head, "-" * len(head)]
        for lf in self.layers:
            lines.append(f"{lf.name:<28} {lf.dead_outputs:>8} {lf.dead_inputs:>8} {lf.flags:>5} {lf.edges_added:>8} "
                         f"{lf.edges_removed:>8} {lf.over_budget:>6} {fmt(lf.disconnected):>8} "
                         f"{fmt(lf.disconnected_after):>6}")
        lines.append(f"{'total':<28} {sum(l.dead_outputs for l in self.layers):>8} "
                     f"{sum(l.dead_inputs for l in self.layers):>8} {self.flag_count:>5} {self.total:>8} "
                     f"{sum(self.edges_removed.values()):>8} {sum(l.over_budget for l in self.layers):>6} "
                     f"{self.total_disconnected:>8} {self.total_disconnected_after:>6}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- public entry point
def repair_flow(model: nn.Module, method: str = "random_addition", keep_budget: bool = True,
                seed: Optional[int] = None, *, input_shape=None, init: str = "match") -> FlowReport:
    """Repair dead units of every SparseLinear/SparseConv2d of ``model`` in place; see the module docstring.

    method       "random_addition" or "rejection"
    keep_budget  remove one random edge (between units of degree > 1) per added edge
    seed         seed of the random choices (None: torch's global RNG)
    input_shape  per-sample input shape for the cross-layer analysis (inferred for
                 sparsestart.models models; without it that analysis is skipped)
    init         values of new entries: "match" (drawn from the layer's values, random
                 sign) or "zeros"
    """
    if method not in METHODS:
        raise ValueError(f"repair_flow: method must be one of {list(METHODS)}, got {method!r}")
    if not isinstance(keep_budget, bool):
        raise TypeError(f"repair_flow: keep_budget must be a bool, got {keep_budget!r}")
    if init not in ("match", "zeros"):
        raise ValueError(f"repair_flow: init must be 'match' or 'zeros', got {init!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLayer)]
    if not layers:
        raise ValueError("repair_flow: the model has no SparseLinear/SparseConv2d layer; call sparsify first")
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    report = FlowReport(method=method, keep_budget=keep_budget)

    graph, reason = _trace(model, input_shape)
    report.cross_layer = reason
    before = _disconnected(model, graph) if graph is not None else {}

    for name, layer in layers:
        lf = LayerFlow(name=name)
        kk = math.prod(layer.weight_shape[2:]) if len(layer.weight_shape) > 2 else 1
        plan = _plan(layer.sparse_weight, kk, method, keep_budget, gen)
        _apply(layer, plan, init, gen)
        b2 = layer.block_size ** 2
        lf.edges_added = len(plan["add_rows"]) * b2
        lf.edges_removed = len(plan["drop"]) * b2
        lf.over_budget = (len(plan["add_rows"]) - len(plan["drop"])) * b2 if keep_budget else 0
        lf.dead_outputs, lf.dead_inputs = plan["dead_outputs"], plan["dead_inputs"]
        report.layers.append(lf)

    if graph is not None:
        after = _disconnected(model, graph)
        for lf in report.layers:
            lf.disconnected, lf.disconnected_after = before.get(lf.name), after.get(lf.name)
    return report


# ---------------------------------------------------------------------------- per-layer repair
def _binomial_at_least_one(n: int, p: float, gen) -> int:
    """A draw of Binomial(n, p) conditioned on being >= 1."""
    if n <= 0:
        return 0
    if p >= 1.0:
        return n
    p0 = (1.0 - p) ** n
    if p0 < 0.5:  # rejection: fewer than two draws expected
        while True:
            k = int(torch.binomial(torch.tensor([float(n)], dtype=torch.float64),
                                   torch.tensor([p], dtype=torch.float64), generator=gen))
            if k >= 1:
                return k
    target = p0 + float(torch.rand((), generator=gen, dtype=torch.float64)) * (1.0 - p0)
    pmf = cdf = p0
    k = 0
    ratio = p / (1.0 - p)
    while cdf < target and k < n:
        pmf *= (n - k) / (k + 1) * ratio
        k += 1
        cdf += pmf
    return max(k, 1)


def _randint(n: int, gen) -> int:
    return int(torch.randint(0, n, (1,), generator=gen))


def _plan(mat, kk: int, method: str, keep_budget: bool, gen) -> dict:
    """Positions to add and CSR positions to drop so that no (block) row or input channel is empty."""
    R, Q = mat.grid
    b = mat.block_size
    K = mat.shape[1]
    cin = K // kk
    # The plan is sequential bookkeeping over dead units with a CPU generator: the coordinates come
    # to the CPU once (a structure on a GPU gets the same repair as on the CPU); only the plan goes back.
    rows, cols = (t.cpu() for t in mat.coo()[:2])
    nnz = rows.numel()
    # Input channels covered by each (block) column, and block columns of each channel.
    ch_lo = [(q * b) // kk for q in range(Q)]
    ch_hi = [((q + 1) * b - 1) // kk for q in range(Q)]
    rowdeg = torch.bincount(rows, minlength=R).tolist()
    coldeg = torch.bincount(cols, minlength=Q)
    diff = torch.zeros(cin + 1, dtype=torch.long)
    diff.index_add_(0, torch.tensor(ch_lo, dtype=torch.long), coldeg)
    diff.index_add_(0, torch.tensor(ch_hi, dtype=torch.long) + 1, -coldeg)
    chdeg = torch.cumsum(diff, 0)[:cin].tolist()

    p = nnz / (R * Q) if R * Q else 1.0
    p = p if p > 0 else 1.0 / max(R * Q, 1)
    add_rows: list[int] = []
    add_cols: list[int] = []

    def add(r: int, q: int) -> None:
        add_rows.append(r)
        add_cols.append(q)
        rowdeg[r] += 1
        for c in range(ch_lo[q], ch_hi[q] + 1):
            chdeg[c] += 1

    dead_rows = [r for r in range(R) if rowdeg[r] == 0]
    dead_outputs = len(dead_rows) * b
    dead_inputs = sum(1 for c in range(cin) if chdeg[c] == 0)
    for r in dead_rows:
        if method == "random_addition":
            add(r, _randint(Q, gen))
        else:
            for q in sample_without_replacement(Q, _binomial_at_least_one(Q, p, gen), gen).tolist():
                add(r, q)
    for c in range(cin):
        if chdeg[c] != 0:
            continue  # alive, possibly revived by an earlier addition
        q_lo, q_hi = (c * kk) // b, ((c + 1) * kk - 1) // b
        nq = q_hi - q_lo + 1
        if method == "random_addition":
            add(_randint(R, gen), q_lo + _randint(nq, gen))
        else:
            for flat in sample_without_replacement(R * nq, _binomial_at_least_one(R * nq, p, gen), gen).tolist():
                add(flat // nq, q_lo + flat % nq)

    drop: list[int] = []
    n_rm = len(add_rows) if keep_budget else 0
    if n_rm:
        perm = torch.randperm(nnz, generator=gen)
        start = 0
        while len(drop) < n_rm and start < nnz:
            chunk = perm[start:start + max(4 * (n_rm - len(drop)), 256)]
            start += chunk.numel()
            for pos, r, q in zip(chunk.tolist(), rows[chunk].tolist(), cols[chunk].tolist()):
                if rowdeg[r] > 1 and all(chdeg[c] > 1 for c in range(ch_lo[q], ch_hi[q] + 1)):
                    drop.append(pos)
                    rowdeg[r] -= 1
                    for c in range(ch_lo[q], ch_hi[q] + 1):
                        chdeg[c] -= 1
                    if len(drop) == n_rm:
                        break
    return dict(add_rows=add_rows, add_cols=add_cols, drop=drop, dead_outputs=dead_outputs,
                dead_inputs=dead_inputs)


@torch.no_grad()
def _apply(layer, plan: dict, init: str, gen) -> None:
    """Drop, then grow (rebuilding the structure with more capacity when needed), then set new values."""
    n_add = len(plan["add_rows"])
    if not n_add and not plan["drop"]:
        return
    mat = layer.sparse_weight
    dev = mat.values.device
    _, _, slots = mat.coo()
    pool = mat.values.detach()[slots].flatten()
    if plan["drop"]:
        mat.drop(torch.tensor(plan["drop"], dtype=torch.long, device=dev))
    if not n_add:
        return
    if mat.nnz + n_add > mat.capacity:
        layer.set_capacity(mat.nnz + n_add)
        mat = layer.sparse_weight
    new_slots = mat.grow(torch.tensor(plan["add_rows"], dtype=torch.long, device=dev),
                         torch.tensor(plan["add_cols"], dtype=torch.long, device=dev))
    if init == "match":
        # Random draws on the CPU generator (the same values on every device), gathered on the device.
        shape = (n_add,) + tuple(mat.values.shape[1:])
        count = math.prod(shape)
        if pool.numel():
            pick = torch.randint(0, pool.numel(), (count,), generator=gen)
            vals = pool[pick.to(dev)].abs()
        else:
            bound = 1.0 / math.sqrt(layer.fan_in) if layer.fan_in else 0.0
            vals = torch.rand(count, generator=gen, dtype=torch.float64).mul(bound).to(dev, mat.values.dtype)
        sign = torch.randint(0, 2, (count,), generator=gen).mul(2).sub(1)
        vals = (vals * sign.to(dev, vals.dtype)).reshape(shape)
        mat.values.data[new_slots] = vals.to(mat.values.dtype)


# ---------------------------------------------------------------------------- cross-layer analysis
def _in_units(m) -> int:
    return int(m.in_channels if hasattr(m, "in_channels") else m.in_features)


def _out_units(m) -> int:
    return int(m.out_channels if hasattr(m, "out_channels") else m.out_features)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _trace(model: nn.Module, input_shape) -> tuple[Optional[dict], str]:
    """{layer name: (successor name, ratio)} for analysable pairs, and a description."""
    shape = input_shape if input_shape is not None else infer_input_shape(model)
    if shape is None:
        return None, "skipped (no input_shape given and none could be inferred)"
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, SparseLayer) or is_maskable(m)}
    fns: dict[str, tuple] = {}
    handles = []
    for n, m in layers.items():
        def hook(mod, inputs, output, n=n):
            if n in fns:
                return  # a module used twice: its pairs are ambiguous
            fns[n] = (inputs[0].grad_fn if inputs and torch.is_tensor(inputs[0]) else None,
                      output.grad_fn if torch.is_tensor(output) else None)
        handles.append(m.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        p = next(model.parameters())
        x = torch.ones((1, *tuple(int(s) for s in shape)), dtype=p.dtype, device=p.device)
        model.eval()
        with torch.enable_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 -- the analysis is optional
        return None, f"skipped (forward pass with input_shape={tuple(shape)} failed: {type(exc).__name__})"
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    # Number of consumers of every autograd node (parameter leaves excluded).
    users: dict = {}
    seen = set()
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None or type(nxt).__name__ == "AccumulateGrad":
                continue
            users[nxt] = users.get(nxt, 0) + 1
            stack.append(nxt)
    owner = {f[1]: n for n, f in fns.items() if f[1] is not None}
    succ: dict[str, tuple[str, int]] = {}
    for s, (in_fn, _) in fns.items():
        node = in_fn
        while node is not None:
            if users.get(node, 0) != 1:
                break
            if node in owner:
                l = owner[node]
                ratio, rem = divmod(_in_units(layers[s]), _out_units(layers[l]))
                if rem == 0 and ratio >= 1 and l not in succ:
                    succ[l] = (s, ratio)
                break
            nxt = [f for f, _ in node.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
            if len(nxt) != 1:
                break
            node = nxt[0]
    graph = {"succ": succ, "layers": layers, "order": [n for n in fns]}
    return graph, f"traced ({len(succ)} analysable layer pairs)"


def _unit_edges(m) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(output unit, input unit) of every edge of a sparse layer, on the CPU (the analysis runs once
    there, whatever the model's device), or None for a dense layer."""
    if not isinstance(m, SparseLayer):
        return None
    kk = math.prod(m.weight_shape[2:]) if len(m.weight_shape) > 2 else 1
    mat = m.sparse_weight
    if mat.block_size == 1:
        rows, cols, _ = mat.coo()
        return rows.cpu(), (cols // kk).cpu()
    # Blocks: the unit pairs covered by each stored block, without a dense mask of the weight.
    rows, cols, _ = mat.coo()
    b = mat.block_size
    cin = m.weight_shape[1]
    r_units = rows.cpu()[:, None] * b + torch.arange(b)            # [nnz, b] output units of each block
    c_units = (cols.cpu()[:, None] * b + torch.arange(b)) // kk    # [nnz, b] input units of each block
    r = r_units[:, :, None].expand(-1, b, b).reshape(-1)
    c = c_units[:, None, :].expand(-1, b, b).reshape(-1)
    keys = torch.unique(r * cin + c)
    return keys // cin, keys % cin


def _disconnected(model: nn.Module, graph: dict) -> dict[str, Optional[int]]:
    """Per layer: output units with in-degree >= 1 and >= 1 outgoing edge but no path to the output."""
    succ, layers = graph["succ"], graph["layers"]
    conn: dict[str, torch.Tensor] = {}

    def connected(name: str) -> torch.Tensor:
        """Output units of ``name`` with a path to the model output (unanalysable successors: assumed)."""
        if name in conn:
            return conn[name]
        m = layers[name]
        M = _out_units(m)
        if name not in succ:
            conn[name] = torch.ones(M, dtype=torch.bool)
            return conn[name]
        s, ratio = succ[name]
        cs = connected(s)
        ms = layers[s]
        edges = _unit_edges(ms)
        cin = _in_units(ms)
        if edges is None:
            reach_in = torch.full((cin,), bool(cs.any()))
        else:
            r, c = edges
            reach_in = torch.zeros(cin, dtype=torch.bool)
            reach_in[c[cs[r]]] = True
        out = torch.zeros(M, dtype=torch.long).index_add_(0, torch.arange(cin) // ratio, reach_in.long()) > 0
        conn[name] = out
        return out

    result: dict[str, Optional[int]] = {}
    for name, m in layers.items():
        if not isinstance(m, SparseLayer):
            continue
        if name not in succ:
            result[name] = None
            continue
        M = _out_units(m)
        mine = _unit_edges(m)
        indeg = torch.bincount(mine[0], minlength=M) if mine is not None else torch.ones(M, dtype=torch.long)
        s, ratio = succ[name]
        ms = layers[s]
        cin = _in_units(ms)
        edges = _unit_edges(ms)
        if edges is None:
            has_out = torch.ones(M, dtype=torch.bool)
        else:
            outdeg_in = torch.bincount(edges[1], minlength=cin)
            has_out = torch.zeros(M, dtype=torch.long).index_add_(0, torch.arange(cin) // ratio, outdeg_in) > 0
        result[name] = int(((indeg > 0) & has_out & ~connected(name)).sum())
    return result
