"""python -m bench: CPU benchmarks (kernels, layers, training step, structure updates, ER sampling)
-> bench/results/<name>.json and docs/benchmarks.md.

Running some suites into an existing result file keeps the other suites' results
from it (each suite records when and how it was run); --no-merge starts afresh.

--device cuda runs the GPU suites instead (layers, training, algorithms against dense
cuBLAS/cuDNN, see bench/gpu_suites.py) -> bench/results/gpu-<device>.json and the GPU
section of docs/benchmarks.md; --quick there is a few-minute run (MLP + VGG-11)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List

import torch

from . import algorithms, common, convalgo, gpu_report, gpu_suites, kernels, layers, report, sampling, training

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = [0.5, 0.2, 0.1, 0.05, 0.01, 0.001]
SUITES = {"kernels": kernels, "layers": layers, "convalgo": convalgo, "training": training, "algorithms": algorithms,
          "sampling": sampling}
# The options each suite depends on, recorded with its results.
SETTINGS = {
    "kernels": ("shapes", "blocks", "densities", "rounds"),
    "layers": ("densities", "layer_rounds"),
    "convalgo": ("train_densities", "distributions", "vgg_batch", "layer_rounds"),
    "training": ("train_models", "train_densities", "distributions", "vgg_batch", "train_rounds", "train_malloc",
                 "train_compile"),
    "algorithms": ("algo_models", "algo_density", "distributions", "vgg_batch", "update_interval", "drop_fraction",
                   "algo_rounds"),
    "sampling": ("sampling_size", "sampling_density", "sampling_variants", "sampling_rounds"),
}


def _shape(s: str):
    try:
        M, K, N = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, got {s!r}") from None
    return M, K, N


def _device(s: str) -> str:
    s = s.strip().lower()
    if s in ("cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got {s!r}")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: small shapes, two densities, few rounds (with --device cuda: the real "
                        "shapes, MLP + VGG-11, few rounds, no Triton autotune search: a few minutes)")
    p.add_argument("--suites", nargs="+", default=None, choices=list(SUITES),
                   help="suites to run (default: all; with --device cuda: training layers algorithms)")
    p.add_argument("--device", default="cpu", type=_device,
                   help="cpu (default: the CPU suites) or cuda / cuda:N: the GPU suites (bench/gpu_suites.py)")
    p.add_argument("--shapes", nargs="+", type=_shape, default=None,
                   help="kernel shapes MxKxN (default 4096x4096x256 1024x1024x256 64x576x65536 256x2304x4096)")
    p.add_argument("--blocks", nargs="+", type=int, default=None, help="1 = CSR, b = BSR with b x b blocks (default 1 16)")
    p.add_argument("--densities", nargs="+", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per kernel problem (default 15)")
    p.add_argument("--layer-rounds", type=int, default=None, help="interleaved rounds per layer problem (default 9)")
    g = p.add_argument_group("training and algorithms suites")
    g.add_argument("--train-models", nargs="+", default=None, choices=["mlp", "vgg11", "resnet20", "resnet18"],
                   help="default mlp vgg11 resnet20 resnet18 (algorithms suite: mlp vgg11; GPU: mlp vgg11, + "
                        "resnet18 without --quick; resnet20 is CPU-only)")
    g.add_argument("--train-malloc", choices=["process", "both"], default=None,
                   help="training suite: this process's allocator policy only, or both policies (the other in a "
                        "child process); default both, process with --quick")
    g.add_argument("--train-densities", nargs="+", type=float, default=[0.1, 0.01],
                   help="overall densities of the training suite (default 0.1 0.01)")
    g.add_argument("--distributions", nargs="+", default=None, metavar="NAME",
                   help="layer-wise density rules for sparsify, e.g. erk uniform (default: sparsify's default, erk); "
                        "the algorithms suite uses the first")
    g.add_argument("--vgg-batch", type=int, default=None,
                   help="VGG-11 batch size (default 64; 2 with --quick; GPU suites: VGG-11 and ResNet-18, default 256)")
    g.add_argument("--train-rounds", type=int, default=None, help="interleaved rounds per training problem (default 9)")
    g.add_argument("--compile", dest="train_compile", action="store_true",
                   help="training suite: torch.compile every variant's model (sparse, dense and masked alike; "
                        "compilation happens in the warm-up rounds, outside the timing); records say compiled")
    g.add_argument("--algo-rounds", type=int, default=None, help="interleaved rounds per algorithm problem (default 5)")
    g.add_argument("--algo-density", type=float, default=0.1, help="density of the algorithms suite (default 0.1)")
    g.add_argument("--update-interval", type=int, default=100,
                   help="ΔT the update cost is compared with (default 100)")
    g.add_argument("--drop-fraction", type=float, default=0.3, help="RigL/SET drop fraction alpha (default 0.3)")
    g = p.add_argument_group("sampling suite")
    g.add_argument("--sampling-size", type=int, default=None,
                   help="layer size M = K (default 32768; 2048 with --quick)")
    g.add_argument("--sampling-density", type=float, default=0.01)
    g.add_argument("--sampling-variants", nargs="+", default=list(sampling.VARIANTS), choices=list(sampling.VARIANTS))
    g.add_argument("--sampling-rounds", type=int, default=None,
                   help="fresh processes per variant (default 3; 1 with --quick)")
    g = p.add_argument_group("GPU suites (--device cuda)")
    g.add_argument("--precisions", nargs="+", default=None, choices=list(gpu_suites.PRECISIONS),
                   help="fp32 (IEEE, no TF32, on both sides) and/or bf16 (autocast, fp32 master weights); default both")
    g.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help="csr and/or bsrB, e.g. bsr32 (default csr bsr32)")
    g.add_argument("--reps", type=int, default=None, help="timed interleaved rounds per case (default 30; 10 quick)")
    g.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; 3 quick)")
    g.add_argument("--algo-reps", type=int, default=None, help="timed rounds per algorithms case (default 10; 5 quick)")
    g.add_argument("--algo-precisions", nargs="+", default=None, choices=list(gpu_suites.PRECISIONS),
                   help="precisions of the algorithms suite (default: fp32 with --quick, else --precisions)")
    g.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None,
                   help="search the Triton autotune lists (default: on, off with --quick; "
                        "SPARSESTART_TRITON_AUTOTUNE in the environment decides when neither is given)")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="skip (and record as skipped) the cases that would start after SECONDS")
    # Hidden, for the tests: tiny shapes, and the GPU suites on CPU tensors.
    g.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--gpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2; GPU suites: torch's)")
    p.add_argument("--default-malloc", dest="retain_memory", action="store_false",
                   help="leave glibc's malloc as it is; by default the process keeps freed memory "
                        "(sparsestart.runtime.retain_freed_memory), for every implementation alike")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each problem wait up to SECONDS for the machine to be >= 85%% idle")
    p.add_argument("--name", default=None, help="result name: bench/results/<name>.json (default cpu, or quick)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    p.add_argument("--docs", default=None,
                   help="markdown report to (re)write (default docs/benchmarks.md for a full run, none for --quick)")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="do not keep the results of suites not run now from an existing result file of the same name")
    args = p.parse_args(argv)
    args.distributions = args.distributions or [training.default_distribution()]
    args.gpu = args.device != "cpu" or args.gpu_dry_run
    if args.gpu:
        if args.gpu_dry_run and args.device != "cpu":
            p.error("--gpu-dry-run runs the GPU suites on the CPU; leave --device cpu")
        try:
            gpu_suites.configure(args)
        except ValueError as exc:
            p.error(str(exc))
        if args.docs is None and not (args.tiny or args.gpu_dry_run):
            args.docs = str(ROOT / "docs" / "benchmarks.md")
        return args
    for flag in ("precisions", "formats", "reps", "warmup", "algo_reps", "algo_precisions", "autotune",
                 "time_budget"):
        if getattr(args, flag) is not None:
            p.error(f"--{flag.replace('_', '-')} applies to the GPU suites (--device cuda)")
    if args.tiny:
        p.error("--tiny applies to the GPU suites")
    args.suites = args.suites or list(SUITES)
    args.algo_models = [m for m in (args.train_models or ["mlp", "vgg11"]) if m in ("mlp", "vgg11")]
    if not args.algo_models and "algorithms" in args.suites:
        p.error(f"--train-models {' '.join(args.train_models)}: the algorithms suite measures mlp and/or vgg11; "
                f"name one of them, or leave algorithms out of --suites")
    args.train_models = args.train_models or ["mlp", "vgg11", "resnet20", "resnet18"]
    args.train_malloc = args.train_malloc or ("process" if args.quick else "both")
    args.threads = args.threads or 2
    if args.quick:
        args.shapes = args.shapes or [(256, 192, 40), (64, 48, 300)]
        args.blocks = args.blocks or [1, 16]
        args.densities = args.densities or [0.2, 0.05]
        args.rounds = args.rounds or 3
        args.layer_rounds = args.layer_rounds or 3
        args.train_rounds = args.train_rounds or 2
        args.algo_rounds = args.algo_rounds or 2
        args.sampling_size = args.sampling_size or 2048
        args.sampling_rounds = args.sampling_rounds or 1
        args.name = args.name or "quick"
    else:
        args.shapes = args.shapes or [(4096, 4096, 256), (1024, 1024, 256), (64, 576, 65536), (256, 2304, 4096)]
        args.blocks = args.blocks or [1, 16]
        args.densities = args.densities or DENSITIES
        args.rounds = args.rounds or 15
        args.layer_rounds = args.layer_rounds or 9
        args.train_rounds = args.train_rounds or 9
        args.algo_rounds = args.algo_rounds or 5
        args.sampling_size = args.sampling_size or 32768
        args.sampling_rounds = args.sampling_rounds or 3
        args.name = args.name or "cpu"
        if args.docs is None:
            args.docs = str(ROOT / "docs" / "benchmarks.md")
    return args


def merge_previous(result: dict, path: Path) -> List[str]:
    """Copy into ``result`` the suites of the result file at ``path`` that this run did not measure."""
    prev = json.loads(path.read_text())
    prev_meta = prev.get("meta", {})
    kept = [s for s in SUITES if s in prev and s not in result]
    for s in kept:
        suite = prev[s]
        if "run" not in suite:  # written before suites carried their own run record: the file's meta is it
            suite["run"] = {k: prev_meta.get(k) for k in ("command", "date", "threads", "torch", "seconds",
                                                           "idle_at_start", "loadavg_end")}
            suite["run"]["settings"] = {k: prev_meta[k] for k in SETTINGS[s] if k in prev_meta}
        result[s] = suite
    meta = result["meta"]
    differs = [k for k in ("cpu", "logical_cpus", "torch") if k in prev_meta and prev_meta[k] != meta.get(k)]
    if kept and differs:
        meta["merge_warning"] = f"kept suites {kept} were measured with different {differs}"
    return kept


def main_gpu(args, argv=None) -> dict:
    """The GPU suites: bench/results/gpu-<device>.json, and its section of the markdown report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    result = gpu_suites.run(args, command, log=lambda s: print(s, flush=True))
    path = args.result_path
    if args.docs:
        gpu_report.update_docs(Path(args.docs), result, source=str(path))
        print(f"wrote the {result['meta']['device']} section of {args.docs}")
    return result


def main(argv=None) -> dict:
    args = parse(argv)
    if args.gpu:
        return main_gpu(args, argv)
    torch.set_num_threads(args.threads)
    from sparsestart import runtime
    if args.retain_memory:
        runtime.retain_freed_memory()
    meta = common.machine_info(torch.get_num_threads())
    meta["malloc"] = runtime.malloc_settings()
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    meta.update(command=command, quick=args.quick, rounds=args.rounds, layer_rounds=args.layer_rounds,
                densities=args.densities, idle_at_start=common.idle_fraction(0.5))
    print(f"sparsestart CPU benchmarks: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}", flush=True)
    measured = {}
    t0 = time.time()
    for name, module in SUITES.items():
        if name not in args.suites:
            continue
        print(f"{name}:", flush=True)
        ts, idle = time.time(), common.idle_fraction()
        measured[name] = module.run(args, log=lambda s: print(s, flush=True))
        measured[name]["run"] = common.run_info(command, torch.get_num_threads(), time.time() - ts, idle)
        measured[name]["run"]["settings"] = {k: getattr(args, k) for k in SETTINGS[name]}
        measured[name]["run"]["malloc"] = meta["malloc"]
    meta["loadavg_end"] = common.loadavg()
    meta["seconds"] = round(time.time() - t0, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    result = {"meta": meta, **measured}
    if args.merge and path.exists():
        kept = merge_previous(result, path)
        if kept:
            meta["kept_from_previous"] = kept
            print(f"kept {', '.join(kept)} from the previous {path}")
    result = {"meta": meta, **{s: result[s] for s in SUITES if s in result}}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    if args.docs:
        Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
        gpu_report.write_cpu_docs(Path(args.docs), report.render(result, source=str(path)))
        print(f"wrote {args.docs}")
    return result


if __name__ == "__main__":
    main()
