import pytest
import torch

from tcssa.data import BagDataset, Cohort, make_synthetic_cohort
from tcssa.data.memory import MemoryCohort
from tcssa.io.bag import Bag


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    synthetic = make_synthetic_cohort(
        root, num_slides=8, dim=16, min_patches=40, max_patches=120, progress=False, workers=1
    )
    return Cohort.from_folder(synthetic.features_dir, synthetic.labels_csv)


def test_items_match_the_file_backed_dataset(cohort):
    store = MemoryCohort.load(cohort, progress=False)
    assert store.slide_ids == cohort.slide_ids and store.nbytes > 0
    for cap, epoch in [(None, 0), (30, 0), (30, 3)]:
        on_disk = BagDataset(cohort, cohort.slide_ids, max_patches=cap, seed=7)
        in_memory = store.dataset(cohort.slide_ids, max_patches=cap, seed=7)
        on_disk.set_epoch(epoch)
        in_memory.set_epoch(epoch)
        assert len(in_memory) == len(on_disk)
        for (a, label_a), (b, label_b) in zip(on_disk, in_memory, strict=True):
            assert (a.slide_id, label_a) == (b.slide_id, label_b)
            assert b.features.dtype == torch.float32
            torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)  # float16 on disk, exact
            torch.testing.assert_close(a.coords, b.coords)


def test_a_fixed_subset_ignores_the_epoch_and_a_cap_draws_anew(cohort):
    store = MemoryCohort.load(cohort, progress=False)
    fixed = store.dataset(cohort.slide_ids, max_patches=10, seed=1, fixed_subset=True)
    moving = store.dataset(cohort.slide_ids, max_patches=10, seed=1)
    first_fixed, first_moving = fixed[0][0].features, moving[0][0].features
    fixed.set_epoch(5)
    moving.set_epoch(5)
    assert torch.equal(fixed[0][0].features, first_fixed)
    assert not torch.equal(moving[0][0].features, first_moving)
    assert fixed[0][0].num_patches == 10


def test_map_keeps_precomputed_bags_exact(cohort):
    store = MemoryCohort.load(cohort, progress=False)
    means = store.map(lambda bag: Bag(bag.features.mean(0, keepdim=True), None, bag.slide_id), progress=False)
    slide = cohort.slide_ids[0]
    expected = store.bags[slide].features.float().mean(0, keepdim=True)
    assert means.bags[slide].features.dtype == torch.float32
    assert torch.equal(means.dataset([slide])[0][0].features, expected)


def test_bad_requests_are_clear_errors(cohort):
    store = MemoryCohort.load(cohort, progress=False)
    with pytest.raises(ValueError, match="not in the cohort"):
        store.dataset(["nope"])
    with pytest.raises(ValueError, match="max_patches must be >= 1"):
        store.dataset(cohort.slide_ids, max_patches=0)
    with pytest.raises(ValueError, match="no bag in memory"):
        MemoryCohort(cohort, {})
