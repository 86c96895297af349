"""Issue 15, items 3 and 4: the adaptive token budget and the spatial cues of TC-SSA (options, off by
default)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from tcssa.data.synthetic import make_synthetic_cohort, tissue_depth
from tcssa.io.features import read_bag
from tcssa.method.budget import AUTO_COVERAGE, coverage_mask, slot_mass
from tcssa.method.spatial import fourier_features, normalise_coords, slot_spatial_summary
from tcssa.mil import build_model
from tcssa.mil.registry import parse_model_spec

D, K = 12, 4


def _model(**options):
    return build_model("tcssa", D, 2, num_slots=K, expert_hidden=8, seed=3, **options).eval()


def _padded_pair(seed: int = 0):
    """Two slides, the second padded with garbage features and coordinates."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, D, generator=gen)
    coords = torch.randint(0, 20_000, (2, 40, 2), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    x[1, 25:] = 1e3  # padding holds anything finite
    coords[1, 25:] = -7_000_000
    return x, mask, coords


# ---------------------------------------------------------------- adaptive budget (item 3)
def test_coverage_keeps_the_fewest_slots_covering_the_share():
    mass = torch.tensor([[0.15, 0.5, 0.0, 0.3, 0.05]])
    picks = {c: coverage_mask(mass, c)[0].tolist() for c in (0.4, 0.5, 0.8, 0.81, 0.95, 1.0)}
    assert picks[0.4] == picks[0.5] == [False, True, False, False, False]
    assert picks[0.8] == [False, True, False, True, False]
    assert picks[0.81] == [True, True, False, True, False]
    assert picks[0.95] == [True, True, False, True, False]
    assert picks[1.0] == [True, True, False, True, True]  # a slot without mass is never kept
    # the kept slots are the fewest: no smaller set of slots covers the share
    for coverage, keep in picks.items():
        kept = mass[0][torch.tensor(keep)]
        assert kept.sum() >= coverage * mass.sum() - 1e-12
        assert kept.sum() - kept.min() < coverage * mass.sum()
    # ties go to the lower slot index, and every slide keeps its heaviest slot
    assert coverage_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 0.5)[0].tolist() == [True, True, False, False]
    assert coverage_mask(torch.tensor([[0.0, 2.0, 0.0]]), 1e-9)[0].tolist() == [False, True, False]
    with pytest.raises(ValueError, match="coverage"):
        coverage_mask(mass, 0.0)


def test_slot_mass_ignores_padding():
    weight = torch.tensor([[[0.6, 0.3], [0.5, 0.4], [0.0, 0.0]]])
    index = torch.tensor([[[0, 2], [2, 1], [-1, -1]]])
    assert slot_mass(weight, index, 3)[0].tolist() == pytest.approx([0.6, 0.4, 0.8])


def test_token_budget_hides_the_dropped_slots_from_the_head():
    model = _model(token_budget=0.6)
    with torch.no_grad():  # routing: slot 1 takes most of every patch, slot 3 some, 0 and 2 little
        model.compressor.gate.weight.zero_()
        model.compressor.gate.bias.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0]))
    x = torch.randn(1, 30, D)
    out = model.routing(x)
    keep = model.token_mask(out)
    assert keep[0].tolist() == [False, True, False, False]
    assert torch.allclose(model.pool(out), out.tokens[:, 1])
    # changing what a dropped slot's expert computes changes nothing the head sees
    logits = model(x)[0]
    with torch.no_grad():
        model.compressor.experts.b2[3] += 5.0
    assert torch.equal(model(x)[0], logits)
    # coverage 1: the mean of the tokens of every slot with routing mass (here slots 1 and 3)
    model.coverage = 1.0
    out = model.routing(x)
    assert model.token_mask(out)[0].tolist() == [False, True, False, True]
    assert torch.allclose(model.pool(out), out.tokens[:, [1, 3]].mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("head", ["mean", "attention"])
def test_token_budget_and_spatial_results_do_not_depend_on_padding(head):
    x, mask, coords = _padded_pair()
    model = _model(token_budget="auto", spatial=True, head=head)
    with torch.no_grad():  # a trained-looking model: the spatial parts no longer zero
        for param in (*model.spatial_gate.parameters(), *model.spatial_token.parameters()):
            param.normal_(0, 0.5)
    batched = model.predict(x, mask, coords)
    alone = model.predict(x[1:, :25], None, coords[1:, :25])
    assert torch.allclose(batched[1], alone[0], atol=1e-6)
    out, single = model.routing(x, mask, coords), model.routing(x[1:, :25], None, coords[1:, :25])
    assert torch.equal(model.token_mask(out)[1], model.token_mask(single)[0])
    assert torch.allclose(out.tokens[1], single.tokens[0], atol=1e-5)


def test_token_budget_options_and_the_model_spec():
    name, options = parse_model_spec("tcssa:token_budget=auto:spatial=true")
    model = build_model(name, D, 2, num_slots=K, expert_hidden=8, **options)
    assert model.coverage == AUTO_COVERAGE and model.spatial and model.requires_coords
    assert build_model("tcssa", D, 2, num_slots=K, token_budget=0.9).coverage == 0.9
    assert build_model("tcssa", D, 2, num_slots=K).coverage is None
    for bad in (0, 1.5, "most", True):
        with pytest.raises(ValueError, match="token_budget"):
            build_model("tcssa", D, 2, num_slots=K, token_budget=bad)


# ---------------------------------------------------------------- spatial cues (item 4)
def test_spatial_off_is_the_plain_model_bit_for_bit():
    x, mask, coords = _padded_pair(1)
    plain, off = _model(), _model(spatial=False)
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in plain.state_dict().items())
    assert torch.equal(plain(x, mask)[0], off(x, mask, coords)[0])
    # spatial on, untrained: the extra parameters start at zero, everything else drawn as before,
    # so the model computes exactly what the plain one does
    on = _model(spatial=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, on.state_dict()[key])
    assert torch.equal(plain(x, mask)[0], on(x, mask, coords)[0])


def test_spatial_parameters_learn():
    x, mask, coords = _padded_pair(2)
    model = _model(spatial=True).train()
    _, losses = model.compute_loss(torch.tensor([0, 1]), x, mask, coords)
    losses["task"].backward()
    assert model.spatial_token.weight.grad.abs().sum() > 0
    # the gate offset starts at zero; its gradient flows through the routing weights
    assert model.spatial_gate.weight.grad.abs().sum() > 0


def test_spatial_without_coords_is_a_clear_error():
    x, mask, _ = _padded_pair()
    model = _model(spatial=True)
    for call in (lambda: model(x, mask), lambda: model.slot_counts(x, mask), lambda: model.routing(x)):
        with pytest.raises(ValueError, match="spatial=True routes with the patch coordinates"):
            call()


def test_normalised_coords_forget_offset_and_scale_and_keep_the_shape():
    coords = torch.tensor([[[0, 0], [4, 0], [0, 2], [4, 2], [99, 99]]])
    mask = torch.tensor([[True, True, True, True, False]])
    unit = normalise_coords(coords, mask)
    moved = normalise_coords(coords * 256 + 12_345, mask)
    assert torch.allclose(unit[:, :4], moved[:, :4], atol=1e-6)
    assert unit[0, 4].tolist() == [0.0, 0.0]  # padding
    assert float(unit[0, :4].norm(dim=-1).max()) == pytest.approx(1.0)
    assert unit[0, 3, 0] / unit[0, 3, 1] == pytest.approx(2.0)  # aspect kept: 4 wide, 2 high
    features = fourier_features(unit, 3)
    assert features.shape == (1, 5, 12) and torch.allclose(features[0, 4, 6:], torch.ones(6))


def test_slot_spatial_summary_on_a_hand_made_slide():
    unit = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    # patch 0 and 1 go to slot 0 with weights 0.5 and 0.5; patch 2 to slot 1 (0.8); patch 3 is padding
    index = torch.tensor([[[0, 1], [0, 1], [1, 0], [-1, -1]]])
    weight = torch.tensor([[[0.5, 0.0], [0.5, 0.0], [0.8, 0.0], [0.0, 0.0]]])
    summary = slot_spatial_summary(unit, weight, index, 3)
    centroid, spread, radius = summary[0, :, :2], summary[0, :, 2:4], summary[0, :, 4]
    assert centroid[0].tolist() == pytest.approx([0.5, 0.0])
    assert spread[0].tolist() == pytest.approx([0.5, 0.0], abs=1e-4)
    assert radius[0].item() == pytest.approx(0.5)  # (0 + 1) / 2
    assert centroid[1].tolist() == pytest.approx([0.0, 1.0])
    assert spread[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-4)
    assert radius[1].item() == pytest.approx(1.0)
    assert summary[0, 2].tolist() == [0.0] * 5  # an empty slot


# ---------------------------------------------------------------- the margin task
def test_margin_task_labels_follow_where_the_lesion_lies(tmp_path):
    cohort = make_synthetic_cohort(
        tmp_path, task="margin", num_slides=10, dim=8, min_patches=400, max_patches=900,
        lesion_fraction=0.02, progress=False, workers=1,
    )  # fmt: skip
    assert sorted(set(cohort.labels.values())) == ["interior", "margin"]
    for slide, label in cohort.labels.items():
        bag = read_bag(cohort.features_dir / f"{slide}.h5")
        with h5py.File(cohort.features_dir / f"{slide}.h5") as f:
            phenotype, names = f["phenotype"][()], list(f.attrs["phenotype_names"])
        lesion = phenotype == names.index("lesion")
        assert lesion.sum() == max(1, round(0.02 * len(phenotype)))  # every slide has its lesion
        grid = (bag.coords.numpy() - bag.coords.numpy().min(axis=0)) // 256
        depth = tissue_depth(grid, tuple(grid.max(axis=0) + 1))
        if label == "margin":
            assert depth[lesion].min() <= 1.5
        else:
            assert depth[lesion].min() >= 2.0


# ---------------------------------------------------------------- tcssa compress with a budget
def test_compress_writes_which_tokens_are_valid(tmp_path):
    from tcssa.io.checkpoints import save_model
    from tcssa.train.compress import compress_folder

    cohort = make_synthetic_cohort(
        tmp_path / "cohort", task="rare", num_slides=4, dim=D, min_patches=50, max_patches=80,
        lesion_fraction=0.05, progress=False, workers=1,
    )  # fmt: skip
    model = _model(spatial=True)
    with torch.no_grad():
        model.compressor.gate.bias.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0]))
    save_model(tmp_path / "ckpt", model, {"model": model.config, "class_names": ["a", "b"], "fold": 0})
    plain = compress_folder(tmp_path / "ckpt", cohort.features_dir, tmp_path / "all", device="cpu")
    auto = compress_folder(
        tmp_path / "ckpt", cohort.features_dir, tmp_path / "auto", device="cpu", token_budget=0.6
    )
    with h5py.File(plain[0]) as f:
        assert f["token_mask"][()].all() and f.attrs["coverage"] == "all"
        mass_all, tokens_all = f["slot_mass"][()], f["tokens"][()]
        assert mass_all.sum() == pytest.approx(float(f["topk_weight"][()].sum()), rel=1e-5)
    with h5py.File(auto[0]) as f:
        keep = f["token_mask"][()]
        assert keep.dtype == bool and f.attrs["effective_slots"] == keep.sum() < K
        assert f.attrs["coverage"] == 0.6
        np.testing.assert_array_equal(keep, coverage_mask(torch.from_numpy(mass_all)[None], 0.6)[0].numpy())
        np.testing.assert_allclose(f["tokens"][()], tokens_all)  # the tokens themselves are the same


def test_the_slide_language_model_refuses_a_spatial_compressor(tmp_path):
    from tcssa.io.checkpoints import save_model
    from tcssa.io.slidelm import load_compressor

    model = _model(spatial=True)
    save_model(tmp_path, model, {"model": model.config, "class_names": ["a", "b"], "fold": 0})
    with pytest.raises(ValueError, match="spatial=true"):
        load_compressor(tmp_path)


def test_tokens_vs_auc_draws_one_line_per_model():
    from tcssa.viz import SweepPoint, tokens_vs_auc

    points = [SweepPoint("tcssa", x, 0.6 + x / 100, 0.05) for x in (3.2, 11.0, 30.5, 32.0)]
    points += [SweepPoint("tcssa:spatial=true", x, 0.7, float("nan")) for x in (4.0, 32.0)]
    plot = tokens_vs_auc(points, {("tcssa", 3.2): "c=0.5"})
    assert "tokens" in plot.figure.axes[0].get_xlabel() and plot.to_png()[:4] == b"\x89PNG"
    assert [t.get_text() for t in plot.figure.axes[0].texts] == ["c=0.5"]
