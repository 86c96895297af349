"""Other ways to spend a K-token budget, for comparison with TC-SSA's semantic slots.

Each function turns a padded batch of patch features (B x N x D, mask B x N,
True for real patches) into exactly K tokens per slide:

- ``select_random``: K patches sampled without replacement (the "sampling"
  that TC-SSA argues throws rare evidence away);
- ``kmeans_pool``: the K centroids of a per-slide k-means (batched Lloyd
  iterations in torch, deterministic farthest-point initialisation);
- ``grid_pool``: the means of K spatial cells of the slide, cut from the patch
  coordinates by median splits (a k-d partition), so that every cell holds
  about N/K patches. A regular grid over the bounding box would leave most
  cells empty on irregular tissue and so not give K tokens.

All return ``BudgetTokens(tokens B x K x D, token_mask B x K, assignment B x N)``.
A slide with fewer than K real patches gets one token per patch and zero
tokens with ``token_mask`` False for the rest; consumers average over the
valid tokens only. ``assignment`` is the token each patch feeds (-1 for
padded and, in ``select_random``, unselected patches). Choosing the tokens is
not differentiable; pooling the features into them is.

Padded patches never change a slide's tokens: every choice is made per slide
from its real patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: Prime modulus of the content hash (2^31 - 1): products of two residues fit in int64.
_HASH_PRIME = 2_147_483_647
_HASH_CHUNK = 4096  # patches hashed at a time, to bound the N x D int64 temporary


class BudgetTokens(NamedTuple):
    tokens: Tensor  # B x K x D
    token_mask: Tensor  # B x K bool; False for the missing tokens of slides with fewer than K patches
    assignment: Tensor  # B x N long; token index each patch feeds, -1 for none


def _check(x: Tensor, mask: Tensor | None, k: int) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"expected features of shape B x N x D, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"the token budget K must be >= 1, got {k}")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape B x N = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"slide(s) at batch index {empty} have no real patch (mask all False)")
    return mask


def pool_by_assignment(x: Tensor, assignment: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean of the patches assigned to each of K tokens (B x N long, -1 = none).

    Returns ``(tokens B x K x D, counts B x K)``; a token without patches is 0.
    """
    onehot = torch.zeros(*assignment.shape, k + 1, dtype=x.dtype, device=x.device)
    onehot.scatter_(-1, (assignment + 1).unsqueeze(-1), 1.0)
    onehot = onehot[..., 1:]  # column 0 collected the unassigned (-1)
    counts = onehot.sum(dim=1)
    tokens = (onehot.transpose(1, 2) @ x) / counts.clamp(min=1.0).unsqueeze(-1)
    return tokens, counts


# ------------------------------------------------------------------ random-k
def content_hash(x: Tensor, seed: int = 0) -> Tensor:
    """A pseudo-random score in [0, 1) per patch (B x N float64), a function of its features only.

    The float32 bit pattern of every feature is hashed with two seeded
    universal hashes modulo 2^31 - 1 in exact integer arithmetic, so the
    score of a patch is the same on any device, in any batch and at any
    position: sampling by the lowest scores is deterministic, padding- and
    permutation-invariant.
    """
    gen = torch.Generator().manual_seed(seed)
    coeff = torch.randint(1, _HASH_PRIME, (2, x.shape[-1]), generator=gen, dtype=torch.int64).to(x.device)
    mix = torch.randint(1, _HASH_PRIME, (2, 2), generator=gen, dtype=torch.int64).to(x.device)
    flat = x.detach().to(torch.float32).reshape(-1, x.shape[-1])
    hashes = torch.empty(2, flat.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, flat.shape[0], _HASH_CHUNK):
        bits = flat[start : start + _HASH_CHUNK].contiguous().view(torch.int32).to(torch.int64)
        residue = (bits & 0xFFFFFFFF) % _HASH_PRIME  # < 2^31, so residue * coeff < 2^62
        for h in range(2):
            summed = ((residue * coeff[h]) % _HASH_PRIME).sum(dim=-1)  # < D * 2^31
            hashes[h, start : start + _HASH_CHUNK] = (
                summed * mix[h, 0] % _HASH_PRIME + mix[h, 1]
            ) % _HASH_PRIME
    # The second hash only breaks ties of the first; both fit in a float64 mantissa together.
    score = (hashes[0].double() + hashes[1].double() / _HASH_PRIME) / _HASH_PRIME
    return score.reshape(x.shape[:2])


def select_random(
    x: Tensor, mask: Tensor | None, k: int, *, generator: torch.Generator | None = None, seed: int = 0
) -> BudgetTokens:
    """K of each slide's real patches, sampled uniformly without replacement.

    With a ``generator`` (training) the sample is drawn from it; without one
    (evaluation) the K patches with the lowest ``content_hash(x, seed)`` are
    taken, which is deterministic and invariant to padding and patch order.
    Tokens are ordered by their score.
    """
    mask = _check(x, mask, k)
    batch, n = mask.shape
    with torch.no_grad():
        if generator is None:
            scores = content_hash(x, seed)
        else:
            scores = torch.rand(batch, n, generator=generator, dtype=torch.float64, device=generator.device)
            scores = scores.to(x.device)
        scores = scores.masked_fill(~mask, float("inf"))
        take = min(k, n)
        index = scores.topk(take, dim=1, largest=False).indices  # B x take, real patches first
        picked_real = mask.gather(1, index)
    tokens = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    tokens = tokens * picked_real.unsqueeze(-1).to(x.dtype)
    token_mask = picked_real
    if take < k:  # fewer patches than K even with padding: pad the token axis
        tokens = torch.cat([tokens, tokens.new_zeros(batch, k - take, x.shape[-1])], dim=1)
        token_mask = torch.cat([token_mask, token_mask.new_zeros(batch, k - take)], dim=1)
    assignment = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    slot = torch.arange(take, device=x.device).expand(batch, -1)
    assignment.scatter_(1, index, slot.masked_fill(~picked_real, -1))
    return BudgetTokens(tokens, token_mask, assignment)


# ------------------------------------------------------------------ kmeans-k
def _sq_distances(x: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances B x N x K between patches and centers."""
    dist = x_sq.unsqueeze(-1) - 2.0 * (x @ centers.transpose(1, 2)) + centers.square().sum(-1).unsqueeze(1)
    return dist.clamp(min=0.0)


def kmeans_pool(x: Tensor, mask: Tensor | None, k: int, iterations: int = 10) -> BudgetTokens:
    """The K k-means centroids of each slide's real patches (batched Lloyd iterations).

    Initialisation is deterministic and does not depend on patch order: the
    first center is the patch nearest to the slide's mean, each next one the
    patch farthest from all centers so far (farthest-point / maximin). Then up
    to ``iterations`` Lloyd steps, stopping early once no assignment changes
    (a fixed point, so stopping early never changes the result). A cluster that
    loses all its patches keeps its previous center. Slides with fewer than K
    patches get their patches as tokens and invalid tokens for the rest.
    """
    return kmeans_pools(x, mask, [k], iterations)[k]


def kmeans_pools(
    x: Tensor, mask: Tensor | None, ks: Sequence[int], iterations: int = 10
) -> dict[int, BudgetTokens]:
    """``kmeans_pool`` for several K at once, each result identical to its own call.

    Farthest-point initialisation is greedy, so the first k centers chosen for the largest K are
    exactly the k centers a run with K = k would choose: the K sequential passes over the slide are
    made once for the largest K and shared (a budget sweep over K = 8..128 costs 128 passes, not 248).
    """
    if not ks:
        raise ValueError("kmeans_pools needs at least one K")
    largest = max(ks)
    mask = _check(x, mask, min(ks))  # also refuses a K below 1
    if iterations < 0:
        raise ValueError(f"k-means iterations must be >= 0, got {iterations}")
    batch, n, dim = x.shape
    num_real = mask.sum(dim=1)
    with torch.no_grad():
        data = x.detach()
        x_sq = data.square().sum(-1)
        # Farthest-point initialisation over real patches, up to the largest K.
        mean = (data * mask.unsqueeze(-1)).sum(1) / num_real.unsqueeze(-1)
        dist_to_mean = _sq_distances(data, x_sq, mean.unsqueeze(1)).squeeze(-1)
        current = dist_to_mean.masked_fill(~mask, float("inf")).argmin(dim=1)  # B
        chosen = [current]
        nearest = torch.full((batch, n), float("inf"), dtype=x.dtype, device=x.device)
        for _ in range(1, largest):
            center = data.gather(1, current.view(batch, 1, 1).expand(-1, 1, dim))
            nearest = torch.minimum(nearest, _sq_distances(data, x_sq, center).squeeze(-1))
            current = nearest.masked_fill(~mask, float("-inf")).argmax(dim=1)
            chosen.append(current)
        order = torch.stack(chosen, dim=1)  # B x largest
    return {k: _lloyd(x, data, x_sq, mask, num_real, order[:, :k], k, iterations) for k in ks}


def _lloyd(
    x: Tensor,
    data: Tensor,
    x_sq: Tensor,
    mask: Tensor,
    num_real: Tensor,
    index: Tensor,
    k: int,
    iterations: int,
) -> BudgetTokens:
    """Lloyd steps from the centers ``index`` (B x k patch indices); the tokens of the final clusters."""
    dim = x.shape[-1]
    token_mask = torch.arange(k, device=x.device).unsqueeze(0) < num_real.unsqueeze(1)  # B x K
    with torch.no_grad():
        centers = data.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))

        def assign(centers: Tensor) -> Tensor:
            dist = _sq_distances(data, x_sq, centers).masked_fill(~token_mask.unsqueeze(1), float("inf"))
            return dist.argmin(dim=-1).masked_fill(~mask, -1)

        assignment = assign(centers)
        for _ in range(iterations):
            means, counts = pool_by_assignment(data, assignment, k)
            centers = torch.where(counts.unsqueeze(-1) > 0, means, centers)
            updated = assign(centers)
            if torch.equal(updated, assignment):
                break
            assignment = updated
    # The tokens are the (differentiable) means of the final clusters; an empty one keeps its center.
    means, counts = pool_by_assignment(x, assignment, k)
    tokens = torch.where(counts.unsqueeze(-1) > 0, means, centers.to(x.dtype))
    tokens = tokens * token_mask.unsqueeze(-1).to(x.dtype)
    return BudgetTokens(tokens, token_mask, assignment)


# ------------------------------------------------------------------- grid-k
def _kd_cells(coords: Tensor, k: int) -> Tensor:
    """Cell index 0..k-1 of each of n >= k points (n x 2): recursive median splits, every cell non-empty.

    Each split cuts a group along its longer side, in proportion to the number
    of cells on each side; points are ordered lexicographically (that axis,
    then the other) so ties on one coordinate are broken by position, not by
    input order.
    """
    cells = torch.empty(coords.shape[0], dtype=torch.long, device=coords.device)

    def split(index: Tensor, cells_here: int, first_cell: int) -> None:
        if cells_here == 1:
            cells[index] = first_cell
            return
        pts = coords[index]
        extent = pts.amax(dim=0) - pts.amin(dim=0)
        axis = 0 if bool(extent[0] >= extent[1]) else 1
        order = torch.sort(pts[:, 1 - axis], stable=True).indices
        order = order[torch.sort(pts[order, axis], stable=True).indices]
        left_cells = cells_here // 2
        right_cells = cells_here - left_cells
        count = index.shape[0]
        left = round(count * left_cells / cells_here)
        left = min(max(left, left_cells), count - right_cells)
        split(index[order[:left]], left_cells, first_cell)
        split(index[order[left:]], right_cells, first_cell + left_cells)

    split(torch.arange(coords.shape[0], device=coords.device), k, 0)
    return cells


def grid_pool(x: Tensor, coords: Tensor | None, mask: Tensor | None, k: int) -> BudgetTokens:
    """The means of K spatial cells of each slide, cut from the patch coordinates (B x N x 2).

    Cells come from recursive median splits of the real patches' coordinates
    (``_kd_cells``), so with n >= K patches every cell is non-empty and holds
    about n/K of them. With n < K patches each patch is its own token.
    """
    mask = _check(x, mask, k)
    if coords is None:
        raise ValueError("grid pooling needs patch coordinates (B x N x 2), but none were given")
    if tuple(coords.shape) != (*x.shape[:2], 2):
        raise ValueError(f"coords must have shape B x N x 2 = {(*x.shape[:2], 2)}, got {tuple(coords.shape)}")
    batch, n = mask.shape
    assignment = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    with torch.no_grad():
        coords = coords.to(device=x.device, dtype=torch.float64)
        for b in range(batch):
            real = mask[b].nonzero().flatten()
            if real.shape[0] <= k:
                assignment[b, real] = torch.arange(real.shape[0], device=x.device)
            else:
                assignment[b, real] = _kd_cells(coords[b, real], k)
    tokens, counts = pool_by_assignment(x, assignment, k)
    return BudgetTokens(tokens, counts > 0, assignment)


# ------------------------------------------------------------------ effective K (issue 15)
#: A slot with less than this share of a slide's routing mass (sum of its truncated weights P~) is
#: negligible: dropping its token would change the slide's tokens by almost nothing.
NEGLIGIBLE_SLOT_MASS = 0.01


def slot_mass(topk_weight: Tensor, topk_index: Tensor, num_slots: int) -> Tensor:
    """B x K float64: each slot's routing mass sum_j P~_jk, from the compressor's ``topk_weight`` and
    ``topk_index`` (B x N x top_k; 0 and -1 at padding, so padding adds no mass)."""
    weight = topk_weight.detach().clamp(min=0).to(torch.float64)
    index = topk_index.clamp(min=0)
    mass = torch.zeros(weight.shape[0], num_slots, dtype=torch.float64, device=weight.device)
    return mass.scatter_add_(1, index.flatten(1), weight.flatten(1))


def effective_slots(
    topk_weight: Tensor, topk_index: Tensor, num_slots: int, min_share: float = NEGLIGIBLE_SLOT_MASS
) -> Tensor:
    """Per slide (B), the slots holding at least ``min_share`` of its routing mass: the K a slide
    really uses. ``topk_weight``/``topk_index`` (B x N x top_k) are the compressor's, 0 and -1 at
    padding (padding adds no mass)."""
    if not 0 <= min_share < 1:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    mass = slot_mass(topk_weight, topk_index, num_slots)
    share = mass / mass.sum(dim=1, keepdim=True).clamp(min=1e-300)
    return ((share >= min_share) & (mass > 0)).sum(dim=1)


#: ``token_budget="auto"``: keep the fewest slots whose routing mass covers this share of a slide's.
AUTO_COVERAGE = 0.99
#: Shares of a slide's routing mass closer than this count as equal (float32 rounding of the weights).
COVERAGE_TOLERANCE = 1e-6


def coverage_mask(mass: Tensor, coverage: float) -> Tensor:
    """B x K bool: per slide, the fewest slots whose routing mass (``mass``, B x K, >= 0) adds up to
    at least ``coverage`` of the slide's total (coverage 1: every slot with mass).

    Slots are taken by decreasing mass (ties: the lower slot index first); a slot with no mass is never
    kept, and the heaviest slot always is, so every slide keeps at least one token. A function of
    each slide's masses alone: padding, which adds no mass, never changes the mask.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    mass = mass.detach().to(torch.float64).clamp(min=0)
    order = torch.sort(mass, dim=1, descending=True, stable=True)
    total = order.values.sum(dim=1, keepdim=True)
    before = order.values.cumsum(dim=1) - order.values  # mass of the heavier slots
    # A slot is needed while the heavier ones fall short of the target by more than float32 rounding
    # (masses come from float32 weights; coverage 1 does not ask for a slot below the sum's rounding).
    needed = before < (coverage - COVERAGE_TOLERANCE) * total
    needed &= order.values > 0
    needed[:, 0] = True
    return torch.zeros_like(needed).scatter_(1, order.indices, needed)
