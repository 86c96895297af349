"""Adaptive token budget (issue 15, item 3): test AUC of a trained TC-SSA run against the tokens its
head sees when each slide keeps only the fewest slots covering a share c of its routing mass.

No retraining: each fold's checkpoint routes its test slides once, and the head is read at every
coverage (``TCSSAMIL.coverage``; None = all K tokens, the model as trained). A model trained
without ``token_budget`` has never seen a masked slide, so the curve says how much of the slide
embedding the low-mass slots carry; a model trained with one is read at other coverages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tcssa.io.features import read_bag
from tcssa.io.runs import load_model_run
from tcssa.mil.base import class_probabilities
from tcssa.train.metrics import classification_metrics, mean_std
from tcssa.train.runs import load_checkpoint

#: The coverages of the sweep; None reads the K tokens as the model was trained.
DEFAULT_COVERAGES: tuple[float | None, ...] = (0.5, 0.8, 0.9, 0.95, 0.99, 1.0, None)


@dataclass
class BudgetPoint:
    """One model at one coverage: test AUC (mean, std over folds) and tokens kept per slide."""

    model: str
    coverage: float | None
    auc_mean: float
    auc_std: float
    tokens_mean: float  # mean over every test slide of every fold
    tokens_min: int
    tokens_max: int


def coverage_sweep(
    run_dir: str | Path,
    features_dir: str | Path,
    coverages: Sequence[float | None] = DEFAULT_COVERAGES,
) -> list[BudgetPoint]:
    """For each coverage, the test AUC over the folds of the run in ``run_dir`` and the tokens kept."""
    run = load_model_run(run_dir)
    features_dir = Path(features_dir)
    aucs: dict[float | None, list[float]] = {c: [] for c in coverages}
    kept: dict[float | None, list[int]] = {c: [] for c in coverages}
    for fold_predictions in run.predictions:
        fold = fold_predictions.fold
        checkpoint = run.fold_checkpoint(fold)
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir}: fold {fold} has no checkpoint")
        model, _ = load_checkpoint(checkpoint)
        if not hasattr(model, "token_mask"):
            raise ValueError(f"{run_dir}: a {model.name!r} model has no slots to budget")
        probs: dict[float | None, list[np.ndarray]] = {c: [] for c in coverages}
        for slide_id in run.prediction_slide_ids[fold]:
            bag = read_bag(features_dir / f"{slide_id}.h5")
            coords = bag.coords.unsqueeze(0) if bag.coords is not None else None
            with torch.no_grad():
                out = model.routing(bag.features.unsqueeze(0), None, coords)
                for coverage in coverages:
                    model.coverage = coverage
                    keep = model.token_mask(out)
                    kept[coverage].append(model.num_tokens if keep is None else int(keep.sum()))
                    probs[coverage].append(class_probabilities(model.head(model.pool(out)))[0].numpy())
        for coverage in coverages:
            metrics = classification_metrics(
                fold_predictions.labels, np.stack(probs[coverage]), run.class_names
            )
            aucs[coverage].append(metrics["auc"])
    points = []
    for coverage in coverages:
        mean, std = mean_std(aucs[coverage])
        tokens = np.asarray(kept[coverage])
        points.append(
            BudgetPoint(
                run.name, coverage, mean, std, float(tokens.mean()), int(tokens.min()), int(tokens.max())
            )
        )
    return points
