"""Uncertainty of a cross-validated AUC, and of the difference between two models on the same slides.

The fold-level std of a 5-fold AUC says how much the folds disagree, not how sure we are that one
model beats another: two models tested on the same slides share most of their noise. A paired,
stratified bootstrap answers that question directly. Each replicate redraws, within every test
fold, its positive slides and its negative slides with replacement (so every fold keeps both
classes), and both models are scored on the same redrawn slides; the statistic is the mean over
folds of the per-fold AUC, as in the comparison table. Percentile intervals; ``p_not_better`` is the
share of replicates in which model A does not beat model B.

The AUC of a replicate is computed exactly without re-sorting: for one fold, with C[i, j] = 1 when
positive i outscores negative j (1/2 on a tie), a replicate that draws positive i a_i times and
negative j b_j times has AUC = a^T C b / (sum a * sum b). All replicates of a fold are then two
matrix products.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tcssa.io.runs import ModelRun

DEFAULT_REPLICATES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class FoldScores:
    """One test fold of one model: 0/1 labels, positive-class scores, and the slides they belong to."""

    labels: np.ndarray
    scores: np.ndarray
    slide_ids: tuple[str, ...]


@dataclass(frozen=True)
class AUCInterval:
    mean: float
    low: float
    high: float
    level: float
    replicates: int


@dataclass(frozen=True)
class PairedAUCDifference:
    """Model A minus model B: mean-over-folds AUC difference with its bootstrap interval."""

    a: AUCInterval
    b: AUCInterval
    difference: AUCInterval
    p_not_better: float  # share of replicates with AUC(A) - AUC(B) <= 0

    @property
    def supported(self) -> bool:
        """A beats B at the interval's level: the whole interval lies above 0."""
        return self.difference.low > 0


def _pair_matrix(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def _check_fold(fold: FoldScores, where: str) -> None:
    labels = np.asarray(fold.labels)
    if labels.shape != np.asarray(fold.scores).shape or labels.ndim != 1:
        raise ValueError(f"{where}: labels {labels.shape} and scores {np.shape(fold.scores)} differ")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError(f"{where}: labels must be 0/1, got {sorted(set(np.unique(labels)))}")
    if not (labels == 1).any() or not (labels == 0).any():
        raise ValueError(f"{where}: a test fold needs a positive and a negative slide for an AUC")
    if not np.isfinite(np.asarray(fold.scores, dtype=float)).all():
        raise ValueError(f"{where}: non-finite scores")


def _replicate_aucs(
    folds: Sequence[Sequence[FoldScores]], replicates: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per model, the observed mean-over-folds AUC and the replicates' (models x replicates)."""
    rng = np.random.default_rng(seed)
    num_models = len(folds)
    observed = np.zeros(num_models)
    boot = np.zeros((num_models, replicates))
    for f in range(len(folds[0])):
        labels = np.asarray(folds[0][f].labels)
        num_pos, num_neg = int((labels == 1).sum()), int((labels == 0).sum())
        # multinomial counts = how often each positive / negative slide is drawn in a replicate
        pos_counts = rng.multinomial(num_pos, np.full(num_pos, 1 / num_pos), size=replicates)
        neg_counts = rng.multinomial(num_neg, np.full(num_neg, 1 / num_neg), size=replicates)
        for m in range(num_models):
            pairs = _pair_matrix(labels, np.asarray(folds[m][f].scores, dtype=float))
            observed[m] += pairs.mean()
            boot[m] += np.einsum("rp,pn,rn->r", pos_counts, pairs, neg_counts) / (num_pos * num_neg)
    num_folds = len(folds[0])
    return observed / num_folds, boot / num_folds


def _interval(observed: float, values: np.ndarray, level: float) -> AUCInterval:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return AUCInterval(float(observed), float(low), float(high), level, len(values))


def _validated(models: Sequence[Sequence[FoldScores]], names: Sequence[str]) -> None:
    if not models or not models[0]:
        raise ValueError("bootstrap: no folds")
    reference = models[0]
    for name, folds in zip(names, models, strict=True):
        if len(folds) != len(reference):
            raise ValueError(f"bootstrap: {name} has {len(folds)} folds, {names[0]} {len(reference)}")
        for i, (fold, ref) in enumerate(zip(folds, reference, strict=True)):
            _check_fold(fold, f"{name}, fold {i}")
            if tuple(fold.slide_ids) != tuple(ref.slide_ids):
                raise ValueError(
                    f"bootstrap: {names[0]} and {name} were tested on different slides in fold {i}; a "
                    "paired comparison needs the same test slides in the same order"
                )
            if not np.array_equal(np.asarray(fold.labels), np.asarray(ref.labels)):
                raise ValueError(f"bootstrap: {names[0]} and {name} disagree on the labels of fold {i}")


def _check_settings(replicates: int, level: float) -> None:
    if replicates < 100:
        raise ValueError(f"bootstrap: use at least 100 replicates, got {replicates}")
    if not 0.5 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0.5, 1), got {level}")


def compare_aucs(
    scores: Mapping[str, Sequence[FoldScores]],
    *,
    replicates: int = DEFAULT_REPLICATES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[dict[str, AUCInterval], dict[tuple[str, str], PairedAUCDifference]]:
    """Every model's AUC interval and every ordered pair's paired difference, from one set of
    replicates: the slides each replicate draws depend on the folds only, so this gives exactly
    what ``auc_interval`` and ``paired_auc_difference`` give model by model and pair by pair."""
    _check_settings(replicates, level)
    names = list(scores)
    _validated([scores[n] for n in names], names)
    observed, boot = _replicate_aucs([scores[n] for n in names], replicates, seed)
    intervals = {n: _interval(observed[i], boot[i], level) for i, n in enumerate(names)}
    differences = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                diff = boot[i] - boot[j]
                differences[(a, b)] = PairedAUCDifference(
                    a=intervals[a],
                    b=intervals[b],
                    difference=_interval(observed[i] - observed[j], diff, level),
                    p_not_better=float((diff <= 0).mean()),
                )
    return intervals, differences


def auc_interval(
    folds: Sequence[FoldScores],
    *,
    replicates: int = DEFAULT_REPLICATES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> AUCInterval:
    """The mean-over-folds AUC of one model with its stratified bootstrap interval."""
    intervals, _ = compare_aucs({"model": folds}, replicates=replicates, level=level, seed=seed)
    return intervals["model"]


def paired_auc_difference(
    folds_a: Sequence[FoldScores],
    folds_b: Sequence[FoldScores],
    *,
    names: tuple[str, str] = ("A", "B"),
    replicates: int = DEFAULT_REPLICATES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> PairedAUCDifference:
    """AUC(A) - AUC(B) on the same test slides, with a paired stratified bootstrap interval."""
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")  # one model against itself: keep both apart
    scores = {names[0]: folds_a, names[1]: folds_b}
    _, differences = compare_aucs(scores, replicates=replicates, level=level, seed=seed)
    return differences[names]


def fold_scores(run: ModelRun, positive: int = 1) -> list[FoldScores]:
    """Each test fold's labels, positive-class scores and slide ids, for ``tcssa.train.bootstrap``.

    Binary runs only (one-vs-rest would need a choice of class): ``positive`` names the class whose
    probability is the score.
    """
    folds = []
    for fold in sorted(run.predictions, key=lambda f: f.fold):
        if fold.probs.shape[1] != 2:
            raise ValueError(
                f"{run.path}: a bootstrap AUC interval needs a binary run, fold {fold.fold} has "
                f"{fold.probs.shape[1]} classes"
            )
        labels = (fold.labels == positive).astype(np.int64)
        folds.append(FoldScores(labels, fold.probs[:, positive], tuple(run.prediction_slide_ids[fold.fold])))
    return folds
