"""Steps 1-4 of docs/METHOD.md: gate logits, exploration noise, routing probabilities, top-2.

1. gate logits            z_j = W_g x_j + b
2. exploration noise      z~_j = z_j + eps, eps ~ N(0, sigma^2), training only
3. routing probabilities  P_j = softmax(z~_j)
4. top-2 assignment       P~_jk = m_jk P_jk (m_jk = 1 for the two largest, NOT renormalised)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    """Steps 1-4 for a batch (or a chunk of one slide)."""

    lse: Tensor  # B x N logsumexp_k z~_jk, for the z-loss (the B x N x K logits need not be kept)
    probs: Tensor  # B x N x K routing probabilities P
    topk_weight: Tensor  # B x N x top_k truncated weights P~ (0 at padded patches)
    topk_index: Tensor  # B x N x top_k slot indices


def route(
    gate: nn.Linear,
    x: Tensor,
    mask: Tensor | None,
    *,
    top_k: int,
    noise_std: float,
    training: bool,
    where: str = "",
    patch_offset: int = 0,
    logit_offset: Tensor | None = None,
    logits: Tensor | None = None,
) -> Routing:
    """Steps 1-4 for B x N x D features (mask None: every patch is real).

    ``logit_offset`` (B x N x K, beyond the paper) is added to the gate logits: the part of a gate
    whose input is the features concatenated with something else (the spatial cues of
    ``tcssa.method.spatial``); None leaves step 1 exactly METHOD.md's. ``logits``: step 1 done
    already (``tcssa.method.mixed``).
    """
    if logits is None:
        logits = gate(x)  # 1. z_j = W_g x_j + b
    if logit_offset is not None:
        logits = logits + logit_offset.to(logits.dtype)
    check_finite(logits, where, patch_offset)
    if training and noise_std > 0:  # 2. exploration noise, training only
        logits = logits + torch.randn_like(logits) * noise_std
    probs = logits.softmax(dim=-1)  # 3. P_j
    # 4. P~ = m * P, not renormalised
    topk_weight, topk_index = top2(probs) if top_k == 2 else probs.topk(top_k, dim=-1)
    # logsumexp_k z~_jk for the z-loss, without another pass over N x K: the top slot has
    # P = exp(z_max - lse), so lse = z_max - log P_max (and P_max >= 1/K keeps the log tame).
    lse = logits.gather(-1, topk_index[..., :1]).squeeze(-1) - topk_weight[..., 0].log()
    if mask is not None:  # padded patches get weight 0 (and index -1 in the output)
        topk_weight = topk_weight * mask.unsqueeze(-1)
    return Routing(lse, probs, topk_weight, topk_index)


def top2(probs: Tensor) -> tuple[Tensor, Tensor]:
    """``probs.topk(2, dim=-1)`` as two max passes, about twice as fast on CPU (docs/RESULTS.md)."""
    first, first_index = probs.max(dim=-1, keepdim=True)
    second, second_index = probs.scatter(-1, first_index, -1.0).max(dim=-1, keepdim=True)  # P >= 0
    return torch.cat([first, second], dim=-1), torch.cat([first_index, second_index], dim=-1)


def check_finite(logits: Tensor, where: str = "", patch_offset: int = 0) -> None:
    """Raise ValueError naming the first patch whose gate logits are not finite."""
    # NaN or Inf in any feature always makes its gate logits non-finite, so checking the
    # B x N x K logits catches bad features at 1/D of the cost of scanning B x N x D; one sum
    # decides, and only a failure pays for finding the patch.
    if bool(torch.isfinite(logits.sum())):
        return
    finite = torch.isfinite(logits).all(dim=-1)
    if not bool(finite.all()):  # (the sum alone may overflow on huge but finite logits)
        bad = (~finite).nonzero()
        b, n = bad[0].tolist()
        n += patch_offset
        raise ValueError(
            f"features{where} contain NaN or Inf (or overflow the gate): {len(bad)} patch(es), "
            f"first at batch index {b}, patch {n}. Padded positions must hold finite values too."
        )
