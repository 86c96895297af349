"""Attention-based MIL (Ilse, Tomczak and Welling, ICML 2018), plain and gated.

Each patch feature x_j is embedded, h_j = f(x_j); a small attention network
scores it, a_j = w^T tanh(V h_j) (gated: w^T (tanh(V h_j) * sigmoid(U h_j)));
the scores go through a softmax over the slide's real patches and the slide
embedding z = sum_j a_j h_j goes to a linear classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tcssa.mil.base import MILModel


def attention_scores(h: Tensor, v: nn.Linear, u: nn.Linear | None, w: nn.Linear) -> Tensor:
    """B x N scores a_j = w^T tanh(V h_j), or w^T (tanh(V h_j) * sigmoid(U h_j)) with ``u`` (gated),
    before the softmax; ABMIL's over patches and TC-SSA's attention head over slot tokens."""
    hidden = torch.tanh(v(h))
    if u is not None:
        hidden = hidden * torch.sigmoid(u(h))
    return w(hidden).squeeze(-1)


class AttentionMIL(MILModel):
    """ABMIL with tanh attention; the subclass below switches on the gate."""

    name = "abmil"
    gated = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        embed_dims: Sequence[int] = (512,),
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if isinstance(embed_dims, int):
            embed_dims = (embed_dims,)
        if any(width < 1 for width in embed_dims) or attention_dim < 1:
            raise ValueError(f"{self.name}: layer widths must be >= 1, got {embed_dims}, {attention_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width = in_dim
        for out in embed_dims:  # instance embedding f: fc + ReLU (+ dropout) per layer
            layers += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(dropout)]
            width = out
        self.embed = nn.Sequential(*layers)
        self.attention_v = nn.Linear(width, attention_dim)
        self.attention_u = nn.Linear(width, attention_dim) if self.gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(width, num_classes)

    def attention(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Patch embeddings (B x N x E) and attention weights (B x N, 0 at padding, summing to 1)."""
        x, mask, _ = self.check_input(x, mask, None)
        return self._attend(x, mask)

    def _attend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(x)
        scores = attention_scores(h, self.attention_v, self.attention_u, self.attention_w)
        return h, scores.masked_fill(~mask, float("-inf")).softmax(dim=1)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x, mask, _ = self.check_input(x, mask, coords)
        h, weights = self._attend(x, mask)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return self.classifier(pooled), {}


class GatedAttentionMIL(AttentionMIL):
    """ABMIL with gated attention: a_j = w^T (tanh(V h_j) * sigmoid(U h_j))."""

    name = "abmil-gated"
    gated = True
