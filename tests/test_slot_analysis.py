import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fake_runs import write_compare_run
from tcssa.apps.slot_analysis import (
    choose_slide,
    embed_patches,
    mean_patches,
    rare_patches,
    slide_figures,
    top1_slots,
)
from tcssa.io.features import write_h5
from tcssa.io.runs import load_compare_run
from tcssa.mil import build_model
from tcssa.train.runs import load_checkpoint
from tcssa.viz import build_report

DIM = 16


def _save_checkpoint(fold_dir, num_slots=8, seed=0):
    model = build_model("tcssa", DIM, 2, num_slots=num_slots, seed=seed)
    fold_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fold_dir / "model.safetensors"))
    model_config = {"model": model.config, "class_names": ["negative", "positive"], "fold": 0}
    (fold_dir / "model_config.json").write_text(json.dumps(model_config))
    return model.eval()


def _write_slide(features_dir, slide_id, n=60, with_phenotype=True):
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 256
    phenotype = (coords[:, 0] // 512) % 3
    features = rng.normal(size=(n, DIM)).astype(np.float32) + 3 * np.eye(DIM)[phenotype]
    extra = {"phenotype": phenotype} if with_phenotype else None
    attrs = {"phenotype_names": ["stroma", "tumour", "lesion"]} if with_phenotype else None
    write_h5(features_dir / f"{slide_id}.h5", features, coords, attrs=attrs, extra=extra)
    return features


def test_a_saved_checkpoint_routes_like_the_model(tmp_path):
    model = _save_checkpoint(tmp_path / "fold_0")
    loaded, _ = load_checkpoint(tmp_path / "fold_0")
    x = torch.randn(40, DIM)
    np.testing.assert_array_equal(top1_slots(loaded, x), top1_slots(model, x))
    assert not loaded.training
    with pytest.raises(ValueError, match="no slot routing"):
        top1_slots(build_model("mean", DIM, 2), x)


def test_choose_slide_takes_the_surest_positive_test_slide(tmp_path):
    run = load_compare_run(write_compare_run(tmp_path / "cmp", models=("tcssa",))).models["tcssa"]
    fold, slide = choose_slide(run)
    first = run.predictions[0]
    assert fold == first.fold
    index = run.prediction_slide_ids[fold].index(slide)
    assert first.labels[index] == 1
    assert first.probs[index, 1] == first.probs[first.labels == 1, 1].max()


@pytest.mark.parametrize("method", ["pca", pytest.param("tsne", marks=pytest.mark.slow)])
def test_embedding_subsamples_and_keeps_indices(method):
    features = np.random.default_rng(0).normal(size=(300, 8))
    embedded = embed_patches(features, method, max_points=100)
    assert embedded.points.shape == (100, 2) and len(np.unique(embedded.index)) == 100
    assert np.isfinite(embedded.points).all()
    with pytest.raises(ValueError, match="unknown embedding"):
        embed_patches(features, "umap")


def test_slide_figures_in_the_report(tmp_path):
    root = write_compare_run(tmp_path / "cmp", models=("tcssa",), folds=2, num_slots=8)
    compare = load_compare_run(root)
    fold, slide = choose_slide(compare.models["tcssa"])
    features_dir = tmp_path / "features"
    features_dir.mkdir()
    _write_slide(features_dir, slide)

    missing = slide_figures(compare)  # the fake run records no features folder and has no checkpoint
    assert not missing.plots and "checkpoint" in missing.notes[0]
    _save_checkpoint(root / "tcssa" / f"fold_{fold}")
    no_features = slide_figures(compare)
    assert not no_features.plots and "--features" in no_features.notes[0]

    assert mean_patches(compare) is None  # no features folder recorded
    assert mean_patches(compare, features_dir) == 60  # the only slide whose file is here
    figures = slide_figures(compare, features_dir=features_dir)
    assert figures.plots[0].title == f"Slot map of {slide}, a fold {fold} test slide (60 patches)"
    assert figures.plots[1].title.startswith("Semantic slots: PCA of 60 patch features")
    document = build_report(
        root, slide_analysis=lambda c: slide_figures(c, features_dir=features_dir)
    ).read_text()
    assert document.count("<figure>") == 5  # AUC bars, ROC, slot utilisation, slot map, embedding
    assert "regions of one phenotype on the right" in document  # the map was drawn beside the ground truth


def test_slide_figures_without_phenotype_or_coords(tmp_path):
    root = write_compare_run(tmp_path / "cmp", models=("tcssa",), folds=1, num_slots=8)
    compare = load_compare_run(root)
    fold, slide = choose_slide(compare.models["tcssa"])
    _save_checkpoint(root / "tcssa" / f"fold_{fold}")
    features_dir = tmp_path / "features"
    features_dir.mkdir()
    rng = np.random.default_rng(0)
    write_h5(features_dir / f"{slide}.h5", rng.normal(size=(30, DIM)).astype(np.float32))
    figures = slide_figures(compare, features_dir=features_dir)
    assert len(figures.plots) == 1 and "no patch coordinates" in figures.notes[0]


def test_rare_phenotypes_are_kept_in_the_embedding_sample():
    phenotype = np.zeros(1000, dtype=np.int64)
    phenotype[:5] = 2  # a rare lesion
    phenotype[5:300] = 1  # common enough to show up in any sample
    keep = rare_patches(phenotype, max_points=100)
    np.testing.assert_array_equal(np.sort(keep), np.arange(5))
    features = np.random.default_rng(0).normal(size=(1000, 4))
    embedded = embed_patches(features, "pca", max_points=100, keep=keep)
    assert len(embedded.index) == 100 and set(range(5)) <= set(embedded.index.tolist())
    assert len(rare_patches(np.zeros(50, dtype=np.int64), 100)) == 0


def test_phenotype_agreement_scores_top1_slots_against_the_true_phenotype(tmp_path):
    from tcssa.apps.slot_analysis import phenotype_agreement

    root = write_compare_run(tmp_path / "cmp", models=("tcssa",), folds=2, num_slots=8)
    run = load_compare_run(root).models["tcssa"]
    features_dir = tmp_path / "features"
    features_dir.mkdir()
    for fold, slide_ids in run.prediction_slide_ids.items():
        _save_checkpoint(root / "tcssa" / f"fold_{fold}", num_slots=8, seed=fold)
        for slide_id in slide_ids:
            _write_slide(features_dir, slide_id)
    result = phenotype_agreement(run, features_dir)
    assert set(result) == {"nmi", "ari", "nmi_shuffled", "ari_shuffled", "effective_k", "lesion_purity",
                           "lesion_recall"}  # fmt: skip
    assert 0 <= result["nmi_shuffled"] < result["nmi"] <= 1  # three separated phenotypes: slots follow
    assert 1 <= result["effective_k"] <= 8 and 0 < result["lesion_purity"] <= 1
    with pytest.raises(FileNotFoundError, match="features folder"):
        phenotype_agreement(run, tmp_path / "nowhere")
