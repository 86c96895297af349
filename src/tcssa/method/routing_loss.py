"""The auxiliary routing loss of TC-SSA ("semantic affinity clustering").

Each term is a small pure function of per-slide routing statistics, so that it
can be read beside docs/METHOD.md and tested on hand-made inputs:

- ``switch_loss``:  L_switch = K * sum_i Pbar_i f_i
- ``entropy_loss``: L_ent = 1 - H(Pbar) / log K,  H(p) = -sum p log(p + 1e-8)
- ``z_loss``:       L_z = 1e-4 * (mean_j logsumexp_i z~_ji)^2
- ``aux_loss``:     L_aux = L_switch + 0.5 L_ent + L_z

Pbar_i is the mean routing probability of slot i over a slide's real patches,
f_i the mean of the top-k indicator m_ji (each patch contributes top_k ones,
so f sums to top_k). All functions take a leading batch dimension and return
one value per slide; callers average over slides.

Every term is computed, and returned, in float32 (float64 for float64 inputs)
whatever the dtype of its inputs: in bfloat16 a sum over a slide's patches is
rounded to 8 significant bits, and the entropy term, 1 minus a number close to
1, would round to 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ENTROPY_EPS = 1e-8
Z_LOSS_SCALE = 1e-4
ENTROPY_WEIGHT = 0.5
#: lambda in "task loss + lambda * L_aux"; the paper sees slot collapse when it is too low.
AUX_LOSS_WEIGHT = 0.1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing statistics are summed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _accurate(tensor: Tensor) -> Tensor:
    return tensor.to(accumulation_dtype(tensor.dtype))


def switch_loss(mean_prob: Tensor, assign_share: Tensor) -> Tensor:
    """Switch-Transformer load balancing, ``K * sum_i Pbar_i f_i`` (B x K -> B)."""
    num_slots = mean_prob.shape[-1]
    return num_slots * (_accurate(mean_prob) * _accurate(assign_share)).sum(-1)


def entropy_loss(mean_prob: Tensor) -> Tensor:
    """``1 - H(Pbar) / log K``: 0 for uniform routing mass, 1 when it collapses on one slot.

    With a single slot there is nothing to balance and the term is 0.
    """
    num_slots = mean_prob.shape[-1]
    mean_prob = _accurate(mean_prob)
    if num_slots < 2:
        return mean_prob.new_zeros(mean_prob.shape[:-1])
    entropy = -(mean_prob * torch.log(mean_prob + ENTROPY_EPS)).sum(-1)
    return 1.0 - entropy / math.log(num_slots)


def z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """``1e-4 * (mean_j logsumexp_i z~_ji)^2`` over the real patches (B x N x K, B x N -> B).

    Note the square of the mean, as specified, not the mean of squares.
    """
    lse = torch.logsumexp(_accurate(logits), dim=-1).masked_fill(~mask, 0.0)
    mean_lse = lse.sum(-1) / mask.sum(-1)
    return Z_LOSS_SCALE * mean_lse.square()


def aux_loss(switch: Tensor, entropy: Tensor, z: Tensor) -> Tensor:
    """``L_switch + 0.5 L_ent + L_z``."""
    return switch + ENTROPY_WEIGHT * entropy + z
