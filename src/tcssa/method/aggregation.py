"""Step 5 of docs/METHOD.md: each slot's weighted mean of its patches.

    c_k = sum_j P~_jk x_j / (sum_j P~_jk + 1e-9)

computed from per-slide sums (``SlotSums``), so that a slide streamed a chunk at a time adds up
to exactly what the whole slide in memory gives; the same sums feed the routing loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tcssa.method.routing import Routing
from tcssa.method.routing_loss import accumulation_dtype

AGGREGATION_EPS = 1e-9


@dataclass
class SlotSums:
    """Per-slide sums over real patches: all that steps 5-6 and the routing loss need."""

    slot_sum: Tensor  # B x K x D  sum_j P~_jk x_j
    slot_mass: Tensor  # B x K     sum_j P~_jk
    slot_counts: Tensor  # B x K   top-k assignments per slot (long)
    prob_sum: Tensor  # B x K      sum_j P_jk (for Pbar)
    lse_sum: Tensor  # B           sum_j logsumexp_k z~_jk (for the z-loss)
    num_real: Tensor  # B          real patches

    def __iadd__(self, other: SlotSums) -> SlotSums:  # more patches of the same slides
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @staticmethod
    def cat(parts: Sequence[SlotSums]) -> SlotSums:  # more slides
        fields = SlotSums.__dataclass_fields__
        return SlotSums(*(torch.cat([getattr(p, name) for p in parts]) for name in fields))


def count_assignments(topk_index: Tensor, mask: Tensor | None, num_slots: int) -> Tensor:
    """B x K: the real patches assigned to each slot by top-k routing (``topk_index`` B x N x top_k)."""
    # Counting from indices (not from weights > 0) so that an underflowed P still counts.
    real = torch.ones_like(topk_index) if mask is None else mask.unsqueeze(-1).expand_as(topk_index)
    counts = torch.zeros(topk_index.shape[0], num_slots, dtype=torch.long, device=topk_index.device)
    return counts.scatter_add_(1, topk_index.flatten(1), real.flatten(1).long())


def sum_slots(
    x: Tensor, mask: Tensor | None, routing: Routing, num_slots: int, x_low: Tensor | None = None
) -> SlotSums:
    """The sums over patches that step 5 and the routing loss need (``x_low``: ``x`` in a lower
    dtype, for the aggregation product alone; ``tcssa.method.mixed``).

    Sums, not means, so that a slide streamed in chunks adds up to exactly what the whole slide
    in memory gives. They are kept in float32 (float64 for a float64 model) whatever the model's
    dtype: in bfloat16 a sum over N = 100,001 patches would be rounded to a multiple of 512 (the
    patch count itself becomes 99,840), and the routing-loss terms, small differences of such
    sums, would be lost. The sums are B x K (x D), so this costs nothing next to the B x N x K
    routing.
    """
    probs, index = routing.probs, routing.topk_index
    acc = accumulation_dtype(probs.dtype)
    # The top-2 weights scattered into a dense B x N x K matrix and aggregated with one batched
    # matmul: on CPU this beats index_add and torch.sparse (docs/RESULTS.md, "Speed and memory").
    weights = torch.zeros_like(probs).scatter_(-1, index, routing.topk_weight)  # P~, B x N x K
    lse = routing.lse
    slot_counts = count_assignments(index, mask, num_slots)
    if mask is None:
        prob_sum, lse_sum = probs.sum(dim=1, dtype=acc), lse.sum(dim=-1, dtype=acc)
        num_real = torch.full_like(lse_sum, probs.shape[1])
    else:
        real = mask.to(acc)
        if probs.dtype == acc:  # one matmul
            prob_sum = torch.einsum("bnk,bn->bk", probs, real)
        else:  # zero the padded patches in the model's dtype (exact), add up in float32
            prob_sum = (probs * mask.unsqueeze(-1)).sum(dim=1, dtype=acc)
        lse_sum, num_real = (lse.to(acc) * real).sum(dim=-1), real.sum(dim=-1)
    return SlotSums(
        # sum_j P~_jk x_j, B x K x D: the matmul in the model's dtype, kept in float32 so that
        # streamed chunks add up without a rounding per chunk
        slot_sum=(weights.transpose(1, 2) @ x).to(acc)
        if x_low is None
        else (weights.to(x_low.dtype).transpose(1, 2) @ x_low).to(acc),
        slot_mass=weights.sum(dim=1, dtype=acc),  # sum_j P~_jk, B x K
        slot_counts=slot_counts,
        prob_sum=prob_sum,
        lse_sum=lse_sum,
        num_real=num_real,
    )


def slot_means(sums: SlotSums, dtype: torch.dtype) -> Tensor:
    """Step 5, B x K x D in ``dtype``: an empty slot gives c_k = 0/(0 + 1e-9) = 0."""
    slots = sums.slot_sum / (sums.slot_mass.unsqueeze(-1) + AGGREGATION_EPS)
    return slots.to(dtype)  # the sums are float32; the experts run in the model's dtype
