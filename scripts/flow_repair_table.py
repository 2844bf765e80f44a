"""Flow repair on CIFAR-100 VGG-19 and ResNet-50, next to Gadhikar et al. (2023), Tables 6-7.

For each architecture, sparsity and layer-wise rule, an ER network is sampled
with ``sparsestart.sparsify`` (exact per-layer counts; ``--paper-setup``:
Bernoulli masks, the paper's budget-losing balanced rule and no edge removal,
as in the released code) and repaired with
``repair_flow(method="random_addition")``. The tables give, as means over
seeds, two counts: the weights (edges) added, and the count the paper's
Tables 6-7 actually print, (layer, direction) pairs with any dead unit
(``FlowReport.flag_count``, what the released code's ``(degree == 0).any().sum()``
adds up; at most 2 x the masked layers), beside the paper's values; plus the dead
units before repair and the units alive in their layer but disconnected across
layers (plain layer chains only, see sparsestart/init/flow.py).

    python scripts/flow_repair_table.py                  # writes docs/flow_repair.md
    python scripts/flow_repair_table.py --seeds 1 --out /tmp/t.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsestart.init.flow_study import cifar_resnet50, measure_cell  # noqa: E402
from sparsestart.models import vgg19  # noqa: E402

SPARSITIES = (0.8, 0.9, 0.99, 0.999)
DISTRIBUTIONS = ("uniform", "erk", "balanced", "pyramidal")


# The released code's CIFAR ResNet-50 (54 masked layers) lives in the library, shared with the experiment
# `sparsestart experiment run flow-repair` (experiments/flow-repair.yaml).
resnet50 = cifar_resnet50


ARCHS = {"VGG-19": lambda num_classes: vgg19(num_classes=num_classes), "ResNet-50": resnet50}

#: Gadhikar et al. (2023), Table 7 (VGG-19) and Table 6 (header ResNet50; its caption says ResNet-18, but
#: its uniform 0.999 cell, 108, is 2 x the 54 masked layers of their CIFAR ResNet-50, more than a
#: ResNet-18's 21 layers allow), CIFAR-100, random addition, means over 3 runs, as transcribed in the
#: paper-fidelity review; sparsities 0.9 / 0.99 / 0.999.
PAPER = {
    "VGG-19": {"uniform": (1.33, 3, 34), "erk": (0, 0, 30.33), "balanced": (0, 0, 23.33), "pyramidal": (1, 8, 22)},
    "ResNet-50": {"uniform": (1, 51.67, 108), "erk": (0, 29.33, 105.67), "balanced": (0, 23.33, 92.33),
                  "pyramidal": (1, 47.67, 91)},
}
PAPER_SPARSITIES = (0.9, 0.99, 0.999)


def paper_value(arch: str, sparsity: float, distribution: str) -> str:
    if sparsity not in PAPER_SPARSITIES:
        return "-"
    v = PAPER[arch][distribution][PAPER_SPARSITIES.index(sparsity)]
    return f"{v:g}"


def run(arch: str, sparsity: float, distribution: str, seed: int, dense_model, paper_setup: bool) -> dict:
    c = measure_cell(dense_model, 1.0 - sparsity, distribution, seed, setup="paper" if paper_setup else "exact",
                     input_shape=(3, 32, 32))
    return dict(added=c["edges"], flags=c["flags"], max_flags=c["max_flags"], dead=c["dead"],
                disconnected=c["disconnected"], over=c["over_budget"],
                worst=tuple(c["worst_layer"]) if c["worst_layer"] else None)


def fmt_mean(values) -> str:
    m = statistics.fmean(values)
    return f"{m:.0f}" if m == int(m) or m >= 100 else f"{m:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "flow_repair.md")
    parser.add_argument("--paper-setup", action="store_true",
                        help="Bernoulli masks, the paper's balanced rule (exact_budget=False), keep_budget=False")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results: dict = {}
    t0 = time.time()
    for arch, build in ARCHS.items():
        torch.manual_seed(0)
        dense = build(num_classes=100)
        for s in SPARSITIES:
            for dist in DISTRIBUTIONS:
                runs = [run(arch, s, dist, seed, dense, args.paper_setup) for seed in range(args.seeds)]
                results[arch, s, dist] = runs
                print(f"{arch:9} sparsity {s:<6} {dist:10} added {[r['added'] for r in runs]} "
                      f"flags {[r['flags'] for r in runs]} "
                      f"dead {[r['dead'] for r in runs]} disconnected {[r['disconnected'] for r in runs]} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    elapsed = time.time() - t0

    if args.paper_setup:
        setup = ("Bernoulli(p_l) masks per weight (`sparsify(..., exact=False)`), the paper's budget-losing "
                 "balanced rule (`exact_budget=False`), `repair_flow(method=\"random_addition\", "
                 "keep_budget=False)` (no edge removed), as in the released code")
    else:
        setup = ("exactly round(p_l N_l) weights per layer (`sparsify`, densities by the named rule; balanced "
                 "budget-exact), `repair_flow(method=\"random_addition\", keep_budget=True)`")
    lines = [
        "# Flow repair: edges added to ER networks, and what Tables 6-7 of Gadhikar et al. count",
        "",
        "Generated by `python scripts/flow_repair_table.py"
        + (" --paper-setup" if args.paper_setup else "") + "` (do not edit by hand).",
        "",
        "An ER network at high sparsity has *dead units*: output units (neurons; output channels of a",
        "convolution) without any incoming edge and input units without any outgoing edge. Random addition",
        "(Gadhikar et al. 2023, App. A.1) connects each dead unit by one random new",
        "edge; with `keep_budget=True` one random edge between units of degree > 1 is removed per added",
        "edge, so the weight count stays exact wherever the layer has room (see 'beyond the budget' below).",
        "",
        "**Two counts.** The paper's text says Tables 6-7 give the number of edges added. Its released code",
        "(`ER_DST/sparselearning/core.py`, `Masking.flow_preservation`) instead adds",
        "`(indegrees == 0).any().sum()` and `(outdegrees == 0).any().sum()` per masked layer: one for every",
        "(layer, direction) pair that has at least one dead unit. That count is bounded by 2 x the masked",
        "layers: 34 for VGG-19 (17 layers), 108 for the CIFAR ResNet-50 of the released code (54 layers).",
        "The tables' largest cells are exactly 34 (VGG-19, uniform 0.999) and 108 (Table 6, uniform 0.999).",
        "Table 6's header says ResNet50 and its caption ResNet-18; a ResNet-18 (21 masked layers) cannot",
        "exceed 42, so its numbers are ResNet-50's. `FlowReport.flag_count` computes that count; the",
        "columns *flags* below put it beside the paper's values, and *edges* is what is really added",
        "(hundreds to tens of thousands at 0.999). There is no unexplained gap: the paper's numbers and",
        "our edge counts measure different things; the flag counts agree (see 'Reading the numbers').",
        "The same measurement at density 0.1 / 0.01 / 0.001 with 95% confidence intervals and a verdict is the",
        "experiment [`flow-repair`](experiments/flow-repair.md) (`sparsestart experiment run flow-repair`),",
        "summarised in [reproduction.md](reproduction.md).",
        "(The released repair also writes its conv out-degree edges into a `.contiguous()` copy, so a",
        "layer with two or more dead input channels keeps them dead; `repair_flow` does not copy that.)",
        "",
        "Setup: CIFAR-100 VGG-19 with BN of `sparsestart.models` (16 convs + 1 linear) and the released",
        "code's CIFAR ResNet-50 (bottlenecks [3, 4, 6, 3], 1x1 shortcut convs, 53 convs + 1 linear, built by",
        "`sparsestart.init.flow_study.cifar_resnet50`), every Conv2d/Linear masked, ER structure with " + setup + ". Numbers are means over",
        f"{args.seeds} seeds (0..{args.seeds - 1}). Paper values: Tables 6-7 (means over 3 runs), for",
        "sparsities 0.9 / 0.99 / 0.999; `-` where the paper has no value quoted here.",
        "",
    ]
    for arch in ARCHS:
        mx = results[arch, SPARSITIES[0], DISTRIBUTIONS[0]][0]["max_flags"]
        lines += [f"## {arch}, CIFAR-100", "",
                  f"Flags (the paper's count, at most {mx}): ours / paper; edges (weights) actually added, "
                  "means over seeds:", "",
                  "| sparsity | " + " | ".join(f"{d} flags" for d in DISTRIBUTIONS) + " | "
                  + " | ".join(f"{d} edges" for d in DISTRIBUTIONS) + " |",
                  "|---|" + "---:|" * (2 * len(DISTRIBUTIONS))]
        for s in SPARSITIES:
            flags = [f"{fmt_mean([r['flags'] for r in results[arch, s, d]])} / {paper_value(arch, s, d)}"
                     for d in DISTRIBUTIONS]
            edges = [fmt_mean([r["added"] for r in results[arch, s, d]]) for d in DISTRIBUTIONS]
            lines.append(f"| {s} | " + " | ".join(flags) + " | " + " | ".join(edges) + " |")
        lines += ["", "Dead units before repair / units alive in their layer but disconnected across layers "
                      "(before repair) / weights added beyond the budget (layers with fewer weights than units), "
                      "means over seeds:", "",
                  "| sparsity | " + " | ".join(DISTRIBUTIONS) + " |",
                  "|---|" + "---:|" * len(DISTRIBUTIONS)]
        for s in SPARSITIES:
            cells = []
            for d in DISTRIBUTIONS:
                rs = results[arch, s, d]
                cells.append(f"{fmt_mean([r['dead'] for r in rs])} / {fmt_mean([r['disconnected'] for r in rs])}"
                             f" / {fmt_mean([r['over'] for r in rs])}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Where the edges go", "",
              "First sparsity (of those run) at which any seed needs an edge, and at sparsity 0.999 the layer "
              "receiving the most added edges (seed 0):", "",
              "| network | rule | first sparsity with dead units | layer with most edges at 0.999 |",
              "|---|---|---|---|"]
    for arch in ARCHS:
        for d in DISTRIBUTIONS:
            first = next((s for s in SPARSITIES if any(r["added"] for r in results[arch, s, d])), None)
            w = results[arch, SPARSITIES[-1], d][0]["worst"]
            where = "-" if w is None else f"`{w[0]}`: {w[1]} of {results[arch, SPARSITIES[-1], d][0]['added']}"
            lines.append(f"| {arch} | {d} | {first if first is not None else 'none'} | {where} |")
    diffs = [(abs(statistics.fmean([r["flags"] for r in results[a, s, d]]) - PAPER[a][d][PAPER_SPARSITIES.index(s)]),
              a, s, d) for a in ARCHS for s in SPARSITIES if s in PAPER_SPARSITIES for d in DISTRIBUTIONS]
    off = [f"{a} {d} at {s} ({statistics.fmean([r['flags'] for r in results[a, s, d]]):.1f} vs "
           f"{PAPER[a][d][PAPER_SPARSITIES.index(s)]:g})" for x, a, s, d in diffs if x > 1.0 + 1e-9]
    lines += [
        "",
        "## Reading the numbers",
        "",
        f"- The flag counts reproduce Tables 6-7: {len(diffs) - len(off)} of {len(diffs)} cells agree within one "
        "flag (one flag in one of three runs moves a mean by 0.33)"
        + (f"; further off: {', '.join(off)}" if off else "") + ". This on VGG-19 and ResNet-50,",
        "  with this page's setup (" + ("the released code's choices" if args.paper_setup else
                                        "exact per-layer counts where the released code draws Bernoulli masks, "
                                        "budget-exact balanced; `--paper-setup` switches to the released code's "
                                        "choices") + ").",
        "- The edges really added are two to three orders of magnitude above the flag counts at 0.999, and",
        "  depend strongly on the layer-wise rule: uniform starves the small first conv and the classifier,",
        "  pyramidal starves the last layers (its density decays geometrically with depth); ERK and",
        "  balanced keep small layers dense or nearly so.",
        "- Where a layer has fewer weights than units, `keep_budget=True` cannot compensate every added edge",
        "  without killing another unit; the surplus is reported as weights beyond the budget.",
        "- Disconnected units are counted only across plain layer chains (every VGG pair; in ResNet-50 only",
        "  conv1 -> conv2 -> conv3 inside a block, since other outputs feed residual additions or two",
        "  consumers). After repair the count is zero for every analysed pair.",
        "",
        f"Runtime: {elapsed:.0f} s on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
