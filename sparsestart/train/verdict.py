"""The lines that end a training run: test accuracy sparse vs dense, stored bytes, speed."""
from __future__ import annotations

from .config import config_from_dict, dense_reference


def verdict(summary: dict) -> list[str]:
    """A few readable lines that end a run: test accuracy sparse vs dense, stored bytes, speed.

    The dense accuracy and training time come from the stored reference of the same job
    (:func:`~sparsestart.train.config.dense_reference`, a measured ``--density 1.0`` run) when the run is
    the short demonstration; otherwise the lines say how to get them. Sizes and multiply-adds are the run's own."""
    cfg = config_from_dict(summary["config"])
    acc = summary["final"]["test"].get("accuracy", float("nan"))
    mem, fl = summary["memory"], summary["flops"]
    sparse_b, dense_b = mem["model_bytes"], mem["model_dense_bytes"]
    fwd, dense_fwd = fl["forward_per_sample"], fl["dense_forward_per_sample"]
    if float(cfg.density) == 1.0:
        return [f"verdict: dense baseline, test accuracy {acc:.4f}, {dense_b:,} bytes of parameters and buffers, "
                f"{summary['train_seconds']:.1f} s training; compare a sparse run with --density 0.1"]
    ref = dense_reference(cfg)
    on_cpu = str(summary.get("device", "cpu")).startswith("cpu")
    lines = [f"verdict: {cfg.model} at density {summary['density']:.3f} ({cfg.distribution}, {cfg.method}) on "
             f"{summary['dataset'].get('name', cfg.dataset)}, against the same model dense:"]
    if ref is not None:
        diff = 100 * (acc - ref["test_accuracy"])
        lines.append(f"  accuracy  {acc:.4f} sparse vs {ref['test_accuracy']:.4f} dense ({diff:+.1f} points; dense "
                     f"from a stored reference run, `{ref['command']}`, {ref['measured']})")
        if ref.get("note"):
            lines.append(f"            ({ref['note']})")
    else:
        lines.append(f"  accuracy  {acc:.4f} sparse; no stored dense reference for these settings: run the same "
                     f"command with --density 1.0 to compare")
    if sparse_b and sparse_b <= dense_b:
        ratio = f"{dense_b / sparse_b:.2f}x smaller"
    else:  # e.g. edge-popup (scores beside the frozen weights), or a pruned run still holding its start's slots
        ratio = f"{sparse_b / dense_b if dense_b else float('nan'):.2f}x larger"
    lines.append(f"  size      {sparse_b:,} bytes stored sparse vs {dense_b:,} dense ({ratio}; a stored slot costs "
                 f"4 value + 16 index bytes, so storage wins below density 0.2; a pruning method keeps the slots "
                 f"of its start)")
    speed = f"  speed     {dense_fwd / fwd if fwd else float('nan'):.1f}x fewer multiply-adds per sample " \
            f"({fwd:,} vs {dense_fwd:,})"
    if ref is not None and on_cpu and ref.get("train_seconds"):
        t = summary["train_seconds"]
        speed += (f"; training {t:.1f} s sparse vs {ref['train_seconds']:.1f} s dense ({ref['train_seconds'] / t:.2f}x, "
                  f"dense timed on the reference machine, this run on {summary.get('threads', '?')} thread(s))")
    else:
        speed += f"; training {summary['train_seconds']:.1f} s"
    lines.append(speed)
    return lines
