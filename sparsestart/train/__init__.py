"""Training and evaluation: in-memory datasets, the trainer, atomic checkpoints, metrics and the CLI.

``sparsestart train`` / ``sparsestart evaluate`` (see docs/training.md), or from Python::

    from sparsestart.train import train
    summary = train("runs/demo", dataset="digits", model="lenet5", density=0.1, epochs=2)
"""
from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import QUICK, TrainConfig
from .data import DATASETS, Dataset, DatasetNotFoundError, Split, load_dataset
from .evaluate import evaluate_run, load_for_eval
from .metrics import accuracy, ece, evaluate_model, fgsm_accuracy, nll, ood_auroc
from .trainer import Trainer, train

__all__ = ["train", "Trainer", "TrainConfig", "QUICK", "evaluate_run", "load_for_eval", "load_dataset", "Dataset", "Split", "DATASETS",
           "DatasetNotFoundError", "CheckpointError", "atomic_save", "load_checkpoint", "accuracy", "nll", "ece",
           "ood_auroc", "fgsm_accuracy", "evaluate_model"]
