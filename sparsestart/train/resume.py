"""The configuration of a resumed run: the one saved in its checkpoint, with the options given now applied where
they may change (:data:`~sparsestart.train.config.RESUME_CHANGEABLE`) and refused where they differ; and the
check that the data the run continues on is the data it started with."""
from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import CheckpointError
from .config import RESUME_CHANGEABLE, TrainConfig, config_from_dict, resolve_device, validate
from .data import Dataset
from .rundir import CHECKPOINT, jsonable

__all__ = ["validate_given", "resumed_config", "check_same_dataset"]


def validate_given(cfg: TrainConfig, given, where: str, changeable=()) -> None:
    """:func:`validate` a configuration assembled from a saved one and the options ``given`` now.

    A complaint about a given option reads as for a new run (``--threads: -3 is outside ...``); one about a
    saved value says where it comes from (``where``) and, for the keys in ``changeable``, how to override it
    (a run saved with --threads 64 on a big machine resumes on a laptop with --threads 4)."""
    try:
        validate(cfg)
    except ValueError as exc:
        msg = str(exc)
        m = re.match(r"--([a-z][a-z0-9-]*):", msg)
        key = m.group(1).replace("-", "_") if m else None
        if key is not None and dict(given).get(key) is not None:
            raise ValueError(msg) from None
        hint = f" (give --{key.replace('_', '-')} to override the saved value)" if key in changeable else ""
        raise ValueError(f"{where}: {msg}{hint}") from None


def resumed_config(out: Path, ckpt: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's configuration with ``overrides`` applied: keys of RESUME_CHANGEABLE replace the saved
    value, any other key must equal it; the device is resolved and the result validated as a new run's."""
    saved = config_from_dict(ckpt["config"], where=f"{out / CHECKPOINT}")
    diffs = []
    for k, v in overrides.items():
        if k in RESUME_CHANGEABLE:
            setattr(saved, k, v)
        elif getattr(saved, k) != v:
            diffs.append(f"{k}: saved {getattr(saved, k)!r}, given {v!r}")
    if diffs:
        raise CheckpointError(f"--resume {out}: the given options differ from the run being resumed "
                              f"({'; '.join(diffs)}); drop them or start a new run with another --out")
    try:
        saved.device = resolve_device(saved.device)
    except ValueError as exc:
        hint = "" if "device" in overrides else \
            f" (the run trained on {saved.device}; continue it here with --resume {out} --device cpu)"
        raise ValueError(f"{exc}{hint}") from None
    # The runtime overrides (--threads -3) and the saved configuration (an edited checkpoint) are checked as
    # those of a new run are.
    validate_given(saved, overrides, f"the configuration saved in {out / CHECKPOINT}", RESUME_CHANGEABLE)
    return saved


def check_same_dataset(out: Path, ckpt: dict, data: Dataset) -> None:
    """Refuse to resume on data that differs from the run's (another --data-dir copy, other limits)."""
    saved = ckpt.get("dataset", {})
    now = data.describe()
    keys = ("name", "shape", "num_classes", "train", "val", "test", "mean", "std")
    if any(jsonable(saved.get(k)) != jsonable(now[k]) for k in keys):
        raise CheckpointError(f"--resume {out}: the dataset differs from the one the run started with "
                              f"(saved {[saved.get(k) for k in keys]}, now {[now[k] for k in keys]})")
