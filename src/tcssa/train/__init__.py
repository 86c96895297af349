"""Training and evaluation of slide classifiers: engine, metrics, checkpoints, several processes.

``tcssa.train.engine`` trains one model on one fold; ``tcssa.train.runs``
turns a cohort into a run directory (folds, summary, predictions,
checkpoints) and compares models on the same folds.
"""

from tcssa.train.config import TrainConfig
from tcssa.train.engine import (
    FitResult,
    NonFiniteLossError,
    Predictions,
    SlideTooLargeError,
    evaluate,
    fit,
)
from tcssa.train.metrics import classification_metrics, mean_std

__all__ = [
    "TrainConfig",
    "FitResult",
    "Predictions",
    "NonFiniteLossError",
    "SlideTooLargeError",
    "fit",
    "evaluate",
    "classification_metrics",
    "mean_std",
]
