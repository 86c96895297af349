import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tcssa.train.bootstrap import FoldScores, auc_interval, paired_auc_difference


def _folds(rng, num_folds=3, size=20, signal=1.0):
    folds = []
    for f in range(num_folds):
        labels = np.array([0, 1] * (size // 2))
        scores = signal * labels + rng.normal(size=size)
        folds.append(FoldScores(labels, scores, tuple(f"s{f}_{i}" for i in range(size))))
    return folds


def test_observed_auc_is_the_mean_of_the_fold_aucs():
    rng = np.random.default_rng(0)
    folds = _folds(rng)
    expected = np.mean([roc_auc_score(f.labels, f.scores) for f in folds])
    interval = auc_interval(folds, replicates=200)
    assert interval.mean == pytest.approx(expected)
    assert interval.low <= interval.mean <= interval.high


def test_ties_count_one_half_as_in_sklearn():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.5, 0.2, 0.5, 0.5, 0.9])
    fold = FoldScores(labels, scores, tuple("abcde"))
    assert auc_interval([fold], replicates=100).mean == pytest.approx(roc_auc_score(labels, scores))


def test_replicates_match_a_direct_resampling():
    """The matrix form equals drawing the slides and calling roc_auc_score, replicate by replicate."""
    rng = np.random.default_rng(1)
    folds = _folds(rng, num_folds=2, size=12)
    got = auc_interval(folds, replicates=300, seed=7)
    # the same draws, done the slow way
    draws = np.random.default_rng(7)
    values = np.zeros(300)
    for fold in folds:
        pos, neg = np.flatnonzero(fold.labels == 1), np.flatnonzero(fold.labels == 0)
        pc = draws.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=300)
        nc = draws.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=300)
        for r in range(300):
            idx = np.concatenate([np.repeat(pos, pc[r]), np.repeat(neg, nc[r])])
            values[r] += roc_auc_score(fold.labels[idx], fold.scores[idx]) / len(folds)
    assert got.low == pytest.approx(np.percentile(values, 2.5))
    assert got.high == pytest.approx(np.percentile(values, 97.5))


def test_a_clearly_better_model_is_supported_and_a_copy_is_not():
    rng = np.random.default_rng(2)
    weak = _folds(rng, signal=0.0)
    strong = [
        FoldScores(f.labels, 3.0 * f.labels + 0.1 * rng.normal(size=len(f.labels)), f.slide_ids) for f in weak
    ]
    result = paired_auc_difference(strong, weak, names=("strong", "weak"), replicates=500)
    assert result.supported and result.difference.low > 0.2 and result.p_not_better < 0.01
    same = paired_auc_difference(weak, weak, replicates=500)
    assert same.difference.mean == 0 and not same.supported and same.p_not_better == 1.0


def test_pairing_narrows_the_interval_of_two_correlated_models():
    rng = np.random.default_rng(3)
    a = _folds(rng, size=30, signal=1.0)
    b = [FoldScores(f.labels, f.scores + 0.05 * rng.normal(size=len(f.labels)), f.slide_ids) for f in a]
    result = paired_auc_difference(a, b, replicates=500)
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(result.difference) < 0.5 * width(result.a)


def test_different_test_slides_are_refused_by_name():
    rng = np.random.default_rng(4)
    a = _folds(rng)
    b = [FoldScores(f.labels, f.scores, tuple(reversed(f.slide_ids))) for f in a]
    with pytest.raises(ValueError, match="tcssa and random-k were tested on different slides in fold 0"):
        paired_auc_difference(a, b, names=("tcssa", "random-k"))


def test_a_fold_with_one_class_is_refused():
    fold = FoldScores(np.ones(4, dtype=int), np.arange(4.0), tuple("abcd"))
    with pytest.raises(ValueError, match="model, fold 0: a test fold needs a positive and a negative"):
        auc_interval([fold])
