"""Training and evaluation of slide classifiers: engine, metrics, checkpoints, several processes.

``tcssa.train.engine`` trains one model on one fold; ``tcssa.train.runs``
turns a cohort into a run directory (folds, summary, predictions,
checkpoints) and compares models on the same folds.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Exported name -> its module, imported on first use (PEP 562): the command line builds its
#: flags from tcssa.train.config, and that must not load torch (`tcssa --help` stays fast).
_EXPORTS = {
    "TrainConfig": "tcssa.train.config",
    "FitResult": "tcssa.train.engine",
    "Predictions": "tcssa.train.engine",
    "NonFiniteLossError": "tcssa.train.engine",
    "SlideTooLargeError": "tcssa.train.engine",
    "fit": "tcssa.train.engine",
    "evaluate": "tcssa.train.engine",
    "classification_metrics": "tcssa.train.metrics",
    "mean_std": "tcssa.train.metrics",
}
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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
