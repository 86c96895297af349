"""Pooling baselines: masked mean or max over all patch features, then the METHOD.md head."""

from __future__ import annotations

from torch import Tensor

from tcssa.mil.base import ClassifierHead, MILModel, masked_max, masked_mean


class MeanPoolMIL(MILModel):
    """Mean of the slide's real patch features -> classifier head."""

    name = "mean"
    # the head sees one token per slide (computed from every patch, as TC-SSA's 32 are)
    num_tokens = 1

    def __init__(
        self, in_dim: int, num_classes: int, head_hidden: int = 512, head_dropout: float = 0.3
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.head = ClassifierHead(in_dim, num_classes, head_hidden, head_dropout)

    @staticmethod
    def pool(x: Tensor, mask: Tensor | None) -> Tensor:
        return masked_mean(x, mask)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, coords: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x, mask, _ = self.check_input(x, mask, coords)
        return self.head(self.pool(x, mask)), {}


class MaxPoolMIL(MeanPoolMIL):
    """Feature-wise max over the slide's real patch features -> classifier head."""

    name = "max"

    @staticmethod
    def pool(x: Tensor, mask: Tensor | None) -> Tensor:
        return masked_max(x, mask)
