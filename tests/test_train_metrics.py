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


def test_slot_utilisation_reads_even_use_as_1_and_collapse_as_0():
    from tcssa.io.runs import SlotUse
    from tcssa.train.metrics import slot_utilisation, suggested_aux_weight

    even = slot_utilisation(SlotUse([10, 10, 10, 10], num_patches=20))
    assert even["slot_entropy"] == pytest.approx(1.0) and even["slot_gini"] == pytest.approx(0.0)
    assert even["top_slot_share"] == pytest.approx(0.5) and even["slots_used"] == 4
    one = slot_utilisation(SlotUse([0, 40, 0, 0], num_patches=20))
    assert one["slot_entropy"] == pytest.approx(0.0) and one["slot_gini"] == pytest.approx(0.75)
    assert one["top_slot_share"] == pytest.approx(2.0) and one["slots_used"] == 1
    assert suggested_aux_weight(0.0) == 0.1 and suggested_aux_weight(0.1) == pytest.approx(1.0)


def test_each_epoch_logs_slot_use_and_a_collapse_warns_once_with_a_lambda(tmp_path):
    import json

    import torch

    from tcssa.mil import build_model
    from tcssa.train.config import TrainConfig
    from tcssa.train.engine import fit
    from tcssa.train.metrics import SlotCollapseWarning
    from train_fixtures import make_bags, pad_collate

    items = make_bags(24, dim=8, seed=1)
    model = build_model("tcssa", 8, 2, num_slots=4, expert_hidden=8, head_hidden=8, aux_weight=0.0)
    with torch.no_grad():  # every patch to slot 0 first: a collapsed router
        model.compressor.gate.weight.zero_()
        model.compressor.gate.bias.copy_(torch.tensor([20.0, 10.0, 0.0, 0.0]))
    config = TrainConfig(epochs=3, lr=1e-4)
    with pytest.warns(SlotCollapseWarning, match=r"aux_weight = 0.1 \(now 0\)") as caught:
        fit(model, items[:16], items[16:], config, collate=pad_collate, out_dir=tmp_path, verbose=False)
    assert sum(issubclass(w.category, SlotCollapseWarning) for w in caught) == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(0 <= line["slot_entropy"] <= 1 for line in lines)
    assert lines[0]["top_slot_share"] == pytest.approx(1.0) and lines[0]["slots_used"] == 2
