"""The k-means gate init and the attention head over slots (issue 15), and the trainer's hook."""

from __future__ import annotations

import pytest
import torch

from tcssa.data import pooled_patches
from tcssa.method.gate_init import kmeans_centroids, set_nearest_centroid_gate
from tcssa.mil import build_model
from tcssa.train.config import TrainConfig
from tcssa.train.engine import fit
from train_fixtures import make_bags, pad_collate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_gate_routes_each_patch_to_its_nearest_centroid_from_the_start():
    gen = torch.Generator().manual_seed(0)
    centroids = torch.randn(6, 10, generator=gen) * 3
    x = torch.randn(500, 10, generator=gen) * 3
    gate = torch.nn.Linear(10, 6)
    set_nearest_centroid_gate(gate, centroids, temperature=2.5)
    nearest = torch.cdist(x.double(), centroids.double()).argmin(dim=1)
    assert torch.equal(gate(x).argmax(dim=1), nearest)
    # softmax(z) = softmax(-|x - c|^2 / T): the gate is the distance, not only its order.
    expected = (-(torch.cdist(x.double(), centroids.double()) ** 2) / 2.5).softmax(dim=1)
    assert torch.allclose(gate(x.double().float()).softmax(dim=1).double(), expected, atol=1e-4)


def test_auto_temperature_makes_the_initial_routing_independent_of_the_feature_scale():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=gen)
    x[:200] += 4
    routed = []
    for scale in (1.0, 50.0):
        model = build_model("tcssa-kmeans", 8, 2, num_slots=4, expert_hidden=8, head_hidden=8)
        model.initialise_from_patches(x * scale, seed=3)
        model.eval()
        routed.append(model.routing((x * scale)[None]).probs[0])
    assert torch.allclose(routed[0], routed[1], atol=1e-4)


def test_kmeans_centroids_are_deterministic_and_bad_samples_are_refused():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(2))
    a, spread_a = kmeans_centroids(x, 4, seed=9)
    b, spread_b = kmeans_centroids(x, 4, seed=9)
    assert torch.equal(a, b) and spread_a == spread_b > 0 and a.shape == (4, 5)
    nearest_two = torch.cdist(x.double(), a).square().topk(2, dim=1, largest=False).values
    assert spread_a == pytest.approx(float((nearest_two[:, 1] - nearest_two[:, 0]).median()) / 4.0)
    with pytest.raises(ValueError, match="at least K = 8 patches.*got 5"):
        kmeans_centroids(x[:5], 8, seed=0)
    bad = x.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans_centroids(bad, 4, seed=0)
    gate = torch.nn.Linear(5, 4)
    with pytest.raises(ValueError, match="temperature"):
        set_nearest_centroid_gate(gate, a, temperature=0.0)
    with pytest.raises(ValueError, match="K x D = 4 x 5"):
        set_nearest_centroid_gate(gate, a[:3], temperature=1.0)
    with pytest.raises(ValueError, match="gate_temperature"):
        build_model("tcssa-kmeans", 5, 2, gate_temperature=-1.0)
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("tcssa", 5, 2, head="max")


def test_a_rare_phenotype_pooled_across_slides_gets_a_slot_of_its_own():
    """The point of the init: 0.3% of the pooled patches, far from the rest, own their top-1 slot."""
    gen = torch.Generator().manual_seed(4)
    dim, tissues = 32, torch.randn(5, 32, generator=torch.Generator().manual_seed(5)) * 4
    lesion = tissues[0] + 6 * torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0) * 4
    slides, lesion_rows = [], []
    for i in range(20):
        x = tissues[torch.randint(0, 5, (1000,), generator=gen)] + torch.randn(1000, dim, generator=gen)
        is_lesion = torch.zeros(1000, dtype=torch.bool)
        if i % 2:  # positive slides: 3 lesion patches in 1000
            is_lesion[:3] = True
            x[:3] = lesion + torch.randn(3, dim, generator=gen)
        slides.append(x), lesion_rows.append(is_lesion)
    x, is_lesion = torch.cat(slides), torch.cat(lesion_rows)
    model = build_model("tcssa-kmeans", dim, 2, num_slots=16, expert_hidden=8, head_hidden=8)
    model.initialise_from_patches(x, seed=0)
    model.eval()
    top1 = model.routing(x[None]).topk_index[0, :, 0]
    lesion_slots = top1[is_lesion].unique()
    assert len(lesion_slots) == 1  # every lesion patch in one slot ...
    assert bool(is_lesion[top1 == lesion_slots[0]].all())  # ... which holds nothing else


def test_the_attention_head_ignores_empty_slots_and_padding():
    model = build_model("tcssa-attn", 6, 2, num_slots=8, expert_hidden=8, head_hidden=8).eval()
    x = torch.randn(1, 5, 6)  # 5 patches, top-2: at most 10 of 8 slots used, usually fewer
    out = model.routing(x)
    weights = model.slot_pool.weights(out.tokens, out.slot_counts > 0)
    assert torch.all(weights[out.slot_counts == 0] == 0)
    assert torch.allclose(weights.sum(dim=1), torch.ones(1))
    padded = torch.cat([x, torch.full((1, 7, 6), 3.0)], dim=1)
    mask = torch.arange(12)[None] < 5
    assert torch.allclose(model.predict(x), model.predict(padded, mask), atol=1e-6)


def test_pooled_patches_draw_alike_from_each_slide_and_repeat_with_the_seed():
    items = make_bags(10, dim=4, seed=0)  # 3..12 patches each
    sample = pooled_patches(items, total=50, seed=1, progress=False)
    per_slide = 5
    assert sample.shape[0] == sum(min(per_slide, bag.features.shape[0]) for bag, _ in items)
    assert torch.equal(sample, pooled_patches(items, total=50, seed=1, progress=False))
    with pytest.raises(ValueError, match="no slide"):
        pooled_patches([], total=10, seed=0)


def test_fit_initialises_the_gate_once_on_a_fresh_start_and_not_on_resume(tmp_path, monkeypatch):
    items = make_bags(16, dim=8, seed=3)
    calls = []
    original = type(build_model("tcssa", 8, 2)).initialise_from_patches

    def recording(self, patches, seed):
        calls.append(patches.shape[0])
        original(self, patches, seed)

    monkeypatch.setattr(type(build_model("tcssa", 8, 2)), "initialise_from_patches", recording)
    config = TrainConfig(epochs=2, lr=1e-3)
    model = build_model("tcssa-kmeans", 8, 2, num_slots=4, expert_hidden=8, head_hidden=8)
    fit(model, items, None, config, collate=pad_collate, out_dir=tmp_path, verbose=False)
    assert calls == [sum(bag.features.shape[0] for bag, _ in items)]  # small slides: every patch
    more = TrainConfig(epochs=3, lr=1e-3)
    again = build_model("tcssa-kmeans", 8, 2, num_slots=4, expert_hidden=8, head_hidden=8)
    fit(again, items, None, more, collate=pad_collate, out_dir=tmp_path, resume=True, verbose=False)
    assert len(calls) == 1
    plain = build_model("tcssa", 8, 2, num_slots=4, expert_hidden=8, head_hidden=8)
    fit(plain, items, None, config, collate=pad_collate, verbose=False)
    assert len(calls) == 1  # the paper's model asks for no patches: its gate stays as drawn


def test_slot_counts_from_routing_alone_equal_the_full_pass():
    model = build_model("tcssa", 6, 2, num_slots=5, expert_hidden=8, head_hidden=8).eval()
    x = torch.randn(2, 30, 6)
    mask = torch.arange(30)[None].expand(2, -1) < torch.tensor([[30], [17]])
    assert torch.equal(model.slot_counts(x, mask), model.routing(x, mask).slot_counts)
    assert torch.equal(model.slot_counts(x[0]), model.routing(x[0]).slot_counts)


def test_a_centred_model_ignores_a_shift_shared_by_every_patch_of_a_slide():
    centred = build_model("tcssa-centred-kmeans", 6, 2, num_slots=4, expert_hidden=8, head_hidden=8)
    plain = build_model("tcssa-kmeans", 6, 2, num_slots=4, expert_hidden=8, head_hidden=8)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(6))
    shift = torch.tensor([2.0, -1.0, 0.5, 0.0, 3.0, 1.0])  # a stain shift: the same for every patch
    for model in (centred, plain):
        model.initialise_from_patches(x, seed=0)
        model.eval()
    assert torch.allclose(centred.predict(x), centred.predict(x + shift), atol=1e-5)
    assert not torch.allclose(plain.predict(x), plain.predict(x + shift), atol=1e-3)
    # The init's pooled patches are centred per slide the same way.
    assert torch.allclose(centred.patch_transform(x + shift), centred.patch_transform(x), atol=1e-5)
    assert torch.equal(plain.patch_transform(x), x)


def test_pooling_for_the_init_leaves_the_feature_cache_as_training_would_find_it(tmp_path):
    from tcssa.data import BagDataset, Cohort
    from tcssa.io.features import write_h5

    features_dir = tmp_path / "features"
    features_dir.mkdir()
    rows = ["slide_id,label"]
    for i in range(4):
        write_h5(features_dir / f"s{i}.h5", torch.randn(40, 6).numpy(), None)
        rows.append(f"s{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cohort = Cohort.from_folder(features_dir, tmp_path / "labels.csv")
    dataset = BagDataset(cohort, cohort.slide_ids, cache_bytes=2**20)
    pooled_patches(dataset, total=64, seed=0, progress=False)
    assert dataset.cached_bytes == 0 and dataset.cache_bytes == 2**20
    dataset[0]
    assert dataset.cached_bytes > 0  # the cache still works after the pass


def test_one_slot_needs_no_temperature():
    model = build_model("tcssa-kmeans", 4, 2, num_slots=1, expert_hidden=8, head_hidden=8)
    model.initialise_from_patches(torch.randn(20, 4), seed=0)
    assert torch.isfinite(model.compressor.gate.weight).all()
