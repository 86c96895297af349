"""BagDataset and collate_bags: padding with a mask, patch caps, the fp16 cache, DataLoader workers."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tcssa import TCSSA
from tcssa.data import BagDataset, Cohort, collate_bags
from tcssa.io.bag import Bag
from tcssa.io.features import write_h5

SIZES = {"s0": 7, "s1": 30, "s2": 12, "s3": 1}


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "feats"
    for slide, n in SIZES.items():
        coords = np.stack([np.arange(n), np.zeros(n)], axis=1) * 256
        write_h5(folder / f"{slide}.h5", rng.normal(size=(n, 6)).astype(np.float32), coords)
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(SIZES)))
    return Cohort.from_folder(folder, csv)


def test_items_are_bags_with_their_labels(cohort):
    dataset = BagDataset(cohort, ["s1", "s0"])
    bag, label = dataset[0]
    assert len(dataset) == 2
    assert bag.slide_id == "s1" and bag.num_patches == 30 and label == 1
    assert dataset[1][1] == 0


def test_collate_pads_and_masks(cohort):
    dataset = BagDataset(cohort)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate_bags(items)
    assert batch.features.shape == (4, 30, 6) and batch.features.dtype == torch.float32
    assert batch.mask.dtype == torch.bool and batch.mask.sum(1).tolist() == list(SIZES.values())
    assert batch.coords.shape == (4, 30, 2) and batch.coords.dtype == torch.int64
    assert batch.labels.tolist() == [0, 1, 0, 1] and batch.slide_ids == list(SIZES)
    for row, (bag, _) in enumerate(items):
        n = bag.num_patches
        assert torch.equal(batch.features[row, :n], bag.features)
        assert torch.equal(batch.coords[row, :n], bag.coords)
        assert not batch.features[row, n:].any()
    assert len(batch) == 4 and batch.to("cpu").features.shape == (4, 30, 6)


def test_padding_does_not_change_the_compressed_tokens(cohort):
    """A padded batch must give each slide the tokens it gets alone (docs/METHOD.md)."""
    torch.manual_seed(0)
    model = TCSSA(dim=6, num_slots=4, expert_hidden=8).eval()
    dataset = BagDataset(cohort)
    batch = collate_bags([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        together = model(batch.features, batch.mask).tokens
        for row in range(len(dataset)):
            alone = model(dataset[row][0].features[None]).tokens
            torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)


def test_coords_are_none_unless_every_bag_has_them():
    with_coords = Bag(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long), "a")
    without = Bag(torch.ones(4, 3), None, "b")
    batch = collate_bags([(with_coords, 0), (without, 1)])
    assert batch.coords is None and batch.mask.sum().item() == 6


def test_collate_refuses_mixed_dimensions_and_empty_batches():
    with pytest.raises(ValueError, match=r"different feature dimensions: a \(D=3\), b \(D=4\)"):
        collate_bags([(Bag(torch.ones(2, 3), None, "a"), 0), (Bag(torch.ones(2, 4), None, "b"), 0)])
    with pytest.raises(ValueError, match="at least one bag"):
        collate_bags([])


def test_patch_cap_is_a_seeded_random_subset(cohort):
    full = BagDataset(cohort)[1][0]
    capped = BagDataset(cohort, max_patches=8, seed=3)
    bag, _ = capped[1]
    assert bag.num_patches == 8
    rows = [int(torch.nonzero((full.features == row).all(1))[0]) for row in bag.features]
    assert rows == sorted(rows) and len(set(rows)) == 8  # distinct patches, file order
    assert torch.equal(bag.coords, full.coords[rows])
    again = BagDataset(cohort, max_patches=8, seed=3)[1][0]
    assert torch.equal(again.features, bag.features)  # reproducible
    other_seed = BagDataset(cohort, max_patches=8, seed=4)[1][0]
    assert not torch.equal(other_seed.features, bag.features)
    capped.set_epoch(1)
    assert not torch.equal(capped[1][0].features, bag.features)  # each epoch sees other patches
    assert capped[3][0].num_patches == 1  # smaller slides are kept whole


def test_fp16_cache_respects_its_budget(cohort, tmp_path):
    per_patch = 6 * 2 + 2 * 8  # float16 features + int64 coords
    budget = per_patch * (7 + 11)
    dataset = BagDataset(cohort, cache_bytes=budget)
    first = [dataset[i][0] for i in range(len(dataset))]
    assert dataset.cached_bytes == per_patch * (7 + 1) <= budget
    assert set(dataset._cache) == {"s0", "s3"}  # s1 (30 patches) and then s2 (12) would exceed it
    for path in tmp_path.joinpath("feats").glob("*.h5"):
        path.unlink()  # cached slides no longer need their files
    bag, _ = dataset[0]
    assert bag.features.dtype == torch.float32
    torch.testing.assert_close(bag.features, first[0].features, rtol=1e-3, atol=1e-3)
    assert torch.equal(dataset[3][0].coords, first[3].coords)
    with pytest.raises(FileNotFoundError):
        dataset[1]


def test_dimension_change_after_the_cohort_was_built_is_caught(cohort):
    write_h5(cohort.paths["s2"], np.ones((12, 9), dtype=np.float32))
    with pytest.raises(ValueError, match=r"s2.h5: feature dimension 9 differs from the cohort's 6"):
        BagDataset(cohort)[2]


def test_bad_arguments(cohort):
    with pytest.raises(ValueError, match="max_patches"):
        BagDataset(cohort, max_patches=0)
    with pytest.raises(ValueError, match="not in the cohort"):
        BagDataset(cohort, ["zz"])


def test_dataloader_with_workers_and_batch_size_above_one(cohort):
    loader = DataLoader(
        BagDataset(cohort, max_patches=10, seed=0),
        batch_size=3,
        num_workers=2,
        collate_fn=collate_bags,
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 1]
    assert batches[0].features.shape == (3, 10, 6)
    assert batches[0].mask.sum(1).tolist() == [7, 10, 10]


def test_extras_follow_the_patch_cap(tmp_path):
    features = np.arange(40, dtype=np.float32).reshape(20, 2)
    write_h5(tmp_path / "f" / "a.h5", features, extra={"phenotype": np.arange(20)})
    write_h5(tmp_path / "f" / "b.h5", features, extra={"phenotype": np.arange(20)})
    csv = tmp_path / "l.csv"
    csv.write_text("slide_id,label\na,0\nb,1\n")
    dataset = BagDataset(Cohort.from_folder(tmp_path / "f", csv), max_patches=5, extras=("phenotype",))
    bag, _ = dataset[0]
    assert np.array_equal(bag.features[:, 0].numpy() / 2, bag.extras["phenotype"])  # rows stay aligned
