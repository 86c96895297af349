import numpy as np
import pytest
import torch

from tcssa import TCSSA
from tcssa.apps.slide_slots import slot_class_agreement, top1_slots


def test_slots_that_follow_the_classes_score_far_above_random_routing():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, size=600)
    slots = classes * 3 + rng.integers(0, 3, size=600)  # each class split over 3 slots of its own
    found = slot_class_agreement(slots, classes, permutations=50)
    assert found.nmi > 0.7 and found.ari > 0.2
    assert found.random_nmi_mean < 0.05 and abs(found.random_ari_mean) < 0.02
    assert found.nmi > found.random_nmi_mean + 10 * found.random_nmi_std
    assert (found.slots_used, found.classes_present, found.num_tiles) == (12, 4, 600)


def test_slots_unrelated_to_the_classes_sit_inside_the_random_baseline():
    rng = np.random.default_rng(1)
    classes, slots = rng.integers(0, 5, size=2000), rng.integers(0, 32, size=2000)
    found = slot_class_agreement(slots, classes, permutations=100)
    assert abs(found.nmi - found.random_nmi_mean) < 4 * found.random_nmi_std
    assert "random routing" in found.text()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one length"):
        slot_class_agreement(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="at least 2"):
        slot_class_agreement(np.zeros(1, int), np.zeros(1, int))
    with pytest.raises(ValueError, match="permutations"):
        slot_class_agreement(np.zeros(5, int), np.zeros(5, int), permutations=1)


def test_top1_slot_is_the_compressors_first_choice():
    torch.manual_seed(0)
    model = TCSSA(16, num_slots=8, expert_hidden=8)
    x = torch.randn(50, 16)
    slots = top1_slots(model, x)
    expected = model.gate(x).argmax(dim=-1).numpy()
    assert slots.dtype == np.int64 and np.array_equal(slots, expected)


def test_slot_map_of_the_real_slide_draws_slots_beside_tissue_classes(tmp_path, shared_data):
    from tcssa.cli import main
    from tcssa.io.files import read_json

    slide = shared_data / "wsi" / "cmu-1-small-region.svs"
    if not slide.is_file():
        pytest.skip(f"{slide} not found")
    assert main(["slotmap", str(slide), "--out", str(tmp_path), "--device", "cpu", "--num-slots", "8"]) == 0
    summary = read_json(tmp_path / "slotmaps" / "cmu-1-small-region.json")
    # 34 tiles of 256 px at 20x hold at least half tissue (docs/RESULTS.md); a few either way is a
    # change of the tissue method, a large change a broken one.
    assert 25 <= summary["num_tiles"] <= 45 and summary["classes_present"] >= 1
    assert summary["compressor"].startswith("untrained")
    assert (tmp_path / "slotmaps" / "cmu-1-small-region.png").stat().st_size > 10_000
    assert (tmp_path / "features_capricorn-densenet121" / "cmu-1-small-region.h5").is_file()
