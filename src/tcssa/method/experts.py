"""Step 6 of docs/METHOD.md: one small residual MLP expert per slot.

y_k = c_k + LayerNorm_k(W2_k Dropout(GELU(W1_k c_k)))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the published code


class SlotExperts(nn.Module):
    """K independent residual MLP experts, stored stacked and applied in one batched pass.

    The weights are stored (in, out), the transpose of nn.Linear's layout, so that ``c @ W`` has
    its weight gradient come out in the weight's own layout: autograd then need not copy
    2 x K x H x D gradients into place every training step (measured, docs/RESULTS.md).
    ``tcssa.io.published`` converts to and from the published per-expert layout; a checkpoint of
    the earlier (out, in) layout is recognised by the missing ``layout_version`` and transposed
    by ``tcssa.io.checkpoints.upgrade_expert_layout``.
    """

    LAYOUT_VERSION = 2  # 1 (no marker): w1, w2 stored (out, in); 2: (in, out)

    def __init__(self, num_slots: int, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.w1 = nn.Parameter(torch.empty(num_slots, dim, hidden))  # W1_k^T
        self.b1 = nn.Parameter(torch.empty(num_slots, hidden))
        self.w2 = nn.Parameter(torch.empty(num_slots, hidden, dim))  # W2_k^T
        self.b2 = nn.Parameter(torch.empty(num_slots, dim))
        self.ln_weight = nn.Parameter(torch.ones(num_slots, dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_slots, dim))
        # Saved with the weights: with D = H the shapes alone cannot tell the two layouts apart.
        self.register_buffer("layout_version", torch.tensor(self.LAYOUT_VERSION))
        self.reset_parameters()

    @property
    def hidden(self) -> int:
        return self.w1.shape[-1]

    def reset_parameters(self) -> None:
        # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), expert by expert, drawn
        # in nn.Linear's (out, in) order so that a seed gives the same experts in either layout.
        with torch.no_grad():
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                num_slots, fan_in, fan_out = weight.shape
                bound = 1.0 / math.sqrt(fan_in)
                drawn = torch.empty(num_slots, fan_out, fan_in).uniform_(-bound, bound)
                weight.copy_(drawn.transpose(1, 2))
                nn.init.uniform_(bias, -bound, bound)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)

    def forward(self, slots: Tensor) -> Tensor:
        # K x B x D: the slot is the batch dim of bmm, so a batch of B slides reads the weights once
        c = slots.transpose(0, 1)
        h = torch.baddbmm(self.b1.unsqueeze(1), c, self.w1)
        h = F.dropout(F.gelu(h), self.dropout, self.training)
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2).transpose(0, 1)  # B x K x D
        out = F.layer_norm(out, out.shape[-1:], eps=LAYER_NORM_EPS)
        return slots + out * self.ln_weight + self.ln_bias
