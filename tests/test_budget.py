import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tcssa.method import budget


def test_pool_by_assignment_is_the_mean_of_each_token():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 7.0]]])
    assignment = torch.tensor([[1, 1, -1, 0]])
    tokens, counts = budget.pool_by_assignment(x, assignment, 3)
    torch.testing.assert_close(tokens[0], torch.tensor([[7.0, 7.0], [2.0, 1.0], [0.0, 0.0]]))
    assert counts[0].tolist() == [1.0, 2.0, 0.0]


# ------------------------------------------------------------------ random-k
def test_select_random_takes_k_real_patches_exactly():
    x = torch.arange(30, dtype=torch.float32).reshape(1, 10, 3)
    mask = torch.tensor([[True] * 7 + [False] * 3])
    out = budget.select_random(x, mask, 4)
    assert out.tokens.shape == (1, 4, 3) and out.token_mask.all()
    picked = (out.assignment[0] >= 0).nonzero().flatten()
    assert len(picked) == 4 and picked.max() < 7  # never a padded patch
    # Each token is exactly the patch assigned to it.
    for patch in picked.tolist():
        torch.testing.assert_close(out.tokens[0, out.assignment[0, patch]], x[0, patch])


def test_select_random_with_fewer_patches_than_k_masks_the_missing_tokens():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = budget.select_random(x, mask, 8)
    assert out.tokens.shape == (2, 8, 3)
    assert out.token_mask.sum(1).tolist() == [2, 5]
    assert (out.tokens[~out.token_mask] == 0).all()
    assert sorted(out.assignment[0, :2].tolist()) == [0, 1] and (out.assignment[0, 2:] == -1).all()


def test_content_hash_depends_on_features_only():
    x = torch.randn(1, 50, 7)
    perm = torch.randperm(50)
    a = budget.content_hash(x)
    b = budget.content_hash(x[:, perm])
    torch.testing.assert_close(b, a[:, perm], rtol=0, atol=0)
    padded = torch.cat([x, torch.zeros(1, 9, 7)], dim=1)
    torch.testing.assert_close(budget.content_hash(padded)[:, :50], a, rtol=0, atol=0)
    assert ((a >= 0) & (a < 1)).all()
    assert a.unique().numel() == 50
    assert not torch.equal(budget.content_hash(x, seed=1), a)


def test_content_hash_sample_looks_uniform():
    # Which patches are taken must not track any feature direction: the chosen half of a
    # sorted feature should be spread over its whole range.
    x = torch.linspace(-1, 1, 2000).reshape(1, 2000, 1)
    scores = budget.content_hash(x)[0]
    chosen = scores.argsort()[:200]
    assert 0.35 < (chosen < 1000).float().mean() < 0.65
    assert 0.4 < scores.mean() < 0.6


def test_select_random_from_a_generator_is_uniform():
    x = torch.randn(1, 20, 2)
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(500):
        hits += (budget.select_random(x, None, 5, generator=gen).assignment[0] >= 0).float()
    assert hits.sum() == 2500
    assert hits.min() > 80 and hits.max() < 170  # expected 125 each


# ------------------------------------------------------------------ kmeans-k
def test_kmeans_finds_well_separated_clusters_exactly():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.2], [0.0, -0.2]])
    points = (centers[:, None] + offsets[None]).reshape(12, 2)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    x = torch.cat([points[perm], torch.full((3, 2), 55.0)]).unsqueeze(0)  # plus 3 padded rows
    mask = torch.tensor([[True] * 12 + [False] * 3])
    out = budget.kmeans_pool(x, mask, 3)
    found = sorted(out.tokens[0].tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor(sorted(centers.tolist())))
    assert out.token_mask.all()
    assert (out.assignment[0, 12:] == -1).all()
    # Patches of one true cluster share one token.
    groups = out.assignment[0, :12][perm.argsort()].reshape(3, 4)
    assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == 3


def test_kmeans_lloyd_moves_centers_to_cluster_means():
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0], [11.0], [30.0]]])
    out = budget.kmeans_pool(x, None, 2)
    assert sorted(out.tokens[0, :, 0].tolist()) == pytest.approx([4.8, 30.0])
    out = budget.kmeans_pool(x, None, 3)
    assert sorted(out.tokens[0, :, 0].tolist()) == pytest.approx([1.0, 10.5, 30.0])


def test_kmeans_with_fewer_patches_than_k():
    x = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    out = budget.kmeans_pool(x, mask, 4)
    assert out.token_mask[0].tolist() == [True, True, False, False]
    assert sorted(out.tokens[0, :2].tolist()) == [[1.0, 1.0], [2.0, 2.0]]
    assert (out.tokens[0, 2:] == 0).all()


def test_kmeans_is_the_same_alone_and_in_a_batch():
    a, b = torch.randn(40, 5), torch.randn(25, 5)
    x = torch.zeros(2, 40, 5)
    x[0], x[1, :25] = a, b
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0], mask[1, :25] = True, True
    batched = budget.kmeans_pool(x, mask, 6)
    alone = budget.kmeans_pool(b.unsqueeze(0), None, 6)
    torch.testing.assert_close(batched.tokens[1], alone.tokens[0])
    assert torch.equal(batched.assignment[1, :25], alone.assignment[0])


# ------------------------------------------------------------------- grid-k
def test_grid_pool_cuts_equal_spatial_cells():
    # A 4 x 4 grid of patches, feature = patch id: K=4 gives the four 2 x 2 quadrants.
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], -1).unsqueeze(0) * 224
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    out = budget.grid_pool(x, coords, None, 4)
    cells = out.assignment[0].reshape(4, 4)
    for quadrant in (cells[:2, :2], cells[:2, 2:], cells[2:, :2], cells[2:, 2:]):
        assert quadrant.unique().numel() == 1
    assert cells.unique().numel() == 4
    means = sorted(out.tokens[0, :, 0].tolist())
    assert means == pytest.approx([2.5, 4.5, 10.5, 12.5])  # mean patch id of each quadrant


def test_grid_pool_splits_along_the_longer_side_and_gives_k_nonempty_cells():
    coords = torch.stack([torch.arange(10) * 100, torch.zeros(10, dtype=torch.long)], -1).unsqueeze(0)
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    out = budget.grid_pool(x, coords, None, 3)  # a strip: cells are runs along x of 3/4/3 patches
    assert out.assignment[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2] or out.assignment[0].tolist() == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    ]
    assert out.token_mask.all()
    counts = torch.bincount(out.assignment[0], minlength=3)
    assert counts.min() >= 3


def test_grid_pool_fewer_patches_than_k_and_padding():
    coords = torch.tensor([[[0, 0], [5, 5], [9, 9], [1, 1]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [99.0]]])
    mask = torch.tensor([[True, True, True, False]])
    out = budget.grid_pool(x, coords, mask, 5)
    assert out.token_mask[0].tolist() == [True, True, True, False, False]
    assert out.tokens[0, :3, 0].tolist() == [1.0, 2.0, 3.0]
    assert out.assignment[0, 3] == -1


def test_grid_pool_needs_coords():
    with pytest.raises(ValueError, match="coordinates"):
        budget.grid_pool(torch.randn(1, 5, 2), None, None, 2)


def test_budget_input_errors():
    with pytest.raises(ValueError, match="B x N x D"):
        budget.kmeans_pool(torch.randn(5, 2), None, 2)
    with pytest.raises(ValueError, match="K must be >= 1"):
        budget.select_random(torch.randn(1, 5, 2), None, 0)
    with pytest.raises(ValueError, match="no real patch"):
        budget.select_random(torch.randn(2, 5, 2), torch.tensor([[True] * 5, [False] * 5]), 2)


def test_kmeans_and_grid_with_identical_patches_stay_finite():
    x = torch.ones(1, 10, 3)
    coords = torch.zeros(1, 10, 2, dtype=torch.long)
    for out in (budget.kmeans_pool(x, None, 4), budget.grid_pool(x, coords, None, 4)):
        assert out.token_mask.all() and torch.isfinite(out.tokens).all()
        torch.testing.assert_close(out.tokens, torch.ones(1, 4, 3))
        assert (out.assignment >= 0).all()


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    k=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_every_budget_is_the_same_alone_and_padded(lengths, k, seed):
    gen = torch.Generator().manual_seed(seed)
    total = max(lengths) + 4
    x = torch.randn(len(lengths), total, 3, generator=gen)
    coords = torch.randint(0, 50, (len(lengths), total, 2), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, torch.randperm(total, generator=gen)[:n]] = True  # padding between real patches
    runs = {
        "random": lambda x, c, m: budget.select_random(x, m, k),
        "kmeans": lambda x, c, m: budget.kmeans_pool(x, m, k),
        "grid": lambda x, c, m: budget.grid_pool(x, c, m, k),
    }
    for name, run in runs.items():
        batched = run(x, coords, mask)
        assert batched.tokens.shape == (len(lengths), k, 3), name
        for i, n in enumerate(lengths):
            real = mask[i]
            alone = run(x[i : i + 1, real], coords[i : i + 1, real], None)
            torch.testing.assert_close(batched.tokens[i], alone.tokens[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(batched.token_mask[i], alone.token_mask[0]), name
            assert torch.equal(batched.assignment[i, real], alone.assignment[0]), name
            assert (batched.assignment[i, ~real] == -1).all(), name
            assert int(batched.token_mask[i].sum()) == min(n, k), name


def _reference_kmeans(points: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """kmeans_pool's documented algorithm, written out plainly for one slide (float64)."""
    dist = lambda a, c: ((a[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # noqa: E731
    first = int(np.argmin(dist(points, points.mean(0, keepdims=True))[:, 0]))
    chosen = [first]
    nearest = np.full(len(points), np.inf)
    for _ in range(1, k):
        nearest = np.minimum(nearest, dist(points, points[chosen[-1]][None])[:, 0])
        chosen.append(int(np.argmax(nearest)))
    centers = points[chosen].copy()
    assignment = dist(points, centers).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            if (assignment == j).any():
                centers[j] = points[assignment == j].mean(0)
        updated = dist(points, centers).argmin(1)
        if (updated == assignment).all():
            break
        assignment = updated
    return np.stack(
        [points[assignment == j].mean(0) if (assignment == j).any() else centers[j] for j in range(k)]
    )


def test_kmeans_pools_share_one_initialisation_and_match_each_k_alone():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 60, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 45:] = False
    pools = budget.kmeans_pools(x, mask, [3, 8, 5], iterations=4)
    assert sorted(pools) == [3, 5, 8]
    for k, out in pools.items():
        alone = budget.kmeans_pool(x, mask, k, iterations=4)
        torch.testing.assert_close(out.tokens, alone.tokens)
        for b, n in ((0, 60), (1, 45)):
            expected = _reference_kmeans(x[b, :n].numpy(), k, 4)
            np.testing.assert_allclose(out.tokens[b].numpy(), expected, atol=1e-9)
    with pytest.raises(ValueError, match="at least one K"):
        budget.kmeans_pools(x, mask, [])


def test_effective_slots_count_the_slots_with_a_real_share_of_the_routing_mass():
    from tcssa.method.budget import effective_slots

    # slide 0: slots 0 and 1 share the mass, slot 2 has 0.5% of it; slide 1: padding only adds -1/0.
    weight = torch.tensor([[[0.6, 0.395], [0.5, 0.005]], [[0.9, 0.1], [0.0, 0.0]]])
    index = torch.tensor([[[0, 1], [1, 2]], [[3, 0], [-1, -1]]])
    assert effective_slots(weight, index, num_slots=4).tolist() == [2, 2]
    assert effective_slots(weight, index, num_slots=4, min_share=0.0).tolist() == [3, 2]
    with pytest.raises(ValueError, match="min_share"):
        effective_slots(weight, index, num_slots=4, min_share=1.0)
