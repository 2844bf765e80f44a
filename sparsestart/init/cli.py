"""``sparsestart densities``: print the layer-wise densities of a model and plot several rules side by side.

    sparsestart densities --model vgg16 --density 0.01 --distribution balanced --plot out.png
    sparsestart densities --model mlp:784,300,100,10 --density 0.1 --distribution erk

``--model`` takes a model-zoo name (``sparsestart.models.names()``, with
``--num-classes``, ``--in-channels`` and ``--input-size``) or an MLP spec
``mlp:in,hidden...,out``. Data-free rules only (SNIP and GraSP need a batch of
data: use :func:`sparsestart.init.allocate_densities`). The plot (matplotlib,
Agg backend) compares the densities of ``--compare`` rules per layer, as
Fig. 7 of Gadhikar et al. (2023).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.convert import check_exclude
from .densities import DISTRIBUTIONS, allocate_densities

__all__ = ["register", "main", "build_model"]

_DATA_FREE = [d for d in DISTRIBUTIONS if d not in ("snip", "grasp", "custom")]
_DEFAULT_COMPARE = ("uniform", "erk", "balanced", "pyramidal")


def _zoo():
    try:
        import sparsestart.models as models  # noqa: PLC0415
        return models if hasattr(models, "get") else None
    except ImportError:
        return None


def build_model(spec: str, *, num_classes: int = 10, in_channels: Optional[int] = None,
                input_size: Optional[int] = None, device: str = "meta") -> nn.Module:
    """A model from ``mlp:784,300,100,10`` or a zoo name; on the meta device by default (shapes only)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--model must be a zoo name or 'mlp:in,hidden,...,out', got {spec!r}")
    spec = spec.strip()
    with torch.device(device):
        if spec.lower().startswith("mlp:"):
            try:
                sizes = [int(s) for s in spec[4:].split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--model {spec!r}: an MLP spec lists integer layer sizes, e.g. "
                                 f"'mlp:784,300,100,10'") from None
            if len(sizes) < 2 or min(sizes) < 1:
                raise ValueError(f"--model {spec!r}: an MLP spec needs at least two positive sizes, e.g. "
                                 f"'mlp:784,300,100,10'")
            zoo = _zoo()
            if zoo is not None:
                return zoo.mlp(sizes)
            layers: list[nn.Module] = [nn.Flatten()]
            for i in range(len(sizes) - 1):
                layers.append(nn.Linear(sizes[i], sizes[i + 1]))
                if i < len(sizes) - 2:
                    layers.append(nn.ReLU())
            model = nn.Sequential(*layers)
            model.sizes = tuple(sizes)
            return model
        zoo = _zoo()
        if zoo is None:
            raise ValueError(f"--model {spec!r}: the model zoo (sparsestart.models) is not available; use an MLP "
                             f"spec such as 'mlp:784,300,100,10'")
        kwargs = {"num_classes": num_classes}
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        if input_size is not None:
            kwargs["input_size"] = input_size
        if spec.lower() == "mlp":
            raise ValueError("--model mlp needs its sizes: 'mlp:784,300,100,10'")
        try:
            return zoo.get(spec, **kwargs)
        except ValueError as exc:
            raise ValueError(f"--model {spec!r}: {exc} (or an MLP spec 'mlp:in,hidden,...,out')") from None


def _densities(model_spec: str, args, distribution: str) -> tuple[dict[str, float], nn.Module]:
    needs_weights = distribution == "synflow"
    model = build_model(model_spec, num_classes=args.num_classes, in_channels=args.in_channels,
                        input_size=args.input_size, device="cpu" if needs_weights else "meta")
    check_exclude(model, args.exclude or ())
    opts = {"rounds": args.rounds} if distribution == "synflow" else {}
    return allocate_densities(model, args.density, distribution, exclude=args.exclude or (), **opts), model


def format_table(densities: dict[str, float], model: nn.Module, distribution: str, density: float) -> str:
    mods = dict(model.named_modules())
    head = f"{'layer':<28} {'type':<8} {'shape':<22} {'numel':>11} {'density':>9} {'nnz':>10}"
    lines = [f"distribution={distribution}, density={density}", head, "-" * len(head)]
    tn = tk = 0
    for name, p in densities.items():
        m = mods[name]
        n = m.weight.numel()
        k = round(p * n)
        tn, tk = tn + n, tk + k
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        lines.append(f"{name:<28} {kind:<8} {str(tuple(m.weight.shape)):<22} {n:>11} {p:>9.5f} {k:>10}")
    lines.append(f"{'total':<28} {'':<8} {'':<22} {tn:>11} {tk / tn:>9.5f} {tk:>10}")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], path: str, title: str) -> None:
    """Grouped bars: one group per layer (forward order), one bar per distribution, log density axis."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(next(iter(results.values())))
    L, D = len(names), len(results)
    width = 0.8 / D
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * L + 2.0), 4.0))
    for j, (dist, dens) in enumerate(results.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(L)]
        ax.bar(xs, [dens[n] for n in names], width=width, label=dist)
    ax.set_yscale("log")
    ax.set_ylim(top=1.5)
    ax.set_xticks(range(L))
    ax.set_xticklabels([str(i + 1) for i in range(L)])
    ax.set_xlabel("masked layer (forward order)")
    ax.set_ylabel("layer density")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path(plot_arg: str, model: str, density: float) -> Path:
    """The file ``--plot`` writes: the path itself; in an existing directory (or a path ending in '/') a file named
    after the model and density; with ``.png`` added when it has no extension (what savefig would do silently).
    Checked (matplotlib present, a format it writes, a writable place; its folder created) before any work."""
    from ..train.paths import check_output_file  # noqa: PLC0415

    try:
        import matplotlib  # noqa: PLC0415, F401
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    path = Path(plot_arg).expanduser()
    if path.is_dir() or plot_arg.endswith(("/", os.sep)):
        path = path / f"densities-{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}-d{density:g}.png"
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {plot_arg}: matplotlib cannot write {path.suffix!r} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return check_output_file(path, "--plot", create_parent=True)


def _run(args) -> int:
    target = plot_path(args.plot, args.model, args.density) if args.plot else None
    dens, model = _densities(args.model, args, args.distribution)
    print(format_table(dens, model, args.distribution, args.density))
    if target is not None:
        compare = list(dict.fromkeys([*(args.compare or _DEFAULT_COMPARE), args.distribution]))
        results = {}
        for dist in compare:
            results[dist] = dens if dist == args.distribution else _densities(args.model, args, dist)[0]
        try:
            plot(results, str(target), f"{args.model}, density {args.density}")
        except OSError as exc:  # checked above; a disk that fills up in between
            raise ValueError(f"--plot {target}: cannot write the plot ({exc.strerror or exc})") from None
        print(f"plot saved to {target}")
    return 0


def _density_arg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {s!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise argparse.ArgumentTypeError(f"density must lie in (0, 1], got {v}")
    return v


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="zoo name (vgg16, resnet18, lenet5, ...) or an MLP spec 'mlp:784,300,100,10'")
    p.add_argument("--density", type=_density_arg, required=True, help="overall density of the masked layers")
    p.add_argument("--distribution", default="erk", choices=_DATA_FREE, help="layer-wise rule (default erk)")
    p.add_argument("--plot", metavar="PNG", help="save a bar plot comparing --compare rules (a directory: "
                                                "densities-<model>-d<density>.png in it; no extension: .png)")
    p.add_argument("--compare", nargs="+", choices=_DATA_FREE, metavar="RULE",
                   help=f"rules in the plot (default {' '.join(_DEFAULT_COMPARE)}, plus --distribution)")
    p.add_argument("--exclude", nargs="*", metavar="NAME", help="layers (names or glob patterns) left dense")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None, help="image side of zoo models")
    p.add_argument("--rounds", type=int, default=100, help="SynFlow rounds")


def register(subparsers) -> None:
    p = subparsers.add_parser("densities", help="layer-wise densities of a model (table and plot)",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)

    def run(args) -> int:
        try:
            return _run(args)
        except ValueError as exc:
            p.error(str(exc))  # exits with status 2 and the usage line
        return 2  # pragma: no cover

    p.set_defaults(func=run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the subcommand on its own: ``python -m sparsestart.init.cli --model ... --density ...``."""
    parser = argparse.ArgumentParser(prog="sparsestart densities", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as exc:
        parser.error(str(exc))
    return 2  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
