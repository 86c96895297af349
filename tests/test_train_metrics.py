import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tcssa.train.metrics import MissingClassWarning, classification_metrics, mean_std, summarize_folds


def _onehot_probs(pred, num_classes, confidence=0.8):
    probs = np.full((len(pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def test_binary_metrics_against_hand_computed_values():
    labels = [0, 0, 0, 1, 1, 1]
    p1 = np.array([0.1, 0.4, 0.6, 0.35, 0.8, 0.9])
    m = classification_metrics(labels, np.stack([1 - p1, p1], axis=1))
    # 9 positive-negative pairs, 7 ranked correctly
    assert m["auc"] == pytest.approx(7 / 9)
    assert m["acc"] == pytest.approx(4 / 6)  # preds 0,0,1,0,1,1
    assert m["bacc"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)
    # binary quadratic kappa equals Cohen's kappa: po = 4/6, pe = 1/2
    assert m["kappa"] == pytest.approx((4 / 6 - 0.5) / 0.5)


def test_multiclass_auc_is_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), size=30)
    m = classification_metrics(labels, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_quadratic_kappa_punishes_far_misses_more():
    labels = [0, 1, 2, 3, 4] * 4
    near = [min(4, y + 1) for y in labels]
    far = [4 - y for y in labels]
    k_near = classification_metrics(labels, _onehot_probs(near, 5))["kappa"]
    k_far = classification_metrics(labels, _onehot_probs(far, 5))["kappa"]
    assert k_near > 0.5 > k_far


def test_a_class_absent_from_the_test_set_warns_and_does_not_crash():
    labels = [0, 0, 1, 1]  # class 2 ("grade 3") absent
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    with pytest.warns(MissingClassWarning, match=r"\['grade 3'\].*fold 1 test"):
        m = classification_metrics(labels, probs, ["grade 1", "grade 2", "grade 3"], "fold 1 test")
    expected = np.mean([roc_auc_score(np.array(labels) == c, probs[:, c]) for c in (0, 1)])
    assert m["auc"] == pytest.approx(expected)
    assert all(math.isfinite(v) for v in m.values())


def test_a_single_class_gives_nan_auc_with_a_warning():
    with pytest.warns(MissingClassWarning, match="AUC is undefined"):
        m = classification_metrics([1, 1, 1], _onehot_probs([1, 1, 0], 2))
    assert math.isnan(m["auc"])
    assert m["acc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "labels,probs,match",
    [
        ([0, 1], np.array([[0.5, 0.5]]), "N x C"),
        ([0, 3], np.array([[0.5, 0.5], [0.5, 0.5]]), "labels must lie"),
        ([0, 1], np.array([[np.nan, 0.5], [0.5, 0.5]]), "NaN"),
    ],
)
def test_bad_predictions_are_rejected(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(labels, probs)


def test_mean_std_over_folds():
    assert mean_std([0.8, 0.9, 1.0]) == pytest.approx((0.9, 0.1))
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std([0.6, math.nan, 0.8]) == pytest.approx((0.7, math.sqrt(0.02)))
    assert all(math.isnan(v) for v in mean_std([]))
    rows = [{"auc": 0.8, "acc": 0.5}, {"auc": 1.0, "acc": 0.7}]
    assert summarize_folds(rows, ["auc"]) == pytest.approx({"auc_mean": 0.9, "auc_std": math.sqrt(0.02)})
