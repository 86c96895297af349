import pytest
import torch
from torch.utils.data import DataLoader

from tcssa.data.batching import LengthBucketSampler, bucket_by_length, pad_slides


def test_bucket_by_length_groups_similar_lengths():
    lengths = [50, 3, 49, 4, 100, 5, 51, 2]
    batches = bucket_by_length(lengths, batch_size=3)
    assert batches == [[7, 1, 3], [5, 2, 0], [6, 4]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_bucket_by_length_respects_the_padded_patch_budget():
    lengths = [10, 10, 10, 40, 200]
    batches = bucket_by_length(lengths, batch_size=8, max_patches=60)
    assert batches == [[0, 1, 2], [3], [4]]  # 4 x 40 > 60; the 200-patch slide goes alone
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 60


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 2, "max_patches": 0}])
def test_bucket_by_length_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        bucket_by_length([1, 2], **kwargs)


def test_sampler_covers_every_slide_once_and_changes_with_the_epoch():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 1000, (97,), generator=gen).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=8, max_patches=4000, seed=3, pool_batches=4)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(97))
    assert all(len(b) <= 8 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4000) for b in first)
    assert list(sampler) == first  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert len(sampler) == len(list(sampler))
    # Bucketing pads much less than random batches of the same size.
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = [list(range(i, min(i + 8, 97))) for i in range(0, 97, 8)]
    assert padded(first) - sum(lengths) < 0.5 * (padded(random_batches) - sum(lengths))


def test_sampler_drives_a_dataloader():
    data = [torch.full((n, 3), float(n)) for n in (5, 1, 4, 2, 3)]
    sampler = LengthBucketSampler([len(d) for d in data], batch_size=2, shuffle=False)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=pad_slides)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(2, 2, 3), (2, 4, 3), (1, 5, 3)]


def test_pad_slides_masks_the_padding():
    x, mask = pad_slides([torch.ones(3, 4), torch.ones(1, 4) * 2])
    assert x.shape == (2, 3, 4) and mask.tolist() == [[True] * 3, [True, False, False]]
    assert (x[1, 1:] == 0).all()


def test_pad_slides_reuses_a_large_enough_buffer():
    buffer = torch.full((100,), 7.0)
    x, mask = pad_slides([torch.ones(3, 4), torch.ones(2, 4) * 2], buffer)
    assert x.shape == (2, 3, 4) and x.is_contiguous()
    assert x.data_ptr() == buffer.data_ptr()  # padded in place: no new block per batch
    assert x[1, 2].tolist() == [0.0] * 4 and mask.tolist() == [[True] * 3, [True, True, False]]
    small = torch.empty(5)
    y, _ = pad_slides([torch.ones(3, 4)], small)  # too small: a fresh tensor
    assert y.data_ptr() != small.data_ptr() and torch.equal(y, torch.ones(1, 3, 4))
