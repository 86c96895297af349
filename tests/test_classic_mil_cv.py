import math

import numpy as np
import pytest

from tcssa.apps import classic_mil_cv as benchmarks
from tcssa.apps.classic_mil_cv import BENCHMARK_CONFIG, ILSE_2018, benchmark_table, run_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy_benchmark(name, data_dir=None):
    """40 bags of 2-8 instances; a positive bag holds one instance far out on feature 0."""
    rng = np.random.default_rng(0)
    bags, labels = [], []
    for i in range(40):
        bag = rng.normal(size=(int(rng.integers(2, 9)), 6)).astype(np.float32)
        if i % 2:
            bag[0, 0] += 6.0
        bags.append(bag)
        labels.append(i % 2)
    return bags, np.array(labels)


def test_benchmark_protocol_runs_and_tabulates(monkeypatch):
    monkeypatch.setattr(benchmarks, "load_benchmark", _toy_benchmark)
    config = BENCHMARK_CONFIG.override(folds=3, epochs=8, lr=1e-2, batch_size=4)
    rows = run_benchmark("musk1", ["abmil", "tcssa"], repeats=2, config=config)
    assert [r["model"] for r in rows] == ["abmil", "tcssa"]
    for r in rows:
        assert r["folds"] == 6 and r["tokens"] == ("all" if r["model"] == "abmil" else 4)
        assert r["accuracy"] > 0.75  # the planted instance is easy to find
        assert math.isfinite(r["accuracy_se"])
    assert rows[0]["published_accuracy"] == ILSE_2018["musk1"]["abmil"][0]
    assert rows[0]["difference"] == pytest.approx(rows[0]["accuracy"] - 0.892)
    table = benchmark_table(rows)
    assert "| musk1 | abmil | all |" in table and "0.892" in table


def test_early_stopping_variant_holds_out_part_of_each_training_fold(monkeypatch):
    monkeypatch.setattr(benchmarks, "load_benchmark", _toy_benchmark)
    seen = []

    def recording_fit(model, train_set, val_set, config, **kwargs):
        seen.append((len(train_set), len(val_set)))
        return fit(model, train_set, val_set, config, **kwargs)

    fit = benchmarks.fit
    monkeypatch.setattr(benchmarks, "fit", recording_fit)
    config = BENCHMARK_CONFIG.override(folds=4, epochs=1)
    run_benchmark("musk1", ["mean"], repeats=1, config=config, val_fraction=0.2)
    run_benchmark("musk1", ["mean"], repeats=1, config=config)
    held_out, default = seen[:4], seen[4:]
    assert all(train == 24 and val == 6 for train, val in held_out)  # 30 training bags per fold
    assert all(train == 30 and val == 0 for train, val in default)  # default: learn from all of them
    with pytest.raises(ValueError, match="val_fraction"):
        run_benchmark("musk1", ["mean"], repeats=1, config=config, val_fraction=1.0)


def test_standardising_uses_training_bags_only_and_clips():
    bags = [np.array([[0.0, 1.0], [2.0, 1.0]]), np.array([[1.0, 1.0]]), np.array([[1000.0, 5.0]])]
    out = benchmarks._standardise(bags, [0, 1])
    np.testing.assert_allclose(np.concatenate(out[:2])[:, 0], [-1.2247449, 1.2247449, 0.0], rtol=1e-6)
    assert out[2][0, 0] == benchmarks.CLIP_STD  # far outside the training range: clipped
    assert out[0][0, 1] == 0.0  # constant in training: centred, not divided by zero
