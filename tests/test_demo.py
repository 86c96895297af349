import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tcssa.apps.demo import (
    FULL,
    QUICK,
    TINY,
    DemoConfig,
    _datasets,
    _precomputed_stores,
    _prepare,
    lesion_fraction_auc,
    model_train_config,
    run_demo,
    token_budget_demo,
)
from tcssa.cli import main
from tcssa.data import Cohort, make_kfold_splits, make_synthetic_cohort
from tcssa.data.memory import MemoryCohort
from tcssa.mil import build_model
from tcssa.train.runs import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-cohort")
    synthetic = make_synthetic_cohort(
        root, num_slides=20, dim=16, min_patches=20, max_patches=90, progress=False, workers=1
    )
    cohort = Cohort.from_folder(synthetic.features_dir, synthetic.labels_csv)
    return synthetic, cohort, MemoryCohort.load(cohort, progress=False)


def test_lesion_fraction_auc_scores_each_band_against_all_negatives():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.6, 0.5, 0.3, 0.9, 0.8])
    fractions = np.array([0, 0, 0, 0.003, 0.004, 0.02, 0.05])
    rows = lesion_fraction_auc([(labels, scores, fractions)] * 2, edges=(0.002, 0.01, 0.05))
    negatives = scores[:3]
    small = roc_auc_score([0, 0, 0, 1, 1], [*negatives, 0.5, 0.3])
    assert rows[0]["auc_mean"] == pytest.approx(small) and rows[0]["n_positive"] == 4
    assert (
        rows[1]["auc_mean"] == 1.0 and rows[1]["n_positive"] == 4
    )  # the upper edge belongs to the last band
    assert rows[0]["auc_std"] == 0.0 and rows[0]["n_folds"] == 2
    assert rows[0]["lesion_fraction"] == pytest.approx(np.sqrt(0.002 * 0.01))
    empty = lesion_fraction_auc([(labels, scores, fractions)], edges=(0.1, 0.2))
    assert np.isnan(empty[0]["auc_mean"]) and empty[0]["n_folds"] == 0


@pytest.mark.parametrize(
    ("model_name", "k"), [("kmeans-k", 32), ("kmeans-k", 8), ("random-k", 32), ("random-k", 8), ("mean", 32)]
)
def test_precomputed_tokens_give_the_models_own_output(small_cohort, model_name, k):
    _, cohort, store = small_cohort
    config = replace(TINY, dim=16, model_options={"kmeans-k": {"iterations": 3}})
    stores = _precomputed_stores(store, config, progress=False)
    options = config.model_options.get(model_name, {})
    model = build_model(model_name, 16, 2, num_slots=k, seed=3, **options).eval()
    test_set = _datasets(model_name, k, store, stores, config)("test", cohort.slide_ids, 0)
    with torch.no_grad():
        for bag, _ in test_set:
            whole = store.bags[bag.slide_id].features.float()
            expected, _ = model(whole[None])
            got, _ = model(bag.features[None])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert bag.num_patches <= config.num_slots


def test_train_run_with_slides_in_memory_matches_files(small_cohort, tmp_path):
    synthetic, cohort, store = small_cohort
    config = replace(
        model_train_config("tcssa", 4, replace(TINY, dim=16)), epochs=1, batch_size=4, max_patches=16
    )
    splits = make_kfold_splits(cohort, folds=2, seed=0, val_fraction=0.34)
    common = (synthetic.features_dir, synthetic.labels_csv)

    def memory(part, slide_ids, seed):
        # the engine's own choices: capped training slides, whole validation and test slides
        return store.dataset(slide_ids, config.max_patches if part == "train" else None, seed)

    seen = []
    from_files = train_run(*common, tmp_path / "files", config, splits=splits, verbose=False)
    in_memory = train_run(
        *common,
        tmp_path / "memory",
        config,
        splits=splits,
        datasets=memory,
        verbose=False,
        on_fold=seen.append,
    )
    assert [r["test_auc"] for r in in_memory.rows] == [r["test_auc"] for r in from_files.rows]
    assert seen == in_memory.rows
    a = (tmp_path / "files" / "fold_1_predictions.csv").read_text()
    assert a == (tmp_path / "memory" / "fold_1_predictions.csv").read_text()


def test_demo_config_checks_its_sweeps():
    with pytest.raises(ValueError, match="must also be in the comparison"):
        DemoConfig(models=("tcssa",), budget_models=("random-k",), lesion_models=())
    with pytest.raises(ValueError, match="must include K = 32"):
        DemoConfig(budgets=(8, 16))
    with pytest.raises(ValueError, match="increasing"):
        DemoConfig(lesion_edges=(0.01, 0.005))
    with pytest.raises(ValueError, match="sweep_folds must be between 2 and folds=5"):
        DemoConfig(sweep_folds=6)
    assert QUICK.num_slides < TINY.num_slides * 10 and QUICK.budgets == (8, 32, 64)


def test_the_demo_end_to_end(tmp_path, capsys):
    """The smallest demo: every stage, every output file, and the report a user opens."""
    out = tmp_path / "demo"
    result = run_demo(out, TINY, progress=False)
    names = [row["model"] for row in csv.DictReader(open(out / "comparison.csv"))]
    assert names == list(TINY.models)
    for model in TINY.models:
        fold_dir = out / model / "fold_0"
        assert (out / model / "summary.csv").is_file() and (fold_dir / "model.safetensors").is_file()
        assert (fold_dir / "metrics.jsonl").is_file() and not (fold_dir / "resume.safetensors").exists()
    budget = list(csv.DictReader(open(out / "sweeps" / "token_budget.csv")))
    assert {int(r["n_folds"]) for r in budget} == {TINY.sweep_folds}  # every point on the same folds
    assert not list((out / "sweeps").rglob("model.safetensors"))
    assert sorted((r["model"], int(r["num_tokens"])) for r in budget) == [
        ("kmeans-k", 8), ("kmeans-k", 32), ("random-k", 8), ("random-k", 32), ("tcssa", 8), ("tcssa", 32)
    ]  # fmt: skip
    lesion = list(csv.DictReader(open(out / "sweeps" / "lesion_fraction.csv")))
    assert {r["model"] for r in lesion} == set(TINY.models) and len(lesion) == len(TINY.models) * 2
    info = json.loads((out / "demo.json").read_text())
    assert info["seconds"]["total"] > 0 and info["token_budget"][0].startswith("slide ")

    document = result.report.read_text()
    assert result.report == out / "report.html"
    assert document.count("<figure>") == 7  # AUC bars, ROC, 2 sweeps, utilisation, slot map, embedding
    assert "Slot map of slide_" in document and "does rare evidence survive" in document
    # the claim is as strong as the paired bootstrap allows, in the report and in the printed lines
    assert "TC-SSA − random-k AUC" in document and "95% paired bootstrap interval" in document
    assert result.verdicts[0] in document
    lines = result.summary_lines()
    assert lines[0].split()[:2] == ["model", "AUC"] and len(lines) == 1 + len(TINY.models) + 3 + 5
    assert "TC-SSA − random-k AUC" in "\n".join(lines)
    # one unit for the largest slot: a share of the shown slide's patches, in lines and slot map alike
    shown = info["token_budget"][0].split()[1].rstrip(":")
    assert f"Slot map of {shown}," in document
    share = (
        next(line for line in lines if "largest slot receives" in line).split("receives ")[1].split("%")[0]
    )
    assert f"largest receives {share}% of its" in document
    assert "patches -> 32 slot tokens" in "\n".join(lines)

    _prepare(out)  # running the demo again into the same folder starts from an empty one
    assert list(out.iterdir()) == []


def test_the_demo_never_empties_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no earlier demo"):
        run_demo(tmp_path, TINY, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not a folder"):
        run_demo(tmp_path / "notes.txt", TINY, progress=False)


def test_demo_command_help_and_the_untrained_budget(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "--out" in text
    report = token_budget_demo(3000, 64)
    assert "3,000 patches -> 32 slot tokens" in "\n".join(report.lines())
    assert "94x fewer tokens" in "\n".join(report.lines())


@pytest.mark.slow
def test_quick_demo_command(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "quick")]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and (tmp_path / "quick" / "report.html").is_file()


def test_the_report_says_where_the_settings_were_chosen():
    assert QUICK.settings_provenance().endswith("not this run's seed 0")
    assert "set earlier on seed 0 itself" in FULL.settings_provenance()
    held_in = replace(QUICK, seed=QUICK.tuning_seeds[0]).settings_provenance()
    assert "not held out" in held_in and "optimistic" in held_in
    assert replace(QUICK, tuning_seeds=()).settings_provenance() == "not recorded"
